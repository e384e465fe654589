"""The backend protocol every model runtime implements."""

from __future__ import annotations

from typing import Any, Protocol

from cds_service.results import AnalysisResult, ModelInfo


class Backend(Protocol):
    """Analyses one ImagingStudy and returns a result keyed by its Study UID."""

    model: ModelInfo

    def analyse(self, study_uid: str, study: dict[str, Any]) -> AnalysisResult: ...
