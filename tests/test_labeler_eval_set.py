"""Integrity of the labeler evaluation set (tests/data/labeler/eval.jsonl).

These tests check the file, not the labeler: every record is well formed, uses the shared
vocabulary, the set is big and varied enough, and No Finding follows the documented rule.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from cds_service.findings.observations import Label, Observation

EVAL_PATH = Path(__file__).parent / "data" / "labeler" / "eval.jsonl"

PATTERN_TAGS = (
    "negation",
    "uncertainty",
    "resolution",
    "unchanged",
    "coordination",
    "synonym",
    "misspelling",
    "support_device",
    "multi_sentence",
    "normal",
    "laterality",
    "severity",
)
MAJOR = (
    Observation.PNEUMOTHORAX,
    Observation.PLEURAL_EFFUSION,
    Observation.CONSOLIDATION,
    Observation.PNEUMONIA,
    Observation.EDEMA,
    Observation.CARDIOMEGALY,
    Observation.LUNG_OPACITY,
    Observation.ATELECTASIS,
)
MIN_RECORDS = 300
MIN_PER_TAG = 5
MIN_MAJOR = {Label.POSITIVE: 15, Label.NEGATIVE: 15, Label.UNCERTAIN: 8}
ALL_NAMES = {o.value for o in Observation}
ALL_LABELS = {label.value for label in Label}
# Observations that decide No Finding: all but No Finding itself and Support Devices.
CLINICAL = [
    o.value for o in Observation if o not in (Observation.NO_FINDING, Observation.SUPPORT_DEVICES)
]


def _load() -> list[dict[str, Any]]:
    records = []
    with EVAL_PATH.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            assert line.strip(), f"line {number} is blank"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:  # pragma: no cover - reported by the assert
                pytest.fail(f"line {number} is not JSON: {exc}")
            assert isinstance(record, dict), f"line {number} is not an object"
            records.append(record)
    return records


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return _load()


def test_file_exists_and_is_big_enough(records: list[dict[str, Any]]) -> None:
    assert len(records) >= MIN_RECORDS


def test_record_shape(records: list[dict[str, Any]]) -> None:
    for record in records:
        assert set(record) == {"id", "text", "labels", "patterns"}, record.get("id")
        assert isinstance(record["id"], str) and re.fullmatch(r"e\d{4}", record["id"])
        assert isinstance(record["text"], str) and record["text"].strip(), record["id"]
        assert record["text"] == record["text"].strip(), record["id"]
        assert isinstance(record["patterns"], list), record["id"]
        assert len(record["patterns"]) == len(set(record["patterns"])), record["id"]


def test_ids_unique(records: list[dict[str, Any]]) -> None:
    counts = Counter(r["id"] for r in records)
    assert [i for i, c in counts.items() if c > 1] == []


def test_texts_unique(records: list[dict[str, Any]]) -> None:
    counts = Counter(r["text"] for r in records)
    assert [t for t, c in counts.items() if c > 1] == []


def test_every_record_has_all_14_labels_with_allowed_values(
    records: list[dict[str, Any]],
) -> None:
    assert len(ALL_NAMES) == 14
    for record in records:
        labels = record["labels"]
        assert isinstance(labels, dict), record["id"]
        assert set(labels) == ALL_NAMES, record["id"]
        bad = {k: v for k, v in labels.items() if v not in ALL_LABELS}
        assert bad == {}, record["id"]


def test_pattern_tags_known_and_each_used_enough(records: list[dict[str, Any]]) -> None:
    counts: Counter[str] = Counter()
    for record in records:
        unknown = set(record["patterns"]) - set(PATTERN_TAGS)
        assert unknown == set(), (record["id"], unknown)
        counts.update(record["patterns"])
    rare = {tag: counts[tag] for tag in PATTERN_TAGS if counts[tag] < MIN_PER_TAG}
    assert rare == {}


@pytest.mark.parametrize("observation", MAJOR, ids=lambda o: o.value)
def test_major_observations_are_covered(
    records: list[dict[str, Any]], observation: Observation
) -> None:
    counts = Counter(r["labels"][observation.value] for r in records)
    short = {
        label.value: counts[label.value]
        for label, minimum in MIN_MAJOR.items()
        if counts[label.value] < minimum
    }
    assert short == {}


def test_no_finding_rule(records: list[dict[str, Any]]) -> None:
    """No Finding is positive exactly when nothing clinical is present or hedged and the
    text says something normal or negative; otherwise not_mentioned, never negative/uncertain.
    """
    for record in records:
        labels = record["labels"]
        no_finding = labels[Observation.NO_FINDING.value]
        assert no_finding in (Label.POSITIVE.value, Label.NOT_MENTIONED.value), record["id"]
        clinical = [labels[name] for name in CLINICAL]
        clean = all(v in (Label.NEGATIVE.value, Label.NOT_MENTIONED.value) for v in clinical)
        says_normal = Label.NEGATIVE.value in clinical or "normal" in record["patterns"]
        expected = Label.POSITIVE.value if clean and says_normal else Label.NOT_MENTIONED.value
        assert no_finding == expected, record["id"]


def test_multi_sentence_tag_matches_reports(records: list[dict[str, Any]]) -> None:
    """Short reports (2-6 sentences) carry multi_sentence; single sentences do not."""
    for record in records:
        text = re.sub(r"\b\d\.\s", "", record["text"])  # "IMPRESSION: 1. ... 2. ..."
        sentences = [s for s in re.split(r"(?<=[.?!])\s+", text) if s]
        if "multi_sentence" in record["patterns"]:
            assert 2 <= len(sentences) <= 6, record["id"]
        else:
            assert len(sentences) == 1, record["id"]
