"""Batch labelling benchmark: reports per second for CSV in -> CheXpert CSV out.

Reads the texts of tests/data/labeler/eval.jsonl (491 varied reports), repeats them --copies
times into one headerless CSV (the CheXpert labeler's input) and prints, as Markdown:
  - on one core (pinned): the baseline, a plain `label_report` loop over the same texts with
    no CSV at all, beside the batch path `cds_service.findings.batch.label_file` from an
    in-memory CSV to an in-memory CSV, and from a temporary file to a temporary file (what
    `cxr-cds findings --csv IN -o OUT` does, without the process start);
  - unpinned: the file-to-file batch with --jobs N processes (default 2 and every CPU), output
    in input order;
  - a check that every batch output holds exactly the baseline's labels.
Each run is timed with time.perf_counter in --repeat rounds (the one-core runs take turns in
each round) and the best is shown; the labeler's word cache is filled by an untimed pass first.

    .venv/bin/python bench/labeler_batch.py [--data PATH] [--copies 40] [--repeat 3] [--jobs 2 0]

Exit status 0; 1 when a batch output differs from the baseline; 2 when the data file is
missing or unreadable.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cds_service.findings.batch import CHEXPERT_VALUES, label_file, usable_cpus  # noqa: E402
from cds_service.findings.labeler import label_report  # noqa: E402
from cds_service.findings.observations import Observation  # noqa: E402

DEFAULT_DATA = ROOT / "tests" / "data" / "labeler" / "eval.jsonl"


def load_texts(path: Path) -> list[str]:
    texts: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: {exc}") from exc
    return texts


def best_of(repeat: int, runs: list[Callable[[], object]]) -> list[float]:
    """The best time of each run over ``repeat`` rounds, the runs taking turns in each round
    (so a slow spell of a shared machine does not land on one of them only)."""
    best = [float("inf")] * len(runs)
    for _ in range(repeat):
        for index, run in enumerate(runs):
            start = time.perf_counter()
            run()
            best[index] = min(best[index], time.perf_counter() - start)
    return best


def baseline_rows(texts: list[str]) -> list[list[str]]:
    rows = []
    for text in texts:
        labels = label_report(text)
        rows.append([text, *(CHEXPERT_VALUES[labels[obs].label] for obs in Observation)])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--copies", type=int, default=40, help="times each report is repeated")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs each; best shown")
    parser.add_argument(
        "--jobs", type=int, nargs="*", default=[2, 0], help="process counts (0: every CPU)"
    )
    args = parser.parse_args(argv)

    if not args.data.is_file():
        print(f"No evaluation set at {args.data}: write it first (see tests/data/README.md).")
        return 2
    try:
        distinct = load_texts(args.data)
    except (OSError, ValueError) as exc:
        print(f"Cannot read the evaluation set: {exc}")
        return 2
    if not distinct:
        print(f"The evaluation set {args.data} has no reports.")
        return 2
    texts = distinct * args.copies
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([text] for text in texts)
    csv_bytes = buffer.getvalue().encode("utf-8")

    original_cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if original_cpus is not None:
        core = min(original_cpus)
        os.sched_setaffinity(0, {core})
        pinned = f"pinned to CPU {core}"
    else:
        pinned = "not pinned (no sched_setaffinity here)"

    for text in distinct:  # fills the labeler's word -> trigger cache, untimed
        label_report(text)
    expected = baseline_rows(texts)
    mismatches: list[str] = []

    def check(name: str, output: str) -> None:
        got = list(csv.reader(io.StringIO(output)))[1:]
        if got != expected:
            mismatches.append(name)

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "reports.csv"
        source.write_bytes(csv_bytes)
        target = Path(tmp) / "labeled.csv"

        def baseline() -> None:
            for text in texts:  # results dropped, as the batch path drops them once written
                label_report(text)

        def in_memory() -> str:
            out = io.StringIO()
            label_file(io.BytesIO(csv_bytes), out, name="memory")
            return out.getvalue()

        def file_to_file(jobs: int = 1) -> None:
            label_file(source, target, jobs=jobs)

        names = [
            "baseline: label_report loop, no CSV",
            "batch, in-memory CSV -> CSV",
            "batch, CSV file -> CSV file",
        ]
        timed = best_of(args.repeat, [baseline, in_memory, file_to_file])
        rows = list(zip(names, timed, strict=True))
        check("in-memory", in_memory())
        file_to_file()
        check("file", target.read_text(encoding="utf-8"))

        parallel: list[tuple[str, float]] = []
        if original_cpus is not None:
            os.sched_setaffinity(0, original_cpus)
        cpus = usable_cpus()
        for jobs in dict.fromkeys(args.jobs):
            workers = cpus if jobs == 0 else jobs
            [seconds] = best_of(args.repeat, [lambda jobs=jobs: file_to_file(jobs)])
            check(f"--jobs {jobs}", target.read_text(encoding="utf-8"))
            parallel.append((f"batch, file -> file, --jobs {jobs} ({workers} processes)", seconds))

    count = len(texts)
    baseline_s = rows[0][1]
    print(f"# Batch labelling, {len(distinct)} reports of {args.data.name} x {args.copies}")
    print()
    size = len(csv_bytes) / 1e6
    print(f"{count} reports, {size:.1f} MB of CSV; best of {args.repeat} rounds, runs in turn;")
    print(f"Python {platform.python_version()} on {platform.machine()}, {cpus} usable CPUs;")
    print(f"the first three runs {pinned}, the --jobs runs on every usable CPU.")
    print()
    print("| Run | seconds | reports/s | time / baseline |")
    print("|---|---|---|---|")
    for name, seconds in [*rows, *parallel]:
        ratio = seconds / baseline_s
        print(f"| {name} | {seconds:.3f} | {count / seconds:,.0f} | {ratio:.2f}x |")
    print()
    if mismatches:
        print("Outputs that differ from the baseline's labels: " + ", ".join(mismatches))
        return 1
    print("Every batch output holds exactly the baseline's labels.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
