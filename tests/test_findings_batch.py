"""`cxr-cds findings --csv / --jsonl`: CheXpert-format batch labelling, as a researcher runs it."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cds_service.cli import main
from cds_service.findings import batch
from cds_service.findings.batch import (
    BatchError,
    Report,
    label_reports,
    read_csv,
    read_jsonl,
    write_csv,
)
from cds_service.findings.labeler import label_report
from cds_service.findings.observations import Observation

CLI = [sys.executable, "-m", "cds_service.cli"]
ROOT = Path(__file__).resolve().parent.parent
EVAL_SET = ROOT / "tests" / "data" / "labeler" / "eval.jsonl"

# stanfordmlgroup/chexpert-labeler: constants.CATEGORIES after "Reports", in this order.
CHEXPERT_HEADER = [
    "Reports",
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Lesion",
    "Lung Opacity",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]
CELL = {"positive": "1", "negative": "0", "uncertain": "-1", "not_mentioned": ""}
PTX = CHEXPERT_HEADER.index("Pneumothorax")
EFFUSION = CHEXPERT_HEADER.index("Pleural Effusion")

TEXTS = [
    "Large right pneumothorax.",
    "No pleural effusion.",
    "FINDINGS: Heart size is enlarged.\nMild interstitial edema, possibly early pneumonia.",
    'Lines and tubes: "ET tube" 4 cm above the carina, NG tube in the stomach.',
]


def expected_cells(text: str) -> list[str]:
    """What the output must hold for a text: derived from label_report, not hard-coded."""
    if not text.strip():
        return [""] * 14
    labels = label_report(text)
    return [CELL[labels[obs].label.value] for obs in Observation]


def expected_labels(text: str) -> dict[str, str]:
    if not text.strip():
        return {obs.value: "not_mentioned" for obs in Observation}
    return {obs.value: item.label.value for obs, item in label_report(text).items()}


def write_rows(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    return path


def read_rows(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(["findings", *args])
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status: int, err: str, *fragments: str) -> None:
    assert status == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -- CSV ------------------------------------------------------------------------------------
def test_headerless_csv_to_chexpert_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_rows(tmp_path / "reports.csv", [[text] for text in TEXTS])
    output = tmp_path / "labeled.csv"
    status, out, err = run_cli(["--csv", str(source), "-o", str(output)], capsys)
    assert status == 0, err
    assert out == ""
    assert f"{len(TEXTS)} reports labelled" in err
    rows = read_rows(output)
    assert rows[0] == CHEXPERT_HEADER
    assert output.read_text(encoding="utf-8").startswith(",".join(CHEXPERT_HEADER) + "\n")
    assert [row[0] for row in rows[1:]] == TEXTS  # the report text as given, newlines and all
    for text, row in zip(TEXTS, rows[1:], strict=True):
        assert row[1:] == expected_cells(text)
        assert set(row[1:]) <= {"1", "0", "-1", ""}
    assert rows[1][PTX] == "1"  # "Large right pneumothorax."
    assert rows[2][EFFUSION] == "0"  # "No pleural effusion."


def test_headerless_csv_blank_lines_empty_cells_and_extra_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "reports.csv"
    # a blank line (skipped, as pandas does), an empty quoted cell and a whitespace-only one
    # (rows of blanks), and a second column (ignored: the report is the first field).
    source.write_text(
        '"Large right pneumothorax.",ignored\n\n""\n"   "\nNo pleural effusion.\n',
        encoding="utf-8",
    )
    status, out, err = run_cli(["--csv", str(source)], capsys)
    assert status == 0, err
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == CHEXPERT_HEADER
    assert [row[0] for row in rows[1:]] == [
        "Large right pneumothorax.",
        "",
        "   ",
        "No pleural effusion.",
    ]
    assert rows[1][PTX] == "1"
    assert rows[2][1:] == [""] * 14
    assert rows[3][1:] == [""] * 14
    assert rows[4][EFFUSION] == "0"
    assert "4 reports labelled (2 empty)" in err


def test_csv_with_header_column_and_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [["study_id", "site", "report_text"]]
    rows += [[f"S{i}", "north", text] for i, text in enumerate(TEXTS)]
    rows.append(["S-empty", "north", ""])
    source = write_rows(tmp_path / "reports.csv", rows)
    output = tmp_path / "labeled.csv"
    args = ["--csv", str(source), "--column", "report_text", "--id-column", "study_id"]
    status, _, err = run_cli([*args, "-o", str(output)], capsys)
    assert status == 0, err
    got = read_rows(output)
    assert got[0] == ["study_id", *CHEXPERT_HEADER]  # other columns dropped; join on the id
    assert [row[0] for row in got[1:]] == [f"S{i}" for i in range(len(TEXTS))] + ["S-empty"]
    for text, row in zip([*TEXTS, ""], got[1:], strict=True):
        assert row[1] == text
        assert row[2:] == expected_cells(text)
    assert got[1][1 + PTX] == "1"


def test_csv_with_header_column_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_rows(tmp_path / "r.csv", [["id", "text"], ["1", TEXTS[1]]])
    status, out, err = run_cli(["--csv", str(source), "--column", "text", "-o", "-"], capsys)
    assert status == 0, err
    rows = list(csv.reader(io.StringIO(out)))
    assert rows == [CHEXPERT_HEADER, [TEXTS[1], *expected_cells(TEXTS[1])]]


def test_csv_utf8_bom_crlf_and_lone_cr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Excel writes a byte-order mark and CRLF; old Mac exports end lines with a lone CR.
    crlf = tmp_path / "excel.csv"
    crlf.write_bytes(b'\xef\xbb\xbfid,text\r\n1,No pleural effusion.\r\n2,"two\r\nlines"\r\n')
    status, out, err = run_cli(
        ["--csv", str(crlf), "--column", "text", "--id-column", "id"], capsys
    )
    assert status == 0, err
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0][0] == "id"
    assert [row[:2] for row in rows[1:]] == [["1", "No pleural effusion."], ["2", "two\r\nlines"]]
    mac = tmp_path / "mac.csv"
    mac.write_bytes(b"Large right pneumothorax.\rNo pleural effusion.\r")
    status, out, err = run_cli(["--csv", str(mac)], capsys)
    assert status == 0, err
    rows = list(csv.reader(io.StringIO(out)))
    assert [row[0] for row in rows[1:]] == ["Large right pneumothorax.", "No pleural effusion."]


def test_csv_field_larger_than_the_csv_module_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long_report = "Large right pneumothorax. " + "The bones are intact. " * 10_000  # ~220 KB
    assert len(long_report) > 131_072
    source = write_rows(tmp_path / "big.csv", [[long_report], [TEXTS[1]]])
    status, out, err = run_cli(["--csv", str(source)], capsys)
    assert status == 0, err
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[1][0] == long_report
    assert rows[1][1:] == expected_cells(long_report)
    assert rows[2][EFFUSION] == "0"


# -- JSON Lines -----------------------------------------------------------------------------
def test_jsonl_in_and_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "reports.jsonl"
    lines = [json.dumps({"id": f"r{i}", "text": text}) for i, text in enumerate(TEXTS)]
    lines.insert(1, "")  # blank lines are skipped
    lines.append(json.dumps({"id": 7, "text": None}))  # null text: an empty report
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    output = tmp_path / "labeled.jsonl"
    status, _, err = run_cli(
        ["--jsonl", str(source), "--id-column", "id", "-o", str(output)], capsys
    )
    assert status == 0, err
    assert f"{len(TEXTS) + 1} reports labelled (1 empty)" in err
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == [f"r{i}" for i in range(len(TEXTS))] + [7]
    for text, record in zip([*TEXTS, ""], records, strict=True):
        assert list(record) == ["id", "text", "labels"]
        assert record["text"] == text
        assert list(record["labels"]) == [obs.value for obs in Observation]
        assert record["labels"] == expected_labels(text)
    assert records[0]["labels"]["Pneumothorax"] == "positive"
    assert records[1]["labels"]["Pleural Effusion"] == "negative"


def test_jsonl_plain_strings_custom_field_and_csv_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    strings = tmp_path / "strings.jsonl"
    strings.write_text("\n".join(json.dumps(t) for t in TEXTS[:2]) + "\n", encoding="utf-8")
    status, out, err = run_cli(["--jsonl", str(strings)], capsys)
    assert status == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [list(r) for r in records] == [["text", "labels"]] * 2  # no id asked for, none given

    custom = tmp_path / "custom.jsonl"
    custom.write_text(
        "\n".join(json.dumps({"rid": i, "impression": t}) for i, t in enumerate(TEXTS)) + "\n",
        encoding="utf-8",
    )
    args = ["--jsonl", str(custom), "--column", "impression", "--id-column", "rid"]
    status, out, err = run_cli([*args, "--output-format", "csv"], capsys)
    assert status == 0, err
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["rid", *CHEXPERT_HEADER]
    assert [row[0] for row in rows[1:]] == [str(i) for i in range(len(TEXTS))]
    for text, row in zip(TEXTS, rows[1:], strict=True):
        assert row[1:] == [text, *expected_cells(text)]


def test_csv_in_jsonl_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_rows(tmp_path / "r.csv", [["id", "text"], ["a", TEXTS[0]], ["b", TEXTS[1]]])
    args = ["--csv", str(source), "--column", "text", "--id-column", "id"]
    status, out, err = run_cli([*args, "--output-format", "jsonl"], capsys)
    assert status == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert records == [
        {"id": "a", "text": TEXTS[0], "labels": expected_labels(TEXTS[0])},
        {"id": "b", "text": TEXTS[1], "labels": expected_labels(TEXTS[1])},
    ]


# -- processes, stdin/stdout, the library -----------------------------------------------------
def eval_texts(count: int) -> list[str]:
    texts = [json.loads(line)["text"] for line in EVAL_SET.read_text(encoding="utf-8").splitlines()]
    return (texts * (count // len(texts) + 1))[:count]


def test_jobs_keep_input_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    texts = eval_texts(700)  # several 64-report chunks per process, more than the window
    source = write_rows(tmp_path / "eval.csv", [[text] for text in texts])
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    assert run_cli(["--csv", str(source), "-o", str(one)], capsys)[0] == 0
    status, _, err = run_cli(["--csv", str(source), "--jobs", "2", "-o", str(two)], capsys)
    assert status == 0, err
    assert two.read_bytes() == one.read_bytes()
    rows = read_rows(two)
    assert [row[0] for row in rows[1:]] == texts
    for text, row in list(zip(texts, rows[1:], strict=True))[:50]:
        assert row[1:] == expected_cells(text)


def test_jobs_from_a_threaded_process_do_not_fork(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # With another thread alive (a web server, a notebook) the pool uses forkserver or spawn.
    texts = eval_texts(150)
    source = write_rows(tmp_path / "eval.csv", [[text] for text in texts])
    stop = threading.Event()
    waiter = threading.Thread(target=stop.wait, daemon=True)
    waiter.start()
    try:
        assert batch._start_method() != "fork"
        status, out, err = run_cli(["--csv", str(source), "--jobs", "2"], capsys)
    finally:
        stop.set()
        waiter.join()
    assert status == 0, err
    rows = list(csv.reader(io.StringIO(out)))
    assert [row[0] for row in rows[1:]] == texts
    assert [row[1:] for row in rows[1:6]] == [expected_cells(text) for text in texts[:5]]


def test_stdin_to_stdout_as_a_subprocess(tmp_path: Path) -> None:
    stdin = "".join(f'"{text}"\n' for text in TEXTS[:2])
    run = subprocess.run(
        [*CLI, "findings", "--csv", "-"],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    rows = list(csv.reader(io.StringIO(run.stdout)))
    assert rows[0] == CHEXPERT_HEADER
    assert rows[1][PTX] == "1" and rows[2][EFFUSION] == "0"
    [summary] = run.stderr.splitlines()  # progress and summary go to stderr, one line here
    assert summary.startswith("2 reports labelled")

    bad = subprocess.run(
        [*CLI, "findings", "--jsonl", "-"],
        input='{"text": "No effusion."}\n{"text": \n',
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error: standard input line 2: not valid JSON")
    assert "Traceback" not in bad.stderr


def test_library_from_a_repl() -> None:
    source = io.BytesIO(b"id,text\nx1,Large right pneumothorax.\n")
    reports = list(read_csv(source, column="text", id_column="id", name="mem.csv"))
    assert reports == [Report("Large right pneumothorax.", "x1", 2)]
    out = io.StringIO()
    assert write_csv(label_reports(reports), out, id_column="id") == 1
    assert out.getvalue().splitlines()[1].split(",")[1 + PTX] == "1"
    jsonl = list(read_jsonl(io.BytesIO(b'"No pleural effusion."\n')))
    assert jsonl == [Report("No pleural effusion.", None, 1)]
    with pytest.raises(BatchError, match=r"mem.csv line 3: not UTF-8"):
        list(read_csv(io.BytesIO(b"ok\nok\n\xff\n"), name="mem.csv"))


# -- bad input: one line, exit status 2, no traceback, no output file ------------------------
def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "labeled.csv"
    missing = tmp_path / "nope.csv"
    status, out, err = run_cli(["--csv", str(missing), "-o", str(output)], capsys)
    assert_one_line_error(status, err, "cannot read", "nope.csv", "No such file")
    assert not output.exists() and out == ""
    status, _, err = run_cli(["--jsonl", str(tmp_path)], capsys)
    assert_one_line_error(status, err, "cannot read", "directory")


def test_column_not_in_header(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_rows(tmp_path / "r.csv", [["id", "report"], ["1", "No effusion."]])
    status, out, err = run_cli(["--csv", str(source), "--column", "text"], capsys)
    assert_one_line_error(status, err, "no column 'text'", "'id', 'report'")
    assert out == ""
    args = ["--csv", str(source), "--column", "report", "--id-column", "study"]
    status, _, err = run_cli(args, capsys)
    assert_one_line_error(status, err, "no column 'study'")


def test_non_utf8_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "latin1.csv"
    source.write_bytes(b'No effusion.\nNo pneumothorax.\n"Cardiom\xe9galie."\n')
    output = tmp_path / "labeled.csv"
    output.write_text("a previous good run\n", encoding="utf-8")
    status, _, err = run_cli(["--csv", str(source), "-o", str(output)], capsys)
    assert_one_line_error(status, err, "latin1.csv line 3", "not UTF-8", "0xe9")
    assert output.read_text(encoding="utf-8") == "a previous good run\n"  # left as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labeled.csv", "latin1.csv"]

    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n\n{"text": "\xe9"}\n')
    status, _, err = run_cli(["--jsonl", str(jsonl)], capsys)
    assert_one_line_error(status, err, "latin1.jsonl line 3", "not UTF-8")


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ('{"text": "ok"}\n{"text": "unterminated\n', ("line 2", "not valid JSON")),
        (
            '{"text": "ok"}\n\n[1, 2]\n',
            ("line 3", "expected a JSON object or string, got an array"),
        ),
        ('{"report": "ok"}\n', ("line 1", "no 'text' field")),
        ('{"text": 42}\n', ("line 1", "'text' is a number, not a string")),
    ],
)
def test_malformed_jsonl_names_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, fragments: tuple[str, ...]
) -> None:
    source = tmp_path / "r.jsonl"
    source.write_text(content, encoding="utf-8")
    output = tmp_path / "out.jsonl"
    status, _, err = run_cli(["--jsonl", str(source), "-o", str(output)], capsys)
    assert_one_line_error(status, err, "r.jsonl", *fragments)
    assert not output.exists()


def test_jsonl_id_field_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "r.jsonl"
    source.write_text('{"id": 1, "text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    status, _, err = run_cli(["--jsonl", str(source), "--id-column", "id"], capsys)
    assert_one_line_error(status, err, "line 2", "no 'id' field")


@pytest.mark.parametrize(
    ("name", "content", "args", "fragment"),
    [
        ("empty.csv", "", [], "no reports"),
        ("blank.csv", "\n\n", [], "no reports"),
        ("empty.csv", "", ["--column", "text"], "is empty"),
        ("header.csv", "id,text\n", ["--column", "text"], "no reports"),
        ("empty.jsonl", "\n  \n", [], "no reports"),
    ],
)
def test_empty_input(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    content: str,
    args: list[str],
    fragment: str,
) -> None:
    source = tmp_path / name
    source.write_text(content, encoding="utf-8")
    flag = "--jsonl" if name.endswith(".jsonl") else "--csv"
    output = tmp_path / "out"
    status, out, err = run_cli([flag, str(source), *args, "-o", str(output)], capsys)
    assert_one_line_error(status, err, name, fragment)
    assert out == "" and not output.exists()


def test_broken_csv_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    unclosed = tmp_path / "unclosed.csv"
    unclosed.write_text('ok\n"never closed\nmore text\n', encoding="utf-8")
    status, _, err = run_cli(["--csv", str(unclosed)], capsys)
    assert_one_line_error(status, err, "unclosed.csv line 2", "never closed")

    short = tmp_path / "short.csv"
    short.write_text("text,id\nNo effusion.,1\nNo pneumothorax.\n", encoding="utf-8")
    args = ["--csv", str(short), "--column", "text", "--id-column", "id"]
    status, _, err = run_cli(args, capsys)
    assert_one_line_error(status, err, "short.csv line 3", "1 field(s)")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--csv", "r.csv", "--id-column", "id"], "--id-column needs --column"),
        (["--csv", "r.csv", "--json"], "--json and --all are for one report"),
        (["--csv", "r.csv", "--jobs", "-1"], "--jobs"),
        (["-o", "out.csv"], "--output: only with --csv FILE or --jsonl FILE"),
        (["--column", "text"], "--column: only with --csv FILE or --jsonl FILE"),
    ],
)
def test_bad_option_combinations(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    fragment: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    write_rows(tmp_path / "r.csv", [["No effusion."]])
    status, out, err = run_cli(args, capsys)
    assert_one_line_error(status, err, fragment)
    assert out == "" and not (tmp_path / "out.csv").exists()


def test_unwritable_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_rows(tmp_path / "r.csv", [["No effusion."]])
    target = tmp_path / "no-such-dir" / "labeled.csv"
    status, _, err = run_cli(["--csv", str(source), "-o", str(target)], capsys)
    assert_one_line_error(status, err, "cannot write", "labeled.csv")


def test_single_report_mode_unchanged(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Large right pneumothorax."))
    status, out, _ = run_cli(["--json"], capsys)
    assert status == 0
    assert json.loads(out)["Pneumothorax"]["label"] == "positive"
    monkeypatch.setattr(sys, "stdin", io.StringIO("   "))
    status, _, err = run_cli([], capsys)
    assert_one_line_error(status, err, "standard input")
