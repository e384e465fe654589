"""The protocols every model runtime implements.

Two layers meet here:
- a `ReportWriter` turns 8-bit frontal chest images into report text (the model itself:
  cxr_llava, hf_vlm, tiny, simulated);
- a `Backend` analyses one ImagingStudy end to end (fetch and select the image, write the
  report, code the findings) and is what the job worker drives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from cds_service.errors import ServiceUnavailable
from cds_service.results import AnalysisResult, ModelInfo

Task = Literal["report", "differential", "ask"]
TASKS: tuple[Task, ...] = ("report", "differential", "ask")


@dataclass(frozen=True)
class ReportRequest:
    """One image and what to ask about it.

    `image` is the 8-bit grayscale frontal radiograph (H x W, uint8, MONOCHROME2-looking:
    bright bone) as produced by `cds_service.imaging`, before any model-specific resize.
    """

    image: npt.NDArray[np.uint8]
    task: Task = "report"
    question: str | None = None

    def __post_init__(self) -> None:
        if self.image.dtype != np.uint8 or self.image.ndim != 2:
            raise ValueError("a report request needs a 2-D uint8 image")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {self.task!r}")
        if self.task == "ask" and not (self.question or "").strip():
            raise ValueError("task 'ask' needs a question")


class ModelUnavailable(ServiceUnavailable):
    """The model cannot take work right now (stopped, or not responding). Nothing is wrong
    with the request: the job worker puts the job back without counting an attempt and
    tries again later."""

    code = "model-unavailable"


class ReportWriter(Protocol):
    """The model: writes one text per request, in order. Batching is the writer's business."""

    model: ModelInfo

    def write_reports(self, requests: Sequence[ReportRequest]) -> list[str]: ...


@dataclass(frozen=True)
class WrittenReport:
    """One generated text and whether the model stopped by itself.

    `truncated`: generation hit its token limit before the model ended the text, so the text
    may stop before it mentions a finding; it must never be read (or coded) as complete.
    """

    text: str
    truncated: bool = False
    new_tokens: int | None = None


@runtime_checkable
class DetailedReportWriter(ReportWriter, Protocol):
    """A ReportWriter that also says, per text, whether it was cut off at the token limit."""

    def write_detailed_reports(self, requests: Sequence[ReportRequest]) -> list[WrittenReport]: ...


def write_detailed(writer: ReportWriter, requests: Sequence[ReportRequest]) -> list[WrittenReport]:
    """The writer's detailed reports, or its plain texts marked not truncated when it cannot
    tell (writers without a token limit)."""
    if isinstance(writer, DetailedReportWriter):
        return writer.write_detailed_reports(requests)
    return [WrittenReport(text) for text in writer.write_reports(requests)]


class Backend(Protocol):
    """Analyses one ImagingStudy and returns a result keyed by its Study UID."""

    model: ModelInfo

    def analyse(self, study_uid: str, study: dict[str, Any]) -> AnalysisResult: ...


@runtime_checkable
class SourceAwareBackend(Backend, Protocol):
    """A Backend that also needs to know which FHIR server the study came from (to re-read
    it and fetch its images with that EHR's credentials). The worker prefers this method."""

    def analyse_from(
        self, study_uid: str, study: dict[str, Any], fhir_server: str | None
    ) -> AnalysisResult: ...


@dataclass(frozen=True)
class StudyWork:
    """One study for a batch: its UID, its ImagingStudy resource and the FHIR server it is in.

    `dicom`: the image's DICOM bytes when the job came with them (the viewer fetched them
    with the clinician's token); they are analysed instead of fetching the study's images.
    """

    study_uid: str
    study: dict[str, Any]
    fhir_server: str | None
    dicom: bytes | None = None


@runtime_checkable
class BatchBackend(SourceAwareBackend, Protocol):
    """A Backend that analyses several studies together, so the model sees them as one batch.

    The answer has one entry per study, in order: its result, or the exception that study
    raised (a study whose image cannot be fetched fails alone). ModelUnavailable is raised
    for the whole batch: nothing was analysed.
    """

    def analyse_batch(self, work: Sequence[StudyWork]) -> list[AnalysisResult | Exception]: ...
