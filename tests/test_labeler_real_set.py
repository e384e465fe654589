"""Integrity of the real-text labeler evaluation set (tests/data/labeler/real/*.jsonl).

These tests check the files, not the labeler: every record is well formed, names its source
(repository, path, commit, licence), the set is big enough and covers the findings that
matter, and No Finding follows the documented rule.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from cds_service.findings.observations import Label, Observation

REAL_DIR = Path(__file__).parent / "data" / "labeler" / "real"
MIN_RECORDS = 300
ALL_NAMES = {o.value for o in Observation}
ALL_LABELS = {label.value for label in Label}
CLINICAL = [
    o.value for o in Observation if o not in (Observation.NO_FINDING, Observation.SUPPORT_DEVICES)
]
COMMIT = re.compile(r"[0-9a-f]{40}")
SOURCE_FIELDS = ("repo", "path", "commit", "record", "dataset", "licence")


def _load() -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for path in sorted(REAL_DIR.glob("*.jsonl")):
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                assert line.strip(), f"{path.name}:{number} is blank"
                record = json.loads(line)
                record["_where"] = f"{path.name}:{number}"
                records.append(record)
    return records


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return _load()


def test_big_enough_and_every_part_documented(records: list[dict[str, Any]]) -> None:
    assert len(records) >= MIN_RECORDS
    assert (REAL_DIR / "README.md").is_file()
    for part in REAL_DIR.glob("*.jsonl"):
        assert part.with_suffix(".md").is_file(), f"{part.name} has no notes file"


def test_ids_and_texts_unique(records: list[dict[str, Any]]) -> None:
    ids = Counter(r["id"] for r in records)
    texts = Counter(r["text"].strip() for r in records)
    assert [i for i, n in ids.items() if n > 1] == []
    assert [t[:60] for t, n in texts.items() if n > 1] == []


def test_every_record_has_all_14_labels_and_a_source(records: list[dict[str, Any]]) -> None:
    for record in records:
        where = record["_where"]
        assert isinstance(record["text"], str) and record["text"].strip(), where
        assert set(record["labels"]) == ALL_NAMES, where
        assert set(record["labels"].values()) <= ALL_LABELS, where
        source = record["source"]
        assert all(source.get(field) for field in SOURCE_FIELDS), where
        assert COMMIT.fullmatch(source["commit"]), where
        assert "mimic" not in source["dataset"].lower(), f"{where}: no MIMIC text"


def test_no_finding_rule(records: list[dict[str, Any]]) -> None:
    for record in records:
        labels = record["labels"]
        assert labels["No Finding"] in ("positive", "not_mentioned"), record["_where"]
        if any(labels[o] in ("positive", "uncertain") for o in CLINICAL):
            assert labels["No Finding"] == "not_mentioned", record["_where"]


def test_pneumothorax_is_covered(records: list[dict[str, Any]]) -> None:
    counts = Counter(r["labels"]["Pneumothorax"] for r in records)
    assert counts["positive"] >= 4  # all the collection rows read held (README: known gaps)
    assert counts["negative"] >= 30
