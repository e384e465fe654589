"""Values that cross layers: model identity, coded findings and the analysis of one study."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from cds_service.findings.observations import MAJOR_FINDINGS, Observation

AnalysisStatus = Literal["completed", "not-analysed", "failed"]
FindingState = Literal["present", "absent", "uncertain"]


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
    """One CheXpert observation as decided from the generated report (mentioned ones only)."""

    key: Observation
    state: FindingState
    evidence: str = ""
    confidence: float | None = None

    def __post_init__(self) -> None:
        # Accept the plain string (as stored in JSON) and normalise it to the enum.
        object.__setattr__(self, "key", Observation(self.key))
        if self.state not in ("present", "absent", "uncertain"):
            raise ValueError(f"finding state must be present/absent/uncertain, not {self.state!r}")

    @property
    def major(self) -> bool:
        return self.key in MAJOR_FINDINGS

    @property
    def display(self) -> str:
        return MAJOR_FINDINGS[self.key][1] if self.major else str(self.key)

    @property
    def snomed(self) -> str | None:
        return MAJOR_FINDINGS[self.key][0] if self.major else None


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


@dataclass(frozen=True)
class CardRecord:
    """What a card said, kept so that feedback on it can be traced to a study and finding."""

    uuid: str
    source: str  # the data source (canonical FHIR base) the card's study belongs to
    study_uid: str
    finding: str  # a CheXpert observation, or "no-major-finding"
    ai_state: str  # present / uncertain / absent
    model_id: str
    model_version: str
