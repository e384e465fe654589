"""make-tiny -> info -> analyze (text, json, fhir) with the tiny backend; fetch offline;
the registry's model_info and load_report_writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cds_service.config import Settings
from cds_service.errors import ConfigurationError
from cds_service.inference.base import ReportRequest
from cds_service.inference.cxr_llava import writer as writer_module
from cds_service.inference.cxr_llava.writer import TINY_BANNER
from cds_service.inference.model_cli import main
from cds_service.inference.registry import load_report_writer, model_info

PNG = Path(__file__).parent / "data" / "nih-cxr14-00000001_000-cardiomegaly.png"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


PUBLISHED_FILES = (
    "config.json", "generation_config.json", "model.safetensors.index.json",
    "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
    "model-00003-of-00003.safetensors", "tokenizer.model", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
)  # fmt: skip


def test_make_tiny_writes_the_published_file_set(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    assert all((tiny_dir / name).is_file() for name in PUBLISHED_FILES)
    assert not list(tiny_dir.glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)  # the tokenizer.json is usable
    assert tokenizer.decode(tokenizer.encode("pleural effusion", add_special_tokens=False)) == (
        "pleural effusion"
    )


def test_info_names_the_tiny_model_and_its_hash(
    tiny_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(capsys, "model", "info", str(tiny_dir), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["tiny_random"] is True and "meaningless" in info["model_id"]
    assert info["dtype"] == "BF16" or "bf16" in info["dtype"].lower()
    assert info["parameters"] > 100_000 and len(info["sha256"]) == 64
    code, out, _ = _run(capsys, "model", "info", str(tiny_dir))
    assert "tiny random model, meaningless" in out


def test_make_tiny_then_analyze_text_json_fhir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The random model seldom ends a text within 6 tokens; here its texts count as whole.
    monkeypatch.setattr(writer_module, "hit_token_limit", lambda *_: False)
    folder = tmp_path / "tiny"
    assert _run(capsys, "model", "make-tiny", str(folder))[0] == 0
    common = ["analyze", str(PNG), "--backend", "tiny", "--model-dir", str(folder)]
    common += ["--max-new-tokens", "6", "--device", "cpu"]
    code, out, err = _run(capsys, *common)
    assert code == 0
    assert "AI-GENERATED, PRELIMINARY" in out and TINY_BANNER in out
    assert "meaningless" in out and "reading" in err
    code, out, _ = _run(capsys, *common, "--format", "json", "--task", "differential")
    payload = json.loads(out)
    assert payload["report"].startswith(TINY_BANNER) and payload["model"]["simulated"] is True
    assert payload["task"] == "differential" and "findings" not in payload
    code, out, _ = _run(capsys, *common, "--format", "json")
    assert isinstance(json.loads(out)["findings"], list)  # a report is coded
    code, out, _ = _run(capsys, *common, "--format", "fhir", "--patient", "p1")
    bundle = json.loads(out)
    resources = [e["resource"] for e in bundle["entry"]]
    assert bundle["type"] == "transaction"
    report = next(r for r in resources if r["resourceType"] == "DiagnosticReport")
    assert report["subject"]["reference"] == "Patient/p1"
    assert "SIMULATED" in json.dumps(report)
    device = next(r for r in resources if r["resourceType"] == "Device")
    assert "meaningless" in json.dumps(device)


def test_analyze_refuses_bad_input_cleanly(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    code, out, err = _run(capsys, "analyze", str(junk), "--backend", "tiny")
    assert code == 2 and "cannot analyse" in err and out == ""
    code, _, err = _run(capsys, "analyze", str(PNG), "--backend", "tiny", "--task", "ask")
    assert code == 2 and "question" in err
    args = ["analyze", str(PNG), "--backend", "tiny", "--model-dir", str(tiny_dir)]
    code, _, err = _run(capsys, *args, "--max-new-tokens", "2", "--format", "fhir")
    assert code == 2 and "--patient" in err


def test_analyze_files_fhir_and_codes_findings_for_reports_only(
    tiny_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import cds_service.findings.to_findings as to_findings

    def no_coding(text: str) -> object:
        raise AssertionError("a differential or an answer must not be coded as findings")

    monkeypatch.setattr(to_findings, "findings_from_report", no_coding)
    args = ["analyze", str(PNG), "--backend", "tiny", "--model-dir", str(tiny_dir)]
    args += ["--max-new-tokens", "2", "--device", "cpu"]
    for task in (["--task", "differential"], ["--task", "ask", "--question", "Effusion?"]):
        code, out, err = _run(capsys, *args, *task, "--format", "fhir", "--patient", "p1")
        assert code == 2 and out == "" and "--task" in err and "Traceback" not in err
        code, out, _ = _run(capsys, *args, *task, "--format", "json")
        payload = json.loads(out)
        assert code == 0 and "findings" not in payload and "report only" in payload["findings_note"]


def test_fetch_prints_the_licence_and_fails_cleanly_offline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, out, err = _run(capsys, "model", "fetch", "--dir", str(tmp_path / "m"))
    assert code == 1
    assert "CC BY-NC 4.0" in out and "Llama 2" in out and "research use only" in out
    assert "b2224786bb90d54b1e1291171866706cfbb44e2b" in out
    assert "download failed" in err and "Traceback" not in err


def test_registry_model_info_and_writer(tiny_dir: Path) -> None:
    settings = Settings(backend="tiny", model_dir=str(tiny_dir))
    info = model_info(settings)
    assert info.simulated and "meaningless" in info.model_id and len(info.version) == 12
    writer = load_report_writer(settings, device="cpu", max_new_tokens=4, batch_size=2)
    assert writer.model == info
    image = np.random.default_rng(0).integers(0, 256, (80, 96), dtype=np.uint8)
    texts = writer.write_reports([ReportRequest(image), ReportRequest(image, "differential")])
    assert len(texts) == 2 and all(t.startswith(TINY_BANNER) for t in texts)
    writer.close()  # type: ignore[attr-defined]
    assert model_info(Settings()).simulated
    with pytest.raises(ConfigurationError, match="CXR_CDS_MODEL_DIR"):
        model_info(Settings(backend="cxr_llava"))
