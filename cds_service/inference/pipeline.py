"""The Backend that really looks at the study: fetch and select the frontal chest image,
have the ReportWriter (the model) write the report, code the findings from its text."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, Protocol

from cds_service.findings.to_findings import findings_from_report
from cds_service.imaging.errors import NotAnalysable, UnsupportedImage
from cds_service.imaging.files import DecodedImage
from cds_service.inference.base import ReportRequest, ReportWriter, write_detailed
from cds_service.results import AnalysisResult

log = logging.getLogger(__name__)


class StudyImageSource(Protocol):
    """Where the pixels come from (cds_service.imaging.study.StudyImages in the service)."""

    def load(self, study: dict[str, Any], fhir_server: str | None) -> DecodedImage: ...


class ImagePipelineBackend:
    """Backend (and SourceAwareBackend) over a ReportWriter and a study image source.

    NotAnalysable and UnsupportedImage become a "not-analysed" result with the reason; network
    and FHIR failures propagate so the worker retries the job.
    """

    def __init__(self, writer: ReportWriter, images: StudyImageSource) -> None:
        self.writer = writer
        self.images = images
        self.model = writer.model

    def analyse(self, study_uid: str, study: dict[str, Any]) -> AnalysisResult:
        return self.analyse_from(study_uid, study, None)

    def analyse_from(
        self, study_uid: str, study: dict[str, Any], fhir_server: str | None
    ) -> AnalysisResult:
        try:
            image = self.images.load(study, fhir_server)
        except NotAnalysable as exc:
            return self._not_analysed(study_uid, study, exc.reason)
        except UnsupportedImage as exc:
            return self._not_analysed(study_uid, study, f"image cannot be read: {exc.description}")
        reports = write_detailed(self.writer, [ReportRequest(image.pixels)])
        if len(reports) != 1:
            raise RuntimeError(f"the report writer returned {len(reports)} texts for one image")
        report = reports[0]
        if report.truncated:
            # A report cut before it mentions, say, pneumothorax would read (and be coded) as
            # "no pneumothorax": never store it as complete. Greedy decoding would cut it again,
            # so this is final rather than a retry.
            return self._not_analysed(study_uid, study, truncation_reason(report.new_tokens))
        text = report.text
        log.info("study analysed (%d x %d image)", *image.pixels.shape)
        return AnalysisResult(
            study_uid=study_uid,
            model=self.model,
            status="completed",
            report_text=text,
            findings=findings_from_report(text),
            study_started=study.get("started"),
            analysed_at=_now(),
            extra={"image_notes": list(image.notes), "transfer_syntax": image.transfer_syntax},
        )

    def _not_analysed(self, study_uid: str, study: dict[str, Any], reason: str) -> AnalysisResult:
        log.info("study not analysed: %s", reason)
        return AnalysisResult(
            study_uid=study_uid,
            model=self.model,
            status="not-analysed",
            reason=reason,
            study_started=study.get("started"),
            analysed_at=_now(),
        )


def truncation_reason(new_tokens: int | None) -> str:
    where = f" at {new_tokens} tokens" if new_tokens is not None else " at its token limit"
    return f"the model's report was cut off{where}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
