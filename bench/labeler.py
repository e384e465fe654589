"""Report labeler benchmark: accuracy on both evaluation sets side by side, and reports/s.

Reads the team's set (tests/data/labeler/eval.jsonl) and the real-text set
(tests/data/labeler/real/*.jsonl), one JSON object a line ("id", "text", "labels" mapping
each observation name to positive / negative / uncertain / not_mentioned, "patterns"),
labels every text with cds_service.findings.labeler and prints, as Markdown, per set:
  - per observation, F1 (and support) for positive, negative and uncertain (each label value
    a class of its own; not_mentioned is the "other" class, never scored);
  - macro F1 over those three classes for the 8 major findings and for all 14 observations;
  - the pneumothorax safety counts: negated or absent pneumothorax labelled positive;
  - reports with every label right, per pattern tag;
  - with --errors N, up to N wrong labels per set;
and the speed on one core: every report of both sets labelled --repeat times, beside a
baseline (str.lower() + re.split into sentences) timed in the same run; with
--reference REV, also the labeler as it was at git revision REV, timed in a subprocess in
the same run, alternating with the candidate, median of --rounds rounds.

    .venv/bin/python bench/labeler.py [--data PATH ...] [--repeat 20] [--errors 0]
        [--reference REV] [--rounds 5]

Exit status 0; 2 when a data file is missing or unreadable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cds_service.findings.labeler import ObservationLabel, label_report  # noqa: E402
from cds_service.findings.observations import MAJOR_FINDINGS, Label, Observation  # noqa: E402

LABELER_DATA = ROOT / "tests" / "data" / "labeler"
DEFAULT_SETS = {
    "team": [LABELER_DATA / "eval.jsonl"],
    "real": sorted((LABELER_DATA / "real").glob("*.jsonl")),
}
CLASSES = (Label.POSITIVE, Label.NEGATIVE, Label.UNCERTAIN)
BASELINE_SPLIT = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Item:
    id: str
    text: str
    gold: dict[Observation, Label]
    patterns: tuple[str, ...]


def load(path: Path) -> list[Item]:
    items: list[Item] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                labels = raw["labels"]
                gold = {obs: Label(labels.get(obs.value, "not_mentioned")) for obs in Observation}
                unknown = set(labels) - {obs.value for obs in Observation}
                if unknown:
                    raise ValueError(f"unknown observation(s) {sorted(unknown)}")
                items.append(
                    Item(str(raw["id"]), str(raw["text"]), gold, tuple(raw.get("patterns", ())))
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: {exc}") from exc
    return items


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def support(self) -> int:
        return self.tp + self.fn

    def precision(self) -> float | None:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    def recall(self) -> float | None:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    def f1(self) -> float | None:
        # Undefined (None) when the class neither occurs nor is predicted: nothing to score.
        if self.tp + self.fp + self.fn == 0:
            return None
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn)


def score(
    items: list[Item], predictions: list[dict[Observation, Label]]
) -> dict[tuple[Observation, Label], Counts]:
    counts = {(obs, cls): Counts() for obs in Observation for cls in CLASSES}
    for item, predicted in zip(items, predictions, strict=True):
        for obs in Observation:
            gold, pred = item.gold[obs], predicted[obs]
            for cls in CLASSES:
                cell = counts[(obs, cls)]
                if gold is cls and pred is cls:
                    cell.tp += 1
                elif pred is cls:
                    cell.fp += 1
                elif gold is cls:
                    cell.fn += 1
    return counts


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def macro_f1(
    counts: dict[tuple[Observation, Label], Counts], observations: list[Observation]
) -> tuple[float | None, float | None, float | None]:
    """(class macro: mean over the 3 classes of F1 on counts pooled over the observations;
    all cells: mean F1 over the (observation, class) cells that have gold or predictions;
    cells with support: the same over the cells with gold support, the issue's measure)."""
    class_f1: list[float] = []
    for cls in CLASSES:
        pooled = Counts()
        for obs in observations:
            cell = counts[(obs, cls)]
            pooled.tp += cell.tp
            pooled.fp += cell.fp
            pooled.fn += cell.fn
        value = pooled.f1()
        if value is not None:
            class_f1.append(value)
    cells = [
        value
        for obs in observations
        for cls in CLASSES
        if (value := counts[(obs, cls)].f1()) is not None
    ]
    supported = [
        value
        for obs in observations
        for cls in CLASSES
        if counts[(obs, cls)].support and (value := counts[(obs, cls)].f1()) is not None
    ]
    return (
        sum(class_f1) / len(class_f1) if class_f1 else None,
        sum(cells) / len(cells) if cells else None,
        sum(supported) / len(supported) if supported else None,
    )


def pin_to_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return f"pinned to CPU {core}"
    return "not pinned (no sched_setaffinity here)"


# Run in a subprocess on an exported old tree: labels every text of a JSON list read from
# stdin ``repeat`` times after one warm-up pass and prints the seconds.
_REFERENCE_TIMER = """
import json, os, sys, time
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {int(sys.argv[2])})
from cds_service.findings.labeler import label_report
texts = json.load(sys.stdin)
for t in texts:
    label_report(t)
start = time.perf_counter()
for _ in range(int(sys.argv[1])):
    for t in texts:
        label_report(t)
print(time.perf_counter() - start)
"""


def export_reference(rev: str, into: Path) -> None:
    """The package as it was at git revision ``rev``, written under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "cds_service"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)


def time_reference(tree: Path, texts: list[str], repeat: int) -> float:
    core = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    done = subprocess.run(
        [sys.executable, "-c", _REFERENCE_TIMER, str(repeat), str(core)],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        check=True,
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
    )
    return float(done.stdout.strip())


def time_candidate(texts: list[str], repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        for text in texts:
            label_report(text)
    return time.perf_counter() - start


def time_baseline(texts: list[str], repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        for text in texts:
            BASELINE_SPLIT.split(text.lower())
    return time.perf_counter() - start


@dataclass
class SetResult:
    name: str
    items: list[Item]
    results: list[dict[Observation, ObservationLabel]]
    predictions: list[dict[Observation, Label]]
    counts: dict[tuple[Observation, Label], Counts]


def evaluate(name: str, items: list[Item]) -> SetResult:
    results = [label_report(item.text) for item in items]
    predictions = [{obs: r[obs].label for obs in Observation} for r in results]
    return SetResult(name, items, results, predictions, score(items, predictions))


def print_accuracy(sets: list[SetResult], errors: int) -> None:
    major = list(MAJOR_FINDINGS)
    print("## F1 per observation and class (support = gold count)")
    print()
    header = "| Observation | major |"
    rule = "|---|---|"
    for result in sets:
        for cls in CLASSES:
            header += f" {result.name} {cls.value} F1 (n) |"
            rule += "---|"
    print(header)
    print(rule)
    for obs in Observation:
        row = f"| {obs.value} | {'yes' if obs in MAJOR_FINDINGS else ''} |"
        for result in sets:
            for cls in CLASSES:
                cell = result.counts[(obs, cls)]
                row += f" {fmt(cell.f1())} ({cell.support}) |"
        print(row)
    print()
    print("## Macro F1 over positive / negative / uncertain")
    print()
    print(
        "| Observations | "
        + " | ".join(
            f"{r.name}: cells with support | {r.name}: class macro | {r.name}: all cells"
            for r in sets
        )
        + " |"
    )
    print("|---|" + "---|---|---|" * len(sets))
    for name, group in (("8 major findings", major), ("all 14", list(Observation))):
        row = f"| {name} |"
        for result in sets:
            by_class, by_cell, by_supported = macro_f1(result.counts, group)
            row += f" {fmt(by_supported)} | {fmt(by_class)} | {fmt(by_cell)} |"
        print(row)
    print()
    print("Cells with support: the mean F1 over the (observation, class) cells with at least")
    print("one gold label (the issue's measure). Class macro: F1 of each class on counts summed")
    print("over the observations, averaged over the three classes. All cells: the mean over the")
    print("cells with a gold or a predicted label (a prediction without support scores 0).")
    print()
    print("## Pneumothorax safety")
    print()
    print("| Check | " + " | ".join(r.name for r in sets) + " |")
    print("|---|" + "---|" * len(sets))
    checks = (
        ("gold negative, labelled positive", lambda g: g is Label.NEGATIVE),
        ("gold not mentioned, labelled positive", lambda g: g is Label.NOT_MENTIONED),
        ("gold uncertain, labelled positive", lambda g: g is Label.UNCERTAIN),
    )
    flagged: dict[str, list[str]] = {}
    for title, wanted in checks:
        row = f"| {title} |"
        for result in sets:
            ids = [
                item.id
                for item, pred in zip(result.items, result.predictions, strict=True)
                if wanted(item.gold[Observation.PNEUMOTHORAX])
                and pred[Observation.PNEUMOTHORAX] is Label.POSITIVE
            ]
            flagged.setdefault(result.name, []).extend(ids)
            row += f" {len(ids)} |"
        print(row)
    row = "| gold positive (support) |"
    for result in sets:
        row += f" {sum(i.gold[Observation.PNEUMOTHORAX] is Label.POSITIVE for i in result.items)} |"
    print(row)
    for name, ids in flagged.items():
        if ids:
            print()
            print(f"{name}: " + ", ".join(ids))
    print()
    for result in sets:
        per_pattern: dict[str, Counter[str]] = {}
        for item, pred in zip(result.items, result.predictions, strict=True):
            for pattern in item.patterns or ("(none)",):
                tally = per_pattern.setdefault(pattern, Counter())
                tally["reports"] += 1
                tally["all 14 right"] += all(item.gold[o] is pred[o] for o in Observation)
                tally["major right"] += all(item.gold[o] is pred[o] for o in major)
        print(f"## Reports with every label right, per pattern tag: {result.name}")
        print()
        print("| Pattern | reports | all 14 labels right | all 8 major right |")
        print("|---|---|---|---|")
        for pattern in sorted(per_pattern):
            tally = per_pattern[pattern]
            print(
                f"| {pattern} | {tally['reports']} | {tally['all 14 right']}"
                f" | {tally['major right']} |"
            )
        print()
    if errors:
        for result in sets:
            print(f"## Wrong labels: {result.name} (up to {errors})")
            print()
            print("| id | observation | gold | predicted | deciding sentence |")
            print("|---|---|---|---|---|")
            shown = 0
            for item, labels in zip(result.items, result.results, strict=True):
                for obs in Observation:
                    if item.gold[obs] is not labels[obs].label and shown < errors:
                        sentence = (labels[obs].sentence or "").replace("|", "\\|")
                        cells = (item.id, obs.value, item.gold[obs].value, labels[obs].label.value)
                        print(
                            "| {} | {} | {} | {} |".format(*cells), sentence.replace("\n", " "), "|"
                        )
                        shown += 1
            print()


def print_speed(texts: list[str], repeat: int, reference: str | None, rounds: int) -> None:
    pinned = pin_to_one_core()
    for text in texts:  # fills the labeler's word -> trigger cache
        label_report(text)
    runs = len(texts) * repeat
    candidate: list[float] = []
    old: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        if reference:
            export_reference(reference, Path(tmp))
        for _ in range(rounds if reference else 1):
            if reference:
                old.append(time_reference(Path(tmp), texts, repeat))
            candidate.append(time_candidate(texts, repeat))
    baseline_s = time_baseline(texts, repeat)
    labeler_s = statistics.median(candidate)
    print("## Speed")
    print()
    print(f"{runs} labelings per round ({len(texts)} reports x {repeat}); {pinned};")
    print(f"Python {platform.python_version()} on {platform.machine()}; median of")
    print(f"{len(candidate)} round(s), reference and candidate alternating, warm caches.")
    print()
    print("| Run | seconds | reports/s |")
    print("|---|---|---|")
    print(f"| labeler (this tree) | {labeler_s:.3f} | {runs / labeler_s:,.0f} |")
    if old:
        old_s = statistics.median(old)
        print(f"| labeler at {reference} | {old_s:.3f} | {runs / old_s:,.0f} |")
    base = "baseline: str.lower() + re.split sentences"
    print(f"| {base} | {baseline_s:.3f} | {runs / baseline_s:,.0f} |")
    print()
    if old:
        print(f"This tree's labeler runs at {old_s / labeler_s:.2f}x the speed of {reference}'s.")
    print(f"The labeler takes {labeler_s / baseline_s:.1f}x the baseline's time.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, action="append", help="one evaluation set (repeatable)"
    )
    parser.add_argument("--repeat", type=int, default=20, help="timing passes over every report")
    parser.add_argument("--errors", type=int, default=0, help="list up to N wrong labels")
    parser.add_argument("--reference", help="also time the labeler at this git revision")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds with --reference")
    args = parser.parse_args(argv)

    named = {path.stem: [path] for path in args.data} if args.data else DEFAULT_SETS
    sets: list[SetResult] = []
    for name, paths in named.items():
        items: list[Item] = []
        for path in paths:
            if not path.is_file():
                print(f"No evaluation set at {path} (see tests/data/labeler/README.md).")
                return 2
            try:
                items += load(path)
            except (OSError, ValueError) as exc:
                print(f"Cannot read the evaluation set: {exc}")
                return 2
        if not items:
            print(f"The evaluation set {name} has no reports.")
            return 2
        sets.append(evaluate(name, items))

    print("# Report labeler on " + ", ".join(f"{r.name} ({len(r.items)} reports)" for r in sets))
    print()
    for name, paths in named.items():
        shown = [str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p) for p in paths]
        print(f"- {name}: " + ", ".join(shown))
    print()
    print_accuracy(sets, args.errors)
    texts = [item.text for result in sets for item in result.items]
    print_speed(texts, args.repeat, args.reference, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
