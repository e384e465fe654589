"""Values that cross layers: model identity, coded findings and the analysis of one study."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

AnalysisStatus = Literal["completed", "not-analysed", "failed"]
FindingState = Literal["present", "absent", "uncertain"]

# The major findings the cards flag, with SNOMED CT codes (STANDARDS.md; verify before relying).
MAJOR_FINDINGS: dict[str, tuple[str, str]] = {
    "pneumothorax": ("36118008", "Pneumothorax"),
    "pleural-effusion": ("60046008", "Pleural effusion"),
    "cardiomegaly": ("8186001", "Cardiomegaly"),
    "consolidation": ("95436008", "Lung consolidation"),
    "pulmonary-edema": ("19242006", "Pulmonary edema"),
    "atelectasis": ("46621007", "Atelectasis"),
    "pneumonia": ("233604007", "Pneumonia"),
    "lung-nodule": ("786838002", "Pulmonary nodule"),
}
# Findings that need action within minutes get a critical card; the rest a warning.
CRITICAL_FINDINGS = frozenset({"pneumothorax"})


@dataclass(frozen=True)
class ModelInfo:
    """Which model produced a result: carried into every card, resource and log line."""

    model_id: str
    version: str
    simulated: bool = False

    @property
    def label(self) -> str:
        prefix = "SIMULATED " if self.simulated else ""
        return f"{prefix}{self.model_id} ({self.version})"


@dataclass(frozen=True)
class Finding:
    """One major finding as decided from the generated report."""

    key: str
    state: FindingState
    evidence: str = ""
    confidence: float | None = None

    def __post_init__(self) -> None:
        if self.key not in MAJOR_FINDINGS:
            raise ValueError(f"unknown finding key {self.key!r}; allowed: {sorted(MAJOR_FINDINGS)}")
        if self.state not in ("present", "absent", "uncertain"):
            raise ValueError(f"finding state must be present/absent/uncertain, not {self.state!r}")

    @property
    def display(self) -> str:
        return MAJOR_FINDINGS[self.key][1]

    @property
    def snomed(self) -> str:
        return MAJOR_FINDINGS[self.key][0]


@dataclass(frozen=True)
class AnalysisResult:
    """The outcome for one study and one model version; stored by (study UID, model, version)."""

    study_uid: str
    model: ModelInfo
    status: AnalysisStatus
    report_text: str = ""
    findings: tuple[Finding, ...] = ()
    reason: str = ""
    study_started: str | None = None
    analysed_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def positive(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.state == "present")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AnalysisResult:
        raw = json.loads(text)
        raw["model"] = ModelInfo(**raw["model"])
        raw["findings"] = tuple(Finding(**f) for f in raw["findings"])
        return cls(**raw)
