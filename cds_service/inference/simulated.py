"""A backend with no model, for wiring an EHR without a GPU. Every output says SIMULATED."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from cds_service.findings.observations import Observation
from cds_service.results import AnalysisResult, Finding, ModelInfo

SIMULATED_MODEL = ModelInfo(model_id="simulated-no-model", version="sim-1", simulated=True)
_BANNER = "SIMULATED OUTPUT - NO AI MODEL RAN. THIS TEXT IS MADE UP FOR INTEGRATION TESTING."

# Canned reports, chosen by a hash of the Study UID so each study always gets the same one.
_SCENARIOS: tuple[tuple[str, tuple[Finding, ...]], ...] = (
    (
        "The heart size is normal. Small left pleural effusion. No pneumothorax.",
        (
            Finding(Observation.PLEURAL_EFFUSION, "present", "Small left pleural effusion."),
            Finding(Observation.PNEUMOTHORAX, "absent", "No pneumothorax."),
        ),
    ),
    (
        "Large right apical pneumothorax. No pleural effusion.",
        (
            Finding(Observation.PNEUMOTHORAX, "present", "Large right apical pneumothorax."),
            Finding(Observation.PLEURAL_EFFUSION, "absent", "No pleural effusion."),
        ),
    ),
    (
        "Lungs are clear. No pleural effusion or pneumothorax. Heart size is normal.",
        (
            Finding(Observation.PLEURAL_EFFUSION, "absent", "No pleural effusion or pneumothorax."),
            Finding(Observation.PNEUMOTHORAX, "absent", "No pleural effusion or pneumothorax."),
            Finding(Observation.CARDIOMEGALY, "absent", "Heart size is normal."),
        ),
    ),
    (
        "Enlarged cardiac silhouette. Possible right lower lobe consolidation.",
        (
            Finding(Observation.CARDIOMEGALY, "present", "Enlarged cardiac silhouette."),
            Finding(
                Observation.CONSOLIDATION, "uncertain", "Possible right lower lobe consolidation."
            ),
        ),
    ),
)


class SimulatedBackend:
    """Deterministic made-up results; the report text and model id carry SIMULATED."""

    model = SIMULATED_MODEL

    def analyse(self, study_uid: str, study: dict[str, Any]) -> AnalysisResult:
        digest = hashlib.sha256(study_uid.encode()).digest()
        text, findings = _SCENARIOS[digest[0] % len(_SCENARIOS)]
        return AnalysisResult(
            study_uid=study_uid,
            model=self.model,
            status="completed",
            report_text=f"{_BANNER}\n\n{text}",
            findings=findings,
            study_started=study.get("started"),
            analysed_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
