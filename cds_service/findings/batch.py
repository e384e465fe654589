"""Batch labelling: CSV or JSON Lines reports in, CheXpert-format CSV or JSON Lines labels out."""

# Input and output formats (README "Batch labelling"):
# - CSV in: headerless, the report in the first column (what stanfordmlgroup/chexpert-labeler
#   reads); or, with ``column``, a header row and the report in that column, optionally an
#   id carried through from ``id_column``. Blank lines are skipped (as pandas does there).
# - CSV out: CheXpert's header, ``Reports`` then the 14 observations in CheXpert's order
#   (preceded by the id column when one is carried), values 1 / 0 / -1 / blank for positive /
#   negative / uncertain / not mentioned. (The CheXpert labeler writes them through pandas as
#   1.0 / 0.0 / -1.0; pandas and numpy read both spellings as the same numbers.)
# - JSON Lines in: one JSON object a line with the report in ``field`` ("text"), or one JSON
#   string a line; blank lines skipped. JSON Lines out: {"id"?, "text", "labels"} with all 14
#   observations named as label values, the layout of tests/data/labeler/eval.jsonl.
# Everything streams: one record at a time in, one row at a time out (with ``jobs`` > 1, a
# bounded window of chunks is in flight, in order). Bad input raises BatchError whose message
# names the file and the line.

from __future__ import annotations

import csv
import itertools
import json
import multiprocessing
import os
import re
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.pool import AsyncResult
from pathlib import Path
from typing import IO, Literal, TextIO

from cds_service.findings.labeler import label_report
from cds_service.findings.observations import Label, Observation

__all__ = [
    "CHEXPERT_VALUES",
    "BatchError",
    "BatchSummary",
    "LabelledReport",
    "Report",
    "chexpert_value",
    "csv_header",
    "label_file",
    "label_reports",
    "label_text",
    "read_csv",
    "read_jsonl",
    "write_csv",
    "write_jsonl",
]

Format = Literal["csv", "jsonl"]
Source = str | os.PathLike[str] | IO[bytes]
Destination = str | os.PathLike[str] | TextIO
JsonId = str | int | float | bool | None

OBSERVATIONS: tuple[Observation, ...] = tuple(Observation)
REPORTS_COLUMN = "Reports"  # CheXpert's name for the report text column
DEFAULT_JSONL_FIELD = "text"
CHEXPERT_VALUES: dict[Label, str] = {
    Label.POSITIVE: "1",
    Label.NEGATIVE: "0",
    Label.UNCERTAIN: "-1",
    Label.NOT_MENTIONED: "",
}
_NOTHING = dict.fromkeys(OBSERVATIONS, Label.NOT_MENTIONED)
_BOM = b"\xef\xbb\xbf"
_LONE_CR = re.compile(rb"(?<=\r)(?!\n)")  # after a \r that is not part of \r\n
_MISSING = object()


class BatchError(ValueError):
    """Bad batch input or an output that cannot be written; the message says where."""


@dataclass(frozen=True, slots=True)
class Report:
    """One report of a batch: its text, the id carried with it, the input line it starts on."""

    text: str
    id: JsonId = None
    line: int = 0


@dataclass(frozen=True, slots=True)
class LabelledReport:
    """A report and its label for each of the 14 observations (in CheXpert's order)."""

    report: Report
    labels: dict[Observation, Label]


@dataclass(frozen=True, slots=True)
class BatchSummary:
    reports: int  # rows written
    empty: int  # of which had no report text (all blank)
    seconds: float


# -- labelling ------------------------------------------------------------------------------
def label_text(text: str) -> dict[Observation, Label]:
    """The label of every observation for one report; an empty report mentions nothing."""
    if not text.strip():
        return dict(_NOTHING)
    return {obs: item.label for obs, item in label_report(text).items()}


def _label_chunk(texts: list[str]) -> list[tuple[Label, ...]]:
    """Worker side of ``label_reports(jobs=N)``: labels in OBSERVATIONS order, per text."""
    out: list[tuple[Label, ...]] = []
    for text in texts:
        labels = label_text(text)
        out.append(tuple(labels[obs] for obs in OBSERVATIONS))
    return out


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _start_method() -> str:
    """fork (fast) from a single-threaded process; else forkserver or spawn, since forking a
    process whose other threads hold locks (a test runner, a web server) can deadlock."""
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


def label_reports(
    reports: Iterable[Report], *, jobs: int = 1, chunk_size: int = 64
) -> Iterator[LabelledReport]:
    """Label reports in input order; ``jobs`` > 1 uses that many processes (0: every CPU).

    With processes, at most 4 chunks of ``chunk_size`` reports per process are in flight, so
    a large input is never read ahead much further than it is written.
    """
    if jobs < 0:
        raise ValueError("jobs must be 0 (every CPU) or more")
    workers = usable_cpus() if jobs == 0 else jobs
    if workers <= 1:
        for report in reports:
            yield LabelledReport(report, label_text(report.text))
        return
    window = 4 * workers
    pending: deque[tuple[list[Report], AsyncResult[list[tuple[Label, ...]]]]] = deque()
    with multiprocessing.get_context(_start_method()).Pool(workers) as pool:
        chunk: list[Report] = []
        for report in reports:
            chunk.append(report)
            if len(chunk) >= chunk_size:
                pending.append((chunk, pool.apply_async(_label_chunk, ([r.text for r in chunk],))))
                chunk = []
                if len(pending) >= window:
                    yield from _collect(*pending.popleft())
        if chunk:
            pending.append((chunk, pool.apply_async(_label_chunk, ([r.text for r in chunk],))))
        while pending:
            yield from _collect(*pending.popleft())


def _collect(
    chunk: list[Report], result: AsyncResult[list[tuple[Label, ...]]]
) -> Iterator[LabelledReport]:
    for report, labels in zip(chunk, result.get(), strict=True):
        yield LabelledReport(report, dict(zip(OBSERVATIONS, labels, strict=True)))


# -- reading --------------------------------------------------------------------------------
def _source_name(source: Source) -> str:
    if isinstance(source, str | os.PathLike):
        return os.fsdecode(source)
    return str(getattr(source, "name", "input"))


@contextmanager
def _opened(source: Source, name: str) -> Iterator[IO[bytes]]:
    if isinstance(source, str | os.PathLike):
        try:
            handle = open(source, "rb")  # noqa: SIM115 (closed by the with below)
        except OSError as exc:
            raise BatchError(f"cannot read {name}: {exc.strerror or exc}") from None
        with handle:
            yield handle
    else:
        yield source


def _lines(stream: IO[bytes], name: str) -> Iterator[tuple[int, str]]:
    """(line number, line with its ending) of UTF-8 input: \\n, \\r\\n or \\r line endings,
    a leading byte-order mark dropped, anything that is not UTF-8 a BatchError naming the line.
    """
    number = 0
    first = True
    for raw in stream:
        if first:
            raw = raw.removeprefix(_BOM)
            first = False
        pieces = _LONE_CR.split(raw) if b"\r" in raw and _LONE_CR.search(raw) else (raw,)
        for piece in pieces:
            if not piece:
                continue
            number += 1
            try:
                yield number, piece.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BatchError(
                    f"{name} line {number}: not UTF-8 (byte 0x{piece[exc.start]:02x} at "
                    f"byte {exc.start + 1} of the line); save the file as UTF-8"
                ) from None


def _allow_large_fields() -> None:
    # A report can be longer than the csv module's default 128 KiB field limit.
    limit = min(sys.maxsize, 2**31 - 1)
    if csv.field_size_limit() < limit:
        csv.field_size_limit(limit)


def _column_index(header: list[str], column: str, name: str) -> int:
    try:
        return header.index(column)
    except ValueError:
        shown = ", ".join(repr(c) for c in header[:20]) + (", ..." if len(header) > 20 else "")
        raise BatchError(
            f"{name}: no column {column!r} in the header row (columns: {shown})"
        ) from None


def read_csv(
    source: Source,
    *,
    column: str | None = None,
    id_column: str | None = None,
    name: str | None = None,
) -> Iterator[Report]:
    """The reports of a CSV file (a path or a binary stream), one at a time.

    Without ``column`` the file has no header and each row's first field is the report (the
    CheXpert labeler's input); with it, the first row is a header and ``column`` names the
    report, ``id_column`` an id to carry through.
    """
    if id_column is not None and column is None:
        raise ValueError("id_column needs column: an id is found by name in a header row")
    label = name or _source_name(source)
    _allow_large_fields()
    with _opened(source, label) as stream:
        reader = csv.reader((line for _, line in _lines(stream, label)), strict=True)
        start = 1  # the line the next record starts on
        try:
            text_at, id_at = 0, None
            if column is not None:
                header = next(reader, None)
                if header is None:
                    raise BatchError(f"{label} is empty: expected a header row naming {column!r}")
                text_at = _column_index(header, column, label)
                if id_column is not None:
                    id_at = _column_index(header, id_column, label)
                start = reader.line_num + 1
            needed = max(text_at, -1 if id_at is None else id_at) + 1
            for row in reader:
                if row:
                    if len(row) < needed:
                        raise BatchError(
                            f"{label} line {start}: {len(row)} field(s) where the header has "
                            f"{needed} or more (a missing comma or quote?)"
                        )
                    yield Report(row[text_at], None if id_at is None else row[id_at], start)
                start = reader.line_num + 1
        except csv.Error as exc:
            if "unexpected end of data" in str(exc):
                raise BatchError(
                    f"{label} line {start}: a quoted field that is never closed"
                ) from None
            raise BatchError(f"{label} line {reader.line_num}: {exc}") from None


def _json_kind(value: object) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return kinds.get(type(value), "a number")


def read_jsonl(
    source: Source,
    *,
    field: str = DEFAULT_JSONL_FIELD,
    id_field: str | None = None,
    name: str | None = None,
) -> Iterator[Report]:
    """The reports of a JSON Lines file (a path or a binary stream), one at a time.

    Each non-blank line is an object with the report in ``field`` (a string; null counts as
    an empty report) and, with ``id_field``, an id (string, number or null); or a JSON string,
    the report itself (then no ``id_field``).
    """
    label = name or _source_name(source)
    with _opened(source, label) as stream:
        for number, line in _lines(stream, label):
            if not line.strip():
                continue
            where = f"{label} line {number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BatchError(
                    f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            ident: JsonId = None
            if isinstance(value, str):
                if id_field is not None:
                    raise BatchError(f"{where}: a plain string has no {id_field!r} field")
                text = value
            elif isinstance(value, dict):
                raw = value.get(field, _MISSING)
                if raw is _MISSING:
                    raise BatchError(f"{where}: no {field!r} field")
                if raw is None:
                    raw = ""
                if not isinstance(raw, str):
                    raise BatchError(f"{where}: {field!r} is {_json_kind(raw)}, not a string")
                text = raw
                if id_field is not None:
                    found = value.get(id_field, _MISSING)
                    if found is _MISSING:
                        raise BatchError(f"{where}: no {id_field!r} field")
                    if isinstance(found, dict | list):
                        raise BatchError(
                            f"{where}: {id_field!r} is {_json_kind(found)}; "
                            "an id is a string or a number"
                        )
                    ident = found
            else:
                raise BatchError(
                    f"{where}: expected a JSON object or string, got {_json_kind(value)}"
                )
            yield Report(text, ident, number)


# -- writing --------------------------------------------------------------------------------
def chexpert_value(label: Label) -> str:
    """CheXpert's cell for a label: 1, 0, -1, or blank when not mentioned."""
    return CHEXPERT_VALUES[label]


def csv_header(id_column: str | None = None) -> list[str]:
    """The CheXpert labeler's header, after the id column when one is carried."""
    head = [REPORTS_COLUMN, *(obs.value for obs in OBSERVATIONS)]
    return head if id_column is None else [id_column, *head]


def _id_cell(value: JsonId) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def write_csv(items: Iterable[LabelledReport], out: TextIO, *, id_column: str | None = None) -> int:
    """Write CheXpert-format rows (header first) to a text stream; the number of rows."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(csv_header(id_column))
    count = 0
    for item in items:
        row = [item.report.text, *(CHEXPERT_VALUES[item.labels[obs]] for obs in OBSERVATIONS)]
        writer.writerow(row if id_column is None else [_id_cell(item.report.id), *row])
        count += 1
    return count


def write_jsonl(items: Iterable[LabelledReport], out: TextIO, *, with_id: bool = False) -> int:
    """Write {"id"?, "text", "labels"} lines to a text stream; the number of lines."""
    count = 0
    for item in items:
        record: dict[str, object] = {}
        if with_id:
            record["id"] = item.report.id
        record["text"] = item.report.text
        record["labels"] = {obs.value: item.labels[obs].value for obs in OBSERVATIONS}
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        count += 1
    return count


@contextmanager
def _output(destination: Destination) -> Iterator[TextIO]:
    """A text stream; a path is written under a temporary name and renamed when complete,
    so a failed run never leaves a partial file (or replaces a good one)."""
    if not isinstance(destination, str | os.PathLike):
        yield destination
        return
    path = Path(destination)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        handle = open(temporary, "x", encoding="utf-8", newline="")  # noqa: SIM115
    except OSError as exc:
        raise BatchError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with handle:
            yield handle
        os.replace(temporary, path)
    except BaseException:
        with suppress(OSError):
            temporary.unlink()
        raise


def label_file(
    source: Source,
    destination: Destination,
    *,
    input_format: Format = "csv",
    output_format: Format | None = None,
    column: str | None = None,
    id_column: str | None = None,
    jobs: int = 1,
    name: str | None = None,
    progress: Callable[[int], None] | None = None,
    progress_every: int = 10_000,
) -> BatchSummary:
    """Label every report of ``source`` into ``destination`` (a path or a text stream).

    ``input_format`` "csv" reads as read_csv (``column``/``id_column``), "jsonl" as read_jsonl
    (``column`` is the text field, default "text"; ``id_column`` the id field); the output is
    in ``output_format`` (default: the input's). Raises BatchError on bad input, an empty
    input included; a path destination is then left as it was.
    """
    label = name or _source_name(source)
    reports: Iterator[Report]
    if input_format == "csv":
        reports = read_csv(source, column=column, id_column=id_column, name=label)
    else:
        field = DEFAULT_JSONL_FIELD if column is None else column
        reports = read_jsonl(source, field=field, id_field=id_column, name=label)
    started = time.perf_counter()
    first = next(reports, None)  # bad or empty input fails before any output is written
    if first is None:
        raise BatchError(f"{label}: no reports")
    empty = 0

    def counted(items: Iterator[Report]) -> Iterator[Report]:
        nonlocal empty
        for count, report in enumerate(items, 1):
            empty += not report.text.strip()
            if progress is not None and count % progress_every == 0:
                progress(count)
            yield report

    labelled = label_reports(counted(itertools.chain((first,), reports)), jobs=jobs)
    with _output(destination) as out:
        if (output_format or input_format) == "csv":
            written = write_csv(labelled, out, id_column=id_column)
        else:
            written = write_jsonl(labelled, out, with_id=id_column is not None)
        out.flush()
    return BatchSummary(written, empty, time.perf_counter() - started)
