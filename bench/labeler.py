"""Report labeler benchmark: accuracy on the team's evaluation set, and reports per second.

Reads tests/data/labeler/eval.jsonl (one JSON object a line: "id", "text", "labels" mapping
each observation name to positive / negative / uncertain / not_mentioned, "patterns"), labels
every text with cds_service.findings.labeler and prints, as Markdown:
  - per observation, precision / recall / F1 for positive, negative and uncertain (each label
    value a class of its own; not_mentioned is the "other" class, never scored);
  - macro F1 over those three classes for the 8 major findings and for all 14 observations;
  - how many reports with a negative pneumothorax were labelled positive;
  - accuracy per pattern tag;
  - reports/s on one core: every report labelled --repeat times, timed with
    time.perf_counter, beside a baseline (str.lower() + re.split into sentences) timed in the
    same run over the same texts.

    .venv/bin/python bench/labeler.py [--data PATH] [--repeat 20] [--errors 0]

Exit status 0; 2 when the data file is missing or unreadable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cds_service.findings.labeler import label_report  # noqa: E402
from cds_service.findings.observations import MAJOR_FINDINGS, Label, Observation  # noqa: E402

DEFAULT_DATA = ROOT / "tests" / "data" / "labeler" / "eval.jsonl"
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
) -> tuple[float | None, float | None]:
    """(class macro: mean over the 3 classes of F1 on counts pooled over the observations;
    cell mean: mean F1 over the (observation, class) cells that have gold or predictions)."""
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
    return (
        sum(class_f1) / len(class_f1) if class_f1 else None,
        sum(cells) / len(cells) if cells else None,
    )


def pin_to_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return f"pinned to CPU {core}"
    return "not pinned (no sched_setaffinity here)"


def time_runs(texts: list[str], repeat: int) -> tuple[float, float]:
    """Seconds for the labeler and for the baseline, each over every text ``repeat`` times."""
    start = time.perf_counter()
    for _ in range(repeat):
        for text in texts:
            label_report(text)
    labeler = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeat):
        for text in texts:
            BASELINE_SPLIT.split(text.lower())
    baseline = time.perf_counter() - start
    return labeler, baseline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--repeat", type=int, default=20, help="timing passes over every report")
    parser.add_argument("--errors", type=int, default=0, help="list up to N wrong labels")
    args = parser.parse_args(argv)

    if not args.data.is_file():
        print(f"No evaluation set at {args.data}: write it first (see tests/data/README.md).")
        return 2
    try:
        items = load(args.data)
    except (OSError, ValueError) as exc:
        print(f"Cannot read the evaluation set: {exc}")
        return 2
    if not items:
        print(f"The evaluation set {args.data} has no reports.")
        return 2

    results = [label_report(item.text) for item in items]
    predictions = [{obs: r[obs].label for obs in Observation} for r in results]
    counts = score(items, predictions)
    major = list(MAJOR_FINDINGS)

    shown_path = args.data.relative_to(ROOT) if args.data.is_relative_to(ROOT) else args.data
    print(f"# Report labeler on {shown_path}")
    print()
    sentences = sum(len(BASELINE_SPLIT.split(item.text)) for item in items)
    print(f"{len(items)} reports, {sentences} sentences (baseline split).")
    print()
    print("## Per observation (P / R / F1; support = gold count)")
    print()
    header = "| Observation | major |"
    rule = "|---|---|"
    for cls in CLASSES:
        header += f" {cls.value} P | R | F1 | n |"
        rule += "---|---|---|---|"
    print(header)
    print(rule)
    for obs in Observation:
        row = f"| {obs.value} | {'yes' if obs in MAJOR_FINDINGS else ''} |"
        for cls in CLASSES:
            cell = counts[(obs, cls)]
            scores = (fmt(cell.precision()), fmt(cell.recall()), fmt(cell.f1()), cell.support)
            row += " {} | {} | {} | {} |".format(*scores)
        print(row)
    print()
    print("## Macro F1 over positive / negative / uncertain")
    print()
    print("| Observations | class macro F1 (pooled per class) | mean of per-observation F1 |")
    print("|---|---|---|")
    for name, group in (("8 major findings", major), ("all 14", list(Observation))):
        by_class, by_cell = macro_f1(counts, group)
        print(f"| {name} | {fmt(by_class)} | {fmt(by_cell)} |")
    print()
    print("Class macro F1: F1 of each class on counts summed over the observations, averaged")
    print("over the three classes. Mean of per-observation F1: the average over the")
    print("(observation, class) cells that have a gold or predicted label (— cells are left out).")
    print()

    negated_ptx = [
        item.id
        for item, pred in zip(items, predictions, strict=True)
        if item.gold[Observation.PNEUMOTHORAX] is Label.NEGATIVE
        and pred[Observation.PNEUMOTHORAX] is Label.POSITIVE
    ]
    print("## Safety")
    print()
    print("| Check | count |")
    print("|---|---|")
    print(f"| negative pneumothorax labelled positive | {len(negated_ptx)} |")
    other_ptx = sum(
        1
        for item, pred in zip(items, predictions, strict=True)
        if item.gold[Observation.PNEUMOTHORAX] is not Label.POSITIVE
        and pred[Observation.PNEUMOTHORAX] is Label.POSITIVE
    )
    print(f"| any non-positive pneumothorax labelled positive | {other_ptx} |")
    if negated_ptx:
        print()
        print("Reports: " + ", ".join(negated_ptx))
    print()

    per_pattern: dict[str, Counter[str]] = {}
    for item, pred in zip(items, predictions, strict=True):
        for pattern in item.patterns or ("(none)",):
            tally = per_pattern.setdefault(pattern, Counter())
            tally["reports"] += 1
            tally["all 14 right"] += all(item.gold[o] is pred[o] for o in Observation)
            tally["major right"] += all(item.gold[o] is pred[o] for o in major)
    print("## Per pattern tag")
    print()
    print("| Pattern | reports | all 14 labels right | all 8 major right |")
    print("|---|---|---|---|")
    for pattern in sorted(per_pattern):
        tally = per_pattern[pattern]
        print(
            f"| {pattern} | {tally['reports']} | {tally['all 14 right']} | {tally['major right']} |"
        )
    print()

    if args.errors:
        print("## Wrong labels")
        print()
        print("| id | observation | gold | predicted | deciding sentence |")
        print("|---|---|---|---|---|")
        shown = 0
        for item, result in zip(items, results, strict=True):
            for obs in Observation:
                if item.gold[obs] is not result[obs].label and shown < args.errors:
                    sentence = (result[obs].sentence or "").replace("|", "\\|").replace("\n", " ")
                    cells = (item.id, obs.value, item.gold[obs].value, result[obs].label.value)
                    print("| {} | {} | {} | {} |".format(*cells), sentence, "|")
                    shown += 1
        print()

    pinned = pin_to_one_core()
    texts = [item.text for item in items]
    # The first pass also fills the labeler's word -> trigger cache; it is timed on its own.
    start = time.perf_counter()
    for text in texts:
        label_report(text)
    first_s = time.perf_counter() - start
    labeler_s, baseline_s = time_runs(texts, args.repeat)
    runs = len(texts) * args.repeat
    print("## Speed")
    print()
    print(f"{runs} labelings ({len(texts)} reports x {args.repeat}); {pinned};")
    print(f"Python {platform.python_version()} on {platform.machine()}.")
    print()
    print("| Run | seconds | reports/s |")
    print("|---|---|---|")
    print(f"| labeler, first pass (cold cache) | {first_s:.3f} | {len(texts) / first_s:,.0f} |")
    print(f"| labeler | {labeler_s:.3f} | {runs / labeler_s:,.0f} |")
    baseline = "baseline: str.lower() + re.split sentences"
    print(f"| {baseline} | {baseline_s:.3f} | {runs / baseline_s:,.0f} |")
    print()
    print(f"The labeler takes {labeler_s / baseline_s:.1f}x the baseline's time.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
