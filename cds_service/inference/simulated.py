"""A backend with no model, for wiring an EHR without a GPU. Every output says SIMULATED."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from cds_service.findings.to_findings import findings_from_report
from cds_service.inference.base import ReportRequest, WrittenReport
from cds_service.results import AnalysisResult, ModelInfo

SIMULATED_MODEL = ModelInfo(model_id="simulated-no-model", version="sim-1", simulated=True)
_BANNER = "SIMULATED OUTPUT - NO AI MODEL RAN. THIS TEXT IS MADE UP FOR INTEGRATION TESTING."

# Canned reports, chosen by a hash of the Study UID so each study always gets the same one.
# Their findings come from the same labeler a real model's reports go through.
_SCENARIOS: tuple[str, ...] = (
    "The heart size is normal. Small left pleural effusion. No pneumothorax.",
    "Large right apical pneumothorax. No pleural effusion.",
    "Lungs are clear. No pleural effusion or pneumothorax. Heart size is normal.",
    "Enlarged cardiac silhouette. Possible right lower lobe consolidation.",
)


def _canned_report(key: bytes) -> str:
    """The same key (Study UID or pixels) always gets the same SIMULATED text."""
    digest = hashlib.sha256(key).digest()
    return f"{_BANNER}\n\n{_SCENARIOS[digest[0] % len(_SCENARIOS)]}"


class SimulatedBackend:
    """Deterministic made-up results; the report text and model id carry SIMULATED."""

    model = SIMULATED_MODEL

    def analyse(self, study_uid: str, study: dict[str, Any]) -> AnalysisResult:
        text = _canned_report(study_uid.encode())
        return AnalysisResult(
            study_uid=study_uid,
            model=self.model,
            status="completed",
            report_text=text,
            findings=findings_from_report(text),
            study_started=study.get("started"),
            analysed_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )


class SimulatedReportWriter:
    """A ReportWriter with no model: a canned report chosen by a hash of the image's pixels
    (the same image always gets the same text), marked SIMULATED like SimulatedBackend's."""

    model = SIMULATED_MODEL

    def write_reports(self, requests: Sequence[ReportRequest]) -> list[str]:
        return [report.text for report in self.write_detailed_reports(requests)]

    def write_detailed_reports(self, requests: Sequence[ReportRequest]) -> list[WrittenReport]:
        """Canned texts are always whole: never truncated."""
        return [
            WrittenReport(_canned_report(request.image.tobytes()), truncated=False)
            for request in requests
        ]
