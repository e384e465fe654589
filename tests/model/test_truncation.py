"""A report cut off at the token limit never reads as complete (finding 5): the pipeline
stores it as not analysed with the reason, the CLI marks it and codes nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cds_service.imaging.files import DecodedImage, read_image_file
from cds_service.inference.base import ReportRequest, WrittenReport, write_detailed
from cds_service.inference.cxr_llava.loader import LoadedCheckpoint
from cds_service.inference.cxr_llava.writer import CxrLlavaReportWriter, hit_token_limit
from cds_service.inference.model_cli import EXIT_NOT_ANALYSED, main
from cds_service.inference.pipeline import ImagePipelineBackend
from cds_service.inference.simulated import SimulatedReportWriter
from cds_service.results import ModelInfo

PNG = Path(__file__).parent / "data" / "nih-cxr14-00000001_000-cardiomegaly.png"
IMAGE = np.random.default_rng(3).integers(0, 256, (64, 72), dtype=np.uint8)


class OneImage:
    """The study's image source: always the test film."""

    def load(self, study: dict[str, Any], fhir_server: str | None) -> DecodedImage:
        return read_image_file(PNG)


class CutWriter:
    """Says "No pneumothorax." but was cut off: a silent miss if it were read as whole."""

    model = ModelInfo("test-writer", "1")

    def write_reports(self, requests: Any) -> list[str]:
        return [r.text for r in self.write_detailed_reports(requests)]

    def write_detailed_reports(self, requests: Any) -> list[WrittenReport]:
        return [WrittenReport("No pneumothorax. Small", truncated=True, new_tokens=512)]


def test_a_cut_off_report_is_stored_as_not_analysed_with_the_reason() -> None:
    result = ImagePipelineBackend(CutWriter(), OneImage()).analyse("1.2.3", {})
    assert result.status == "not-analysed"
    assert result.reason == "the model's report was cut off at 512 tokens"
    assert result.findings == () and result.report_text == ""


def test_the_real_writer_flags_a_text_cut_at_its_token_limit(tiny: LoadedCheckpoint) -> None:
    writer = CxrLlavaReportWriter(tiny, max_new_tokens=3, max_batch_size=2, warmup=False)
    try:
        reports = writer.write_detailed_reports([ReportRequest(IMAGE)] * 2)
        assert writer.write_reports([ReportRequest(IMAGE)]) == [reports[0].text]
        result = ImagePipelineBackend(writer, OneImage()).analyse("1.2.3", {})
    finally:
        writer.close()
    # The random model does not end a text within 3 tokens (deterministic weights).
    assert [(r.truncated, r.new_tokens) for r in reports] == [(True, 3), (True, 3)]
    assert result.status == "not-analysed" and "cut off at 3 tokens" in result.reason


def test_token_limit_rule() -> None:
    assert hit_token_limit([5, 6, 7], 3, eos_id=2)
    assert not hit_token_limit([5, 6], 3, eos_id=2)  # stopped at </s> (cut off before it)
    assert not hit_token_limit([5, 2, 7], 3, eos_id=2)  # ignore_eos: </s> was produced


def test_simulated_and_plain_writers_are_whole() -> None:
    simulated = SimulatedReportWriter()
    [report] = write_detailed(simulated, [ReportRequest(IMAGE)])
    assert (
        not report.truncated and report.text == simulated.write_reports([ReportRequest(IMAGE)])[0]
    )
    result = ImagePipelineBackend(simulated, OneImage()).analyse("1.2.3", {})
    assert result.status == "completed" and result.findings


def test_analyze_marks_a_cut_off_text_and_codes_nothing(
    tiny_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["analyze", str(PNG), "--backend", "tiny", "--model-dir", str(tiny_dir)]
    args += ["--max-new-tokens", "3", "--device", "cpu"]
    assert main(args) == 0
    assert "INCOMPLETE: the model's text was cut off at 3 tokens" in capsys.readouterr().out
    assert main([*args, "--format", "json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["truncated"] is True and "findings" not in payload
    assert "cut off" in payload["findings_note"]
    assert main([*args, "--format", "fhir", "--patient", "p1"]) == EXIT_NOT_ANALYSED
    captured = capsys.readouterr()
    assert captured.out == "" and "cut off at 3 tokens" in captured.err
