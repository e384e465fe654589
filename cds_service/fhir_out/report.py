"""The AI report as an R4 DiagnosticReport and one Observation per mentioned major finding."""

from __future__ import annotations

import base64
import hashlib
import math
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from cds_service.fhir.shapes import dicts
from cds_service.fhir_out import codes
from cds_service.fhir_out.device import simulated_meta
from cds_service.findings.observations import MAJOR_FINDINGS
from cds_service.results import AnalysisResult, Finding

SAFETY_SENTENCE = "AI-generated, preliminary, not reviewed."
NO_MAJOR_FINDING = f"No major finding detected by the model. {SAFETY_SENTENCE}"
SIMULATED_PREFIX = "SIMULATED (no AI model ran): "
# Which finding wins when a result names one observation twice: never hide a positive.
_STATE_RANK = {"present": 0, "uncertain": 1, "absent": 2}
_PARTIAL_DATE = re.compile(r"^[0-9]{4}(-(0[1-9]|1[0-2])(-(0[1-9]|[12][0-9]|3[01]))?)?$")


@dataclass(frozen=True)
class ReportContext:
    """What every resource of one report shares: references, times and the SIMULATED flag."""

    subject_reference: str
    study_reference: str
    device_reference: str
    study_uid: str
    model_label: str
    issued: str
    effective: str | None
    simulated: bool

    def text(self, text: str) -> str:
        """Free text as written into a resource: SIMULATED first when nothing real ran."""
        return f"{SIMULATED_PREFIX}{text}" if self.simulated else text


def fhir_instant(value: datetime) -> str:
    """An R4 instant (seconds, or microseconds when present; UTC written as Z)."""
    if value.tzinfo is None:
        raise ValueError("an R4 instant needs a time zone: pass an aware datetime")
    spec = "microseconds" if value.microsecond else "seconds"
    text = value.isoformat(timespec=spec)
    return text.removesuffix("+00:00") + "Z" if text.endswith("+00:00") else text


def fhir_date_time(value: str | None) -> str | None:
    """An R4 dateTime from a study's `started` (or the result's copy), or None if unusable.

    Partial dates (YYYY, YYYY-MM, YYYY-MM-DD) are kept as given: adding a time would invent
    precision. A time without zone is read as UTC, as cds_service.fhir.imaging_study does."""
    if not value:
        return None
    if _PARTIAL_DATE.match(value):
        # The pattern checks the shape; parsing rejects impossible dates (2024-02-30).
        padded = value + "-01-01"[len(value) - 4 :] if len(value) < 10 else value
        try:
            date.fromisoformat(padded)
        except ValueError:
            return None
        return value if int(value[:4]) > 0 else None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return fhir_instant(parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC))


def instance_count(study: dict[str, Any]) -> int | None:
    """Instances in the ImagingStudy: numberOfInstances, else the series' counts or lists."""
    total = study.get("numberOfInstances")
    if isinstance(total, int) and not isinstance(total, bool) and total > 0:
        return total
    counted = 0
    for series in dicts(study.get("series")):
        number = series.get("numberOfInstances")
        if isinstance(number, int) and not isinstance(number, bool) and number > 0:
            counted += number
        else:
            counted += len(dicts(series.get("instance")))
    return counted or None


def report_code(study: dict[str, Any]) -> dict[str, Any]:
    """LOINC by view count: 2+ instances in the study -> XR Chest 2 Views, else Single view
    (one frontal image is what the model analyses; an unknown count reads as one)."""
    count = instance_count(study)
    coding = (
        codes.XR_CHEST_2_VIEWS if count is not None and count >= 2 else codes.XR_CHEST_SINGLE_VIEW
    )
    return {"coding": [coding], "text": coding["display"]}


def major_findings(result: AnalysisResult) -> list[Finding]:
    """Mentioned major findings, one per observation, in MAJOR_FINDINGS order."""
    chosen: dict[Any, Finding] = {}
    for finding in result.findings:
        if not finding.major:
            continue
        known = chosen.get(finding.key)
        if known is None or _STATE_RANK[finding.state] < _STATE_RANK[known.state]:
            chosen[finding.key] = finding
    return [chosen[key] for key in MAJOR_FINDINGS if key in chosen]


def finding_code(finding: Finding) -> dict[str, Any]:
    if finding.snomed is None:  # Lung Opacity: no verified SNOMED CT code, so text only
        return {"text": finding.display}
    return {
        "coding": [codes.coding(codes.SNOMED, finding.snomed, finding.display)],
        "text": finding.display,
    }


def build_observation(
    ctx: ReportContext, finding: Finding, *, resource_id: str, identifier: dict[str, str]
) -> dict[str, Any]:
    value_coding, value_text = codes.PRESENCE[finding.state]
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": resource_id,
        "meta": simulated_meta(ctx.simulated, security=[codes.AIAST]),
        "identifier": [identifier],
        "status": "preliminary",
        "category": [{"coding": [codes.IMAGING_CATEGORY]}],
        "code": finding_code(finding),
        "subject": {"reference": ctx.subject_reference},
        **({"effectiveDateTime": ctx.effective} if ctx.effective else {}),
        "issued": ctx.issued,
        "valueCodeableConcept": {"coding": [value_coding], "text": value_text},
        "device": {"reference": ctx.device_reference},
        "derivedFrom": [{"reference": ctx.study_reference}],
    }
    # Say it is the AI's in the text a clinician reads, not only in meta.security.
    note = f"AI-generated, preliminary, not reviewed ({ctx.model_label})."
    if finding.evidence.strip():
        note += f' Model report: "{finding.evidence.strip()}"'
    resource["note"] = [{"text": ctx.text(note)}]
    if finding.confidence is not None:
        confidence = float(finding.confidence)
        if not math.isfinite(confidence) or not 0.0 <= confidence <= 1.0:
            raise ValueError(f"{finding.key}: confidence must be a probability in [0, 1]")
        resource["extension"] = [{"url": codes.AI_CONFIDENCE_URL, "valueDecimal": confidence}]
    return resource


def conclusion(ctx: ReportContext, findings: list[Finding]) -> str:
    """Short text that lists what the model flagged and never calls a study normal."""
    present = [f.display.lower() for f in findings if f.state == "present"]
    uncertain = [f.display.lower() for f in findings if f.state == "uncertain"]
    parts = []
    if present:
        parts.append(f"AI model reports: {', '.join(present)}.")
    if uncertain:
        parts.append(f"Possible (uncertain): {', '.join(uncertain)}.")
    text = f"{' '.join(parts)} {SAFETY_SENTENCE}" if parts else NO_MAJOR_FINDING
    return ctx.text(text)


def report_text(ctx: ReportContext, result: AnalysisResult) -> str:
    """The text filed as presentedForm: a header saying what it is, then the model's words."""
    lines = [
        ctx.text(
            "AI-generated preliminary chest radiograph report, not reviewed by a radiologist."
        ),
        f"Model: {ctx.model_label}",
        f"Study Instance UID: {ctx.study_uid}",
        "",
        result.report_text.strip() or "(the model returned no text)",
        "",
    ]
    return "\n".join(lines)


def build_diagnostic_report(
    ctx: ReportContext,
    result: AnalysisResult,
    study: dict[str, Any],
    findings: list[Finding],
    observation_ids: list[str],
    *,
    resource_id: str,
    identifier: dict[str, str],
) -> dict[str, Any]:
    text = report_text(ctx, result).encode("utf-8")
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": resource_id,
        "meta": simulated_meta(ctx.simulated, security=[codes.AIAST]),
        "identifier": [identifier],
        "status": "preliminary",
        "category": [{"coding": [codes.RADIOLOGY_CATEGORY]}],
        "code": report_code(study),
        "subject": {"reference": ctx.subject_reference},
        **({"effectiveDateTime": ctx.effective} if ctx.effective else {}),
        "issued": ctx.issued,
        "imagingStudy": [{"reference": ctx.study_reference}],
        "conclusion": conclusion(ctx, findings),
        "presentedForm": [
            {
                "contentType": "text/plain;charset=utf-8",
                "language": "en",
                "data": base64.b64encode(text).decode("ascii"),
                "size": len(text),
                "hash": base64.b64encode(hashlib.sha1(text).digest()).decode("ascii"),  # noqa: S324
                "title": ctx.text("AI chest radiograph report (preliminary)"),
            }
        ],
    }
    if observation_ids:
        resource["result"] = [{"reference": f"Observation/{oid}"} for oid in observation_ids]
    coded = [f for f in findings if f.state == "present" and f.snomed is not None]
    if coded:
        resource["conclusionCode"] = [finding_code(f) for f in coded]
    return resource
