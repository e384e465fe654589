"""Pipeline benchmark: the worker draining a queue, batched claims vs one job at a time.

Queues --studies studies whose image is a real seed DICOM (decoded once; the image source
hands it out, so the benchmark measures the queue, the model and the findings, not the
network), then drains the same queue twice in the same run on the same model: once claiming
one job at a time (today's production path before batched claims) and once claiming up to
--batch-size jobs in one transaction, their images sent to the model together. Backends:
simulated (no model) and tiny (a random checkpoint in the CXR-LLaVA layout, written to a
temporary folder and loaded through the real loader, on the CPU). Prints per backend and mode
the jobs/s, the mean number of images per model call, and the ratio.

    .venv/bin/python bench/pipeline.py [--studies 64] [--batch-size 8] [--max-new-tokens 16]
        [--backends simulated,tiny]

Random weights: the tiny model's text is meaningless; only the timing is.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cds_service.imaging.errors import NotAnalysable  # noqa: E402
from cds_service.imaging.files import DecodedImage, read_image_file  # noqa: E402
from cds_service.inference.base import ReportRequest, ReportWriter  # noqa: E402
from cds_service.inference.pipeline import ImagePipelineBackend  # noqa: E402
from cds_service.jobs.worker import drain  # noqa: E402
from cds_service.storage.ports import StudyRef  # noqa: E402
from cds_service.storage.sqlite import open_sqlite_storage  # noqa: E402

SEED = ROOT / "ehr_sandbox" / "seed"


class CountingWriter:
    """Wraps a writer to count its calls and images (the engine may split them further)."""

    def __init__(self, inner: ReportWriter) -> None:
        self.inner = inner
        self.model = inner.model
        self.calls = 0
        self.images = 0

    def write_reports(self, requests: Sequence[ReportRequest]) -> list[str]:
        self.calls += 1
        self.images += len(requests)
        return self.inner.write_reports(requests)


class OneFilm:
    def __init__(self, image: DecodedImage) -> None:
        self.image = image

    def load(self, study: dict[str, Any], fhir_server: str | None) -> DecodedImage:
        return self.image


def seed_film() -> DecodedImage:
    for path in sorted(SEED.rglob("*.dcm")):
        try:
            return read_image_file(path)
        except NotAnalysable:
            continue  # a lateral view: the pipeline would refuse it too
    raise SystemExit(f"no frontal chest seed DICOM under {SEED}")


def make_writer(name: str, folder: Path, batch_size: int, max_new_tokens: int) -> ReportWriter:
    if name == "simulated":
        from cds_service.inference.simulated import SimulatedReportWriter

        return SimulatedReportWriter()
    from cds_service.inference.cxr_llava.loader import load_checkpoint
    from cds_service.inference.cxr_llava.make_tiny import make_checkpoint
    from cds_service.inference.cxr_llava.writer import CxrLlavaReportWriter

    make_checkpoint(folder)
    ckpt = load_checkpoint(folder, device="cpu")
    ckpt.tiny = True
    return CxrLlavaReportWriter(
        ckpt, max_new_tokens=max_new_tokens, max_batch_size=batch_size, ignore_eos=True
    )


def run(
    writer: ReportWriter, film: DecodedImage, studies: int, batch: int, db: Path
) -> dict[str, float]:
    counting = CountingWriter(writer)
    backend = ImagePipelineBackend(counting, OneFilm(film))
    store = open_sqlite_storage(db)
    for number in range(studies):
        ref = StudyRef("http://bench/fhir", f"1.2.826.0.1.{number}", "p1")
        store.jobs.enqueue(
            ref, backend.model, {"resourceType": "ImagingStudy", "id": f"s{number}"}, None
        )
    start = time.perf_counter()
    done = drain(store, backend, batch_size=batch)
    seconds = time.perf_counter() - start
    if done != studies or store.jobs.queue_depth(backend.model):
        raise SystemExit(f"drained {done} of {studies} jobs")
    return {
        "seconds": seconds,
        "jobs_per_s": studies / seconds,
        "images_per_call": counting.images / max(counting.calls, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--backends", default="simulated,tiny")
    args = parser.parse_args(argv)

    film = seed_film()
    print(f"# Pipeline: {args.studies} queued studies, batch size {args.batch_size}")
    print()
    print(f"Python {platform.python_version()} on {platform.machine()}, CPU; image")
    print(f"{film.pixels.shape[1]} x {film.pixels.shape[0]} decoded once; tiny model:")
    print(f"{args.max_new_tokens} new tokens forced per report.")
    print()
    print("| backend | claims | seconds | jobs/s | images per model call | vs one at a time |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backends.split(","):
            writer = make_writer(name, Path(tmp) / name, args.batch_size, args.max_new_tokens)
            # Warm-up on a small queue so both modes meet a loaded, warmed model.
            run(writer, film, min(4, args.studies), args.batch_size, Path(tmp) / f"{name}-w.db")
            single = run(writer, film, args.studies, 1, Path(tmp) / f"{name}-1.db")
            batched = run(writer, film, args.studies, args.batch_size, Path(tmp) / f"{name}-b.db")
            for label, row in (
                ("one at a time", single),
                (f"batches of {args.batch_size}", batched),
            ):
                ratio = row["jobs_per_s"] / single["jobs_per_s"]
                print(
                    f"| {name} | {label} | {row['seconds']:.2f} | {row['jobs_per_s']:.1f} | "
                    f"{row['images_per_call']:.1f} | {ratio:.2f}x |"
                )
            stop = getattr(writer, "close", None)
            if callable(stop):
                stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
