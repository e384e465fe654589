"""docs/conformance.md stays true to the CDS Hooks 2.0 requirement list and to the test suite.

The requirement list is the Inferno project's extraction of the HL7 CDS Hooks 2.0 spec, copied
byte for byte from the team's shared standards folder into tests/data/.
"""

from __future__ import annotations

import ast
import csv
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS_CSV = ROOT / "tests" / "data" / "cds-hooks-2.0-service-requirements.csv"
CONFORMANCE_DOC = ROOT / "docs" / "conformance.md"
CITATION = re.compile(r"(tests/[\w/]+\.py)::(\w+)")
BINDING = {"SHALL", "SHALL NOT"}
MAX_REQUIREMENT_CHARS = 90


def requirements() -> list[dict[str, str]]:
    with REQUIREMENTS_CSV.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def table_rows() -> list[list[str]]:
    """The cells of each body row of the table (header and separator rows left out)."""
    rows = []
    for line in CONFORMANCE_DOC.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == "ID" or set(cells[0]) <= set("-: "):
            continue
        rows.append(cells)
    return rows


@cache
def defined_tests(path: str) -> frozenset[str]:
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"), filename=path)
    return frozenset(
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    )


def test_every_requirement_id_is_one_table_row_in_csv_order() -> None:
    ids = [row["ID"] for row in requirements()]
    assert len(ids) > 100 and len(set(ids)) == len(ids)
    rows = table_rows()
    assert all(len(cells) == 4 for cells in rows), "each row: ID | level | requirement | covered by"
    listed = [cells[0] for cells in rows]
    missing = sorted(set(ids) - set(listed), key=int)
    unknown = sorted(set(listed) - set(ids))
    repeated = sorted({i for i in listed if listed.count(i) > 1}, key=int)
    assert not missing, f"requirement IDs missing from docs/conformance.md: {missing}"
    assert not unknown, f"IDs in docs/conformance.md that are not in the CSV: {unknown}"
    assert not repeated, f"IDs listed more than once in docs/conformance.md: {repeated}"
    assert listed == ids, "the table must keep the CSV's ID order"


def test_levels_and_shortened_requirements_match_the_csv() -> None:
    levels = {row["ID"]: row["Conformance"] for row in requirements()}
    for req_id, level, requirement, _ in table_rows():
        assert level == levels[req_id], f"row {req_id}: level {level!r}, CSV {levels[req_id]!r}"
        assert requirement, f"row {req_id}: empty requirement"
        assert len(requirement) <= MAX_REQUIREMENT_CHARS, f"row {req_id}: requirement too long"


def test_each_row_cites_tests_or_gives_a_reason() -> None:
    for req_id, _, _, covered_by in table_rows():
        if covered_by.startswith(("n/a:", "NOT COVERED:")):
            assert covered_by.split(":", 1)[1].strip(), f"row {req_id}: give the reason"
        else:
            assert CITATION.match(covered_by), f"row {req_id}: cite tests/file.py::test_name"


def test_cited_tests_exist() -> None:
    problems = []
    for req_id, _, _, covered_by in table_rows():
        for path, name in CITATION.findall(covered_by):
            if not (ROOT / path).is_file():
                problems.append(f"row {req_id}: no file {path}")
            elif name not in defined_tests(path):
                problems.append(f"row {req_id}: {path} defines no `def {name}`")
    assert not problems, "\n".join(problems)


def test_no_shall_requirement_is_left_uncovered() -> None:
    uncovered = [
        req_id
        for req_id, level, _, covered_by in table_rows()
        if level in BINDING and covered_by.startswith("NOT COVERED")
    ]
    assert not uncovered, f"SHALL/SHALL NOT requirements NOT COVERED by any test: {uncovered}"
