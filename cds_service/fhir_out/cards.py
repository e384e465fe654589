"""CDS Hooks 2.0 cards from stored analysis results: one per finding, never "normal"."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from cds_service.fhir import imaging_study
from cds_service.fhir.shapes import as_str
from cds_service.findings.observations import CRITICAL_FINDINGS
from cds_service.results import AnalysisResult, CardRecord, Finding, ModelInfo

SUMMARY_MAX = 139  # CDS Hooks 2.0: summary "<140 characters"
CARD_NAMESPACE = uuid.UUID("8f1d3c52-3c8a-4f6e-9a57-cc1d2b7e4a10")
SAFETY_LINE = (
    "**AI-generated, preliminary, not reviewed by a radiologist.** Not for diagnostic use "
    "without review of the images."
)
SIMULATED_LINE = (
    "**SIMULATED: no AI model ran.** This card comes from the simulated backend used to wire "
    "an EHR without a GPU; its content is made up and must not be used for care."
)

StudyState = Literal["completed", "in-progress", "not-analysed"]


@dataclass(frozen=True)
class StudyStatus:
    """What the service knows about one study for the configured model."""

    study: dict[str, Any]
    state: StudyState
    result: AnalysisResult | None = None
    reason: str = ""
    # The DiagnosticReport to offer as "File AI report to chart" (None once it is filed).
    unfiled_report: dict[str, Any] | None = None


@dataclass(frozen=True)
class CardContext:
    model: ModelInfo
    smart_launch_url: str
    now: datetime
    summary_prefix: str = ""
    source: str = ""  # the data source of the studies on the cards


OVERRIDE_SYSTEM = "urn:cxr-cds:card-override-reason"
# Offered on cards that state an AI result, so a site can review false positives and misses.
OVERRIDE_REASONS = (
    {
        "code": "finding-already-known",
        "system": OVERRIDE_SYSTEM,
        "display": "Finding already known",
    },
    {"code": "disagree-with-ai", "system": OVERRIDE_SYSTEM, "display": "Disagree with AI finding"},
    {"code": "image-quality", "system": OVERRIDE_SYSTEM, "display": "Image quality"},
)


def relative_age(when: datetime | None, now: datetime) -> str:
    """'today', '1 day ago', '3 weeks ago': how clinicians refer to prior films."""
    if when is None:
        return "of unknown date"
    days = (now - when).days
    if days < -1 or (days == -1 and (when - now).total_seconds() > 3600):
        return "dated in the future"
    if days <= 0:
        return "today"
    if days == 1:
        return "yesterday"
    if days < 14:
        return f"{days} days ago"
    if days < 60:
        return f"{days // 7} weeks ago"
    if days < 730:
        return f"{days // 30} months ago"
    return f"{days // 365} years ago"


_MARKDOWN_INLINE = re.compile(r"([\\`*_\[\]<>|~])")
_MARKDOWN_BLOCK_START = re.compile(r"^(\d*)([#>+\-=]|(?<=\d)[.)])")


def markdown_text(text: str) -> str:
    """Model text as literal GitHub Flavored Markdown: one line, no emphasis, links or HTML."""
    escaped = _MARKDOWN_INLINE.sub(r"\\\1", " ".join(text.split()))
    # A leading '#', '-', '1.' ... would start a heading or list: escape its punctuation.
    return _MARKDOWN_BLOCK_START.sub(r"\1\\\2", escaped)


def _summary(prefix: str, text: str) -> str:
    summary = f"{prefix}{text}"
    if len(summary) > SUMMARY_MAX:
        summary = summary[: SUMMARY_MAX - 1].rstrip() + "\u2026"
    return summary


def _study_label(study: dict[str, Any], now: datetime) -> str:
    """'Chest radiograph (CR) 2 days ago'; no claim of 'chest' the study does not make."""
    modality = "/".join(sorted(imaging_study.modalities(study)))
    kind = "Chest radiograph" if imaging_study.is_chest(study) else "Radiograph"
    what = f"{kind} ({modality})" if modality else "Imaging study"
    return f"{what} {relative_age(imaging_study.started(study), now)}"


def _app_link(study: dict[str, Any], ctx: CardContext) -> dict[str, Any]:
    app_context: dict[str, str] = {}
    study_id = as_str(study.get("id"))
    if study_id:
        app_context["imagingStudy"] = f"ImagingStudy/{study_id}"
    uid = imaging_study.study_uid(study)
    if uid:
        app_context["studyInstanceUid"] = uid
    link: dict[str, Any] = {
        "label": "Open the AI chest X-ray viewer",
        "url": ctx.smart_launch_url,
        "type": "smart",
    }
    if app_context:
        link["appContext"] = json.dumps(app_context, separators=(",", ":"))
    return link


Built = tuple[dict[str, Any], CardRecord | None]


def _card(
    *,
    key: str,
    summary: str,
    indicator: str,
    detail_lines: list[str],
    study: dict[str, Any],
    ctx: CardContext,
    finding: tuple[str, str] | None = None,
) -> Built:
    """One card; `finding` = (observation, AI state) for cards that state an AI result."""
    lines = [SIMULATED_LINE] if ctx.model.simulated else []
    lines += detail_lines
    lines += [SAFETY_LINE, f"Model: {ctx.model.model_id}, version {ctx.model.version}."]
    # Stable per data source, study, model and finding, so feedback on a re-shown card lines up.
    card_uuid = str(uuid.uuid5(CARD_NAMESPACE, f"{ctx.source}|{ctx.model.label}|{key}"))
    if ctx.summary_prefix and study:
        # "Prior chest radiograph (CR) 2 days ago: ..." on order hooks; study cards only.
        summary = ctx.summary_prefix + summary[:1].lower() + summary[1:]
    card = {
        "uuid": card_uuid,
        "summary": _summary("SIMULATED: " if ctx.model.simulated else "", summary),
        "indicator": indicator,
        "detail": "\n\n".join(lines),
        "source": {
            "label": f"AI chest X-ray: {ctx.model.label}",
            "topic": {
                "system": "http://loinc.org",
                "code": "36643-5",
                "display": "XR Chest 2 Views",
            },
        },
        "links": [_app_link(study, ctx)],
    }
    record = None
    uid = imaging_study.study_uid(study)
    if finding is not None and uid:
        card["overrideReasons"] = [dict(reason) for reason in OVERRIDE_REASONS]
        record = CardRecord(
            uuid=card_uuid,
            source=ctx.source,
            study_uid=uid,
            finding=finding[0],
            ai_state=finding[1],
            model_id=ctx.model.model_id,
            model_version=ctx.model.version,
        )
    return card, record


def _finding_card(status: StudyStatus, finding: Finding, ctx: CardContext) -> Built:
    label = _study_label(status.study, ctx.now)
    uid = imaging_study.study_uid(status.study) or str(status.study.get("id"))
    if finding.state == "present":
        summary = f"{label}: AI flags {finding.display.lower()}"
        indicator = "critical" if finding.key in CRITICAL_FINDINGS else "warning"
    else:
        summary = f"{label}: AI suggests possible {finding.display.lower()}"
        # A possible pneumothorax still needs a look within minutes.
        indicator = "critical" if finding.key in CRITICAL_FINDINGS else "warning"
    detail = [f"The model's report mentions **{finding.display.lower()}** ({finding.state})."]
    if finding.evidence:
        detail.append(f"> {markdown_text(finding.evidence)}")
    if finding.confidence is not None:
        detail.append(f"Model confidence: {finding.confidence:.2f}")
    return _card(
        key=f"{uid}|{finding.key.value}|{finding.state}",
        summary=summary,
        indicator=indicator,
        detail_lines=detail,
        study=status.study,
        ctx=ctx,
        finding=(finding.key.value, finding.state),
    )


def _no_major_finding_card(status: StudyStatus, ctx: CardContext, label: str, uid: str) -> Built:
    return _card(
        key=f"{uid}|no-major-finding",
        summary=f"{label}: no major finding detected by the model",
        indicator="info",
        detail_lines=[
            "The model did not report any of the major findings it screens for. "
            "This is not a normal study report: findings may have been missed."
        ],
        study=status.study,
        ctx=ctx,
        finding=("no-major-finding", "absent"),
    )


def filing_suggestion_uuid(card_uuid: str) -> str:
    return str(uuid.uuid5(CARD_NAMESPACE, f"file|{card_uuid}"))


def _offer_filing(card: dict[str, Any], report: dict[str, Any], ctx: CardContext) -> None:
    """Add the 'File AI report to chart' suggestion: create the preliminary DiagnosticReport."""
    card["suggestions"] = [
        {
            "label": "File AI report to chart",
            "uuid": filing_suggestion_uuid(card["uuid"]),
            "isRecommended": False,
            "actions": [
                {
                    "type": "create",
                    "description": (
                        "File the AI-generated, preliminary, unreviewed chest radiograph "
                        f"report ({ctx.model.model_id}, {ctx.model.version}) to the chart"
                    ),
                    "resource": report,
                }
            ],
        }
    ]
    card["selectionBehavior"] = "at-most-one"


def _built_for_study(status: StudyStatus, ctx: CardContext) -> list[Built]:
    """The cards for one study: findings, or 'no major finding', or its processing state."""
    label = _study_label(status.study, ctx.now)
    uid = imaging_study.study_uid(status.study) or str(status.study.get("id"))
    result = status.result
    if status.state == "completed" and result is not None:
        flagged = [f for f in result.findings if f.major and f.state in ("present", "uncertain")]
        if flagged:
            flagged.sort(key=lambda f: (f.state != "present", f.key not in CRITICAL_FINDINGS))
            built = [_finding_card(status, finding, ctx) for finding in flagged]
        else:
            # Never "normal": the model may have missed something.
            built = [_no_major_finding_card(status, ctx, label, uid)]
        if status.unfiled_report is not None:
            _offer_filing(built[0][0], status.unfiled_report, ctx)
        return built
    if status.state == "in-progress" and status.reason:
        # Queued but waiting (no access to the EHR yet): say why, in the operator's words.
        return [
            _card(
                key=f"{uid}|waiting",
                summary=f"{label}: AI analysis waiting",
                indicator="info",
                detail_lines=[
                    f"The study is queued for AI analysis but waits: {status.reason}.",
                    "No AI findings exist for this study yet.",
                ],
                study=status.study,
                ctx=ctx,
            )
        ]
    if status.state == "in-progress":
        return [
            _card(
                key=f"{uid}|in-progress",
                summary=f"{label}: AI analysis in progress",
                indicator="info",
                detail_lines=["The study is queued for AI analysis; reopen the chart to see it."],
                study=status.study,
                ctx=ctx,
            )
        ]
    reason = status.reason or (result.reason if result is not None else "") or "analysis failed"
    return [
        _card(
            key=f"{uid}|not-analysed",
            summary=f"{label}: not analysed by AI: {reason}",
            indicator="info",
            detail_lines=[f"Not analysed: {reason}. No AI findings exist for this study."],
            study=status.study,
            ctx=ctx,
        )
    ]


def cards_for_study(status: StudyStatus, ctx: CardContext) -> list[dict[str, Any]]:
    """The cards for one study: findings, or 'no major finding', or its processing state."""
    return [card for card, _ in _built_for_study(status, ctx)]


def build_cards(
    statuses: list[StudyStatus], ctx: CardContext
) -> tuple[list[dict[str, Any]], list[CardRecord]]:
    """All cards of a hook answer, and the records of those that state an AI result."""
    cards: list[dict[str, Any]] = []
    records: list[CardRecord] = []
    for status in statuses:
        for card, record in _built_for_study(status, ctx):
            cards.append(card)
            if record is not None:
                records.append(record)
    return cards, records


def incomplete_list_card(ctx: CardContext) -> dict[str, Any]:
    """Said when the patient's study list could not be read to the end (paging cut short)."""
    card, _ = _card(
        key="incomplete-study-list",
        summary="Not all of the patient's imaging studies could be checked by the AI service",
        indicator="info",
        detail_lines=[
            "The FHIR search for the patient's chest radiographs returned more pages than "
            "this service could read. Studies not shown here have not been checked: absence of "
            "a card says nothing about them."
        ],
        study={},
        ctx=ctx,
    )
    return card


def utcnow() -> datetime:
    return datetime.now(UTC)
