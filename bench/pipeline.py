"""Pipeline benchmark: the worker draining a queue, batched claims vs one job at a time.

Queues --studies studies whose image is a real seed DICOM (decoded once; the image source
hands it out, so the benchmark measures the queue, the model and the findings, not the
network), then drains the same queue twice in the same run on the same model: once claiming
one job at a time (today's production path before batched claims) and once claiming up to
--batch-size jobs in one transaction, their images sent to the model together. Backends:
simulated (no model) and tiny (a random checkpoint in the CXR-LLaVA layout, written to a
temporary folder and loaded through the real loader, on the CPU). Prints per backend and mode
the jobs/s and its ratio to one at a time, the mean batch size as the service's own GET
/metrics reports it (cxr_cds_batch_size, scraped through the app before and after each
drain), and the arrival-to-report latency of each job (queued -> result stored and job
closed: p50 / p95 from the jobs themselves, mean from /metrics' cxr_cds_job_latency_seconds).
All studies arrive at once (a burst), so the latency is mostly the wait in the queue.

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
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from cds_service.composition import Composition  # noqa: E402
from cds_service.config import Settings  # noqa: E402
from cds_service.imaging.errors import NotAnalysable  # noqa: E402
from cds_service.imaging.files import DecodedImage, read_image_file  # noqa: E402
from cds_service.inference.base import ReportRequest, ReportWriter  # noqa: E402
from cds_service.inference.pipeline import ImagePipelineBackend  # noqa: E402
from cds_service.jobs.worker import drain  # noqa: E402
from cds_service.results import AnalysisResult  # noqa: E402
from cds_service.storage.ports import Job, JobQueue, StudyRef  # noqa: E402
from cds_service.web.app import create_app  # noqa: E402

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


class TimedQueue:
    """The job queue, with the time from each job's arrival to its result being closed."""

    def __init__(self, inner: JobQueue) -> None:
        self.inner = inner
        self.latencies: list[float] = []

    def finish(self, job: Job, result: AnalysisResult, filed_location: str | None = None) -> None:
        self.inner.finish(job, result, filed_location)
        self.latencies.append(time.time() - job.created_at)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def scraped(client: Any) -> dict[str, float]:
    """The samples of GET /metrics that this benchmark reads (summed over labels)."""
    response = client.get("/metrics")
    if response.status_code != 200:
        raise SystemExit(f"/metrics answered {response.status_code}")
    wanted = {
        "cxr_cds_batch_size_sum",
        "cxr_cds_batch_size_count",
        "cxr_cds_job_latency_seconds_sum",
        "cxr_cds_job_latency_seconds_count",
    }
    values = dict.fromkeys(wanted, 0.0)
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            if sample.name in wanted:
                values[sample.name] += float(sample.value)
    return values


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


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
    settings = Settings(mode="demo", public_url="http://127.0.0.1:1", database=db)
    parts = Composition(settings)
    storage = parts.storage
    timed = TimedQueue(storage.jobs)
    storage = replace(storage, jobs=timed)  # type: ignore[arg-type]
    client = create_app(Composition(settings, storage=storage)).test_client()
    for number in range(studies):
        ref = StudyRef("http://bench/fhir", f"1.2.826.0.1.{number}", "p1")
        storage.jobs.enqueue(
            ref, backend.model, {"resourceType": "ImagingStudy", "id": f"s{number}"}, None
        )
    before = scraped(client)
    start = time.perf_counter()
    done = drain(storage, backend, batch_size=batch)
    seconds = time.perf_counter() - start
    after = scraped(client)
    if done != studies or storage.jobs.queue_depth(backend.model):
        raise SystemExit(f"drained {done} of {studies} jobs")

    def delta(name: str) -> float:
        return after[name] - before[name]

    return {
        "seconds": seconds,
        "jobs_per_s": studies / seconds,
        "images_per_call": counting.images / max(counting.calls, 1),
        "metrics_batch": delta("cxr_cds_batch_size_sum")
        / max(delta("cxr_cds_batch_size_count"), 1),
        "metrics_latency": delta("cxr_cds_job_latency_seconds_sum")
        / max(delta("cxr_cds_job_latency_seconds_count"), 1),
        "p50": percentile(timed.latencies, 0.5),
        "p95": percentile(timed.latencies, 0.95),
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
    print(
        "| backend | claims | seconds | jobs/s | vs one at a time | mean batch (/metrics) "
        "| images per model call | arrival->report p50 / p95 s | mean s (/metrics) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
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
                    f"{ratio:.2f}x | {row['metrics_batch']:.1f} | {row['images_per_call']:.1f} "
                    f"| {row['p50']:.2f} / {row['p95']:.2f} | {row['metrics_latency']:.2f} |"
                )
            stop = getattr(writer, "close", None)
            if callable(stop):
                stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
