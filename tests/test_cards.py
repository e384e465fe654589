"""Card building as pure functions: summary length, Markdown safety, never 'normal'."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cds_service.fhir_out.cards import (
    SUMMARY_MAX,
    CardContext,
    StudyStatus,
    cards_for_study,
    incomplete_list_card,
    markdown_text,
    relative_age,
)
from cds_service.findings.observations import Observation
from cds_service.results import AnalysisResult, Finding, ModelInfo

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
MODEL = ModelInfo("ECOFRI/CXR-LLAVA-v2", "sha256:abcd")
STUDY = {
    "resourceType": "ImagingStudy",
    "id": "s1",
    "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}],
    "started": "2026-11-25T09:00:00+00:00",
    "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CR"}],
    "series": [
        {
            "uid": "1.2.3.4",
            "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CR"},
            "bodySite": {"system": "http://snomed.info/sct", "code": "51185008"},
        }
    ],
}


def result(*findings: Finding) -> AnalysisResult:
    return AnalysisResult(study_uid="1.2.3", model=MODEL, status="completed", findings=findings)


def ctx(prefix: str = "") -> CardContext:
    return CardContext(
        model=MODEL, smart_launch_url="https://app/launch", now=NOW, summary_prefix=prefix
    )


def test_long_summaries_are_cut_below_140_characters() -> None:
    status = StudyStatus(
        STUDY, "completed", result(Finding(Observation.PNEUMOTHORAX, "present", "x"))
    )
    [card] = cards_for_study(status, ctx(prefix="P" * 200))
    assert len(card["summary"]) == SUMMARY_MAX < 140
    assert card["summary"].endswith("\u2026")


def test_order_hook_cards_read_as_a_prior_film() -> None:
    """On order hooks: 'Prior chest radiograph (CR) 2 days ago: AI flags pleural effusion'."""
    status = StudyStatus(
        STUDY, "completed", result(Finding(Observation.PLEURAL_EFFUSION, "present", "x"))
    )
    [card] = cards_for_study(status, ctx(prefix="Prior "))
    assert card["summary"] == "Prior chest radiograph (CR) 2 days ago: AI flags pleural effusion"
    # The prefix belongs to study cards only, not to the incomplete-list notice.
    assert incomplete_list_card(ctx(prefix="Prior "))["summary"].startswith("Not all")


def test_real_model_cards_are_not_marked_simulated_and_name_the_model() -> None:
    status = StudyStatus(
        STUDY, "completed", result(Finding(Observation.PLEURAL_EFFUSION, "present", "x"))
    )
    [card] = cards_for_study(status, ctx())
    assert card["summary"] == "Chest radiograph (CR) 2 days ago: AI flags pleural effusion"
    assert card["source"]["label"] == "AI chest X-ray: ECOFRI/CXR-LLAVA-v2 (sha256:abcd)"
    assert "SIMULATED" not in card["detail"]
    assert "preliminary, not reviewed" in card["detail"]


def test_absent_findings_only_give_no_major_finding_never_normal() -> None:
    status = StudyStatus(
        STUDY, "completed", result(Finding(Observation.PNEUMOTHORAX, "absent", "No PTX."))
    )
    [card] = cards_for_study(status, ctx())
    assert card["indicator"] == "info"
    assert "no major finding detected by the model" in card["summary"]
    assert "normal" not in card["summary"].lower()


def test_not_analysed_shows_the_reason_not_a_finding() -> None:
    status = StudyStatus(STUDY, "not-analysed", reason="lateral view")
    [card] = cards_for_study(status, ctx())
    assert card["summary"].endswith("not analysed by AI: lateral view")
    assert card["indicator"] == "info"


def test_model_text_cannot_inject_markdown() -> None:
    evidence = "Effusion *left*.\n\n# [click me](https://evil.example) <img src=x>"
    status = StudyStatus(
        STUDY, "completed", result(Finding(Observation.PLEURAL_EFFUSION, "present", evidence))
    )
    [card] = cards_for_study(status, ctx())
    quote = next(line for line in card["detail"].split("\n\n") if line.startswith("> "))
    assert "\n" not in quote
    assert "\\*left\\*" in quote and "\\[click me\\]" in quote and "\\<img" in quote


@pytest.mark.parametrize(
    "text,expected",
    [
        ("# heading", "\\# heading"),
        ("1. item", "1\\. item"),
        ("- bullet", "\\- bullet"),
        ("3 cm nodule", "3 cm nodule"),
        ("a_b", "a\\_b"),
    ],
)
def test_markdown_block_starts_are_escaped(text: str, expected: str) -> None:
    assert markdown_text(text) == expected


@pytest.mark.parametrize(
    "days,expected",
    [
        (0, "today"),
        (1, "yesterday"),
        (5, "5 days ago"),
        (21, "3 weeks ago"),
        (90, "3 months ago"),
        (800, "2 years ago"),
    ],
)
def test_relative_age(days: int, expected: str) -> None:
    from datetime import timedelta

    assert relative_age(NOW - timedelta(days=days), NOW) == expected


def test_labels_claim_chest_only_when_the_study_says_so() -> None:
    finding = result(Finding(Observation.PLEURAL_EFFUSION, "present", "x"))
    unknown = {k: v for k, v in STUDY.items() if k != "series"}
    [card] = cards_for_study(StudyStatus(unknown, "completed", finding), ctx())
    assert card["summary"].startswith("Radiograph (CR) 2 days ago")
    bare = {"resourceType": "ImagingStudy", "id": "s2"}
    [card] = cards_for_study(StudyStatus(bare, "completed", finding), ctx())
    assert card["summary"].startswith("Imaging study of unknown date")
    future = {**STUDY, "started": "2999-01-01T00:00:00Z"}
    [card] = cards_for_study(StudyStatus(future, "completed", finding), ctx())
    assert "dated in the future" in card["summary"]
