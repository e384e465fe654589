"""The Backend that really looks at the study: fetch and select the frontal chest image,
have the ReportWriter (the model) write the report, code the findings from its text."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from cds_service.findings.to_findings import findings_from_report
from cds_service.imaging.errors import NotAnalysable, UnsupportedImage
from cds_service.imaging.files import DecodedImage, decode_dicom_bytes
from cds_service.imaging.limits import DEFAULT_LIMITS, ImageLimits
from cds_service.inference.base import (
    ModelUnavailable,
    ReportRequest,
    ReportWriter,
    StudyWork,
    WrittenReport,
    write_detailed,
)
from cds_service.results import AnalysisResult

log = logging.getLogger(__name__)


class StudyImageSource(Protocol):
    """Where the pixels come from (cds_service.imaging.study.StudyImages in the service)."""

    def load(self, study: dict[str, Any], fhir_server: str | None) -> DecodedImage: ...


class ImagePipelineBackend:
    """BatchBackend over a ReportWriter and a study image source.

    NotAnalysable and UnsupportedImage become a "not-analysed" result with the reason; network
    and FHIR failures propagate so the worker retries the job. A study that comes with its
    DICOM bytes (`StudyWork.dicom`) is decoded from them under `limits`, with the same
    frontal-chest check, and its images are not fetched.
    """

    def __init__(
        self, writer: ReportWriter, images: StudyImageSource, limits: ImageLimits = DEFAULT_LIMITS
    ) -> None:
        self.writer = writer
        self.images = images
        self.limits = limits
        self.model = writer.model

    def analyse(self, study_uid: str, study: dict[str, Any]) -> AnalysisResult:
        return self.analyse_from(study_uid, study, None)

    def analyse_from(
        self, study_uid: str, study: dict[str, Any], fhir_server: str | None
    ) -> AnalysisResult:
        outcome = self.analyse_batch([StudyWork(study_uid, study, fhir_server)])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def analyse_batch(self, work: Sequence[StudyWork]) -> list[AnalysisResult | Exception]:
        """Fetch every study's image, then have the model write all their reports at once."""
        outcomes: list[AnalysisResult | Exception | None] = [None] * len(work)
        loaded: list[tuple[int, DecodedImage]] = []
        for index, item in enumerate(work):
            try:
                loaded.append((index, self._image(item)))
            except NotAnalysable as exc:
                outcomes[index] = self._not_analysed(item.study_uid, item.study, exc.reason)
            except UnsupportedImage as exc:
                reason = f"image cannot be read: {exc.description}"
                outcomes[index] = self._not_analysed(item.study_uid, item.study, reason)
            except Exception as exc:  # noqa: BLE001 - one study's fetch fails that study alone
                outcomes[index] = exc
        if loaded:
            requests = [ReportRequest(image.pixels) for _, image in loaded]
            started = time.monotonic()
            try:
                reports = write_detailed(self.writer, requests)
            except ModelUnavailable:
                raise
            except Exception as exc:  # noqa: BLE001 - the batch failed: each study says so
                reports = None
                for index, _ in loaded:
                    outcomes[index] = exc
            if reports is not None:
                _record_generation(time.monotonic() - started, reports)
                if len(reports) != len(loaded):
                    raise RuntimeError(
                        f"the report writer returned {len(reports)} texts for {len(loaded)} images"
                    )
                for (index, image), report in zip(loaded, reports, strict=True):
                    outcomes[index] = self._result(work[index], image, report)
        return [outcome for outcome in outcomes if outcome is not None]

    def _image(self, item: StudyWork) -> DecodedImage:
        """The study's frontal chest image: from the bytes the job came with, else fetched."""
        if item.dicom is not None:
            return decode_dicom_bytes(item.dicom, limits=self.limits)
        return self.images.load(item.study, item.fhir_server)

    def _result(
        self, item: StudyWork, image: DecodedImage, report: WrittenReport
    ) -> AnalysisResult:
        if report.truncated:
            # A report cut before it mentions, say, pneumothorax would read (and be coded) as
            # "no pneumothorax": never store it as complete. Greedy decoding would cut it again,
            # so this is final rather than a retry.
            reason = truncation_reason(report.new_tokens)
            return self._not_analysed(item.study_uid, item.study, reason)
        text = report.text
        log.info("study analysed (%d x %d image)", *image.pixels.shape)
        return AnalysisResult(
            study_uid=item.study_uid,
            model=self.model,
            status="completed",
            report_text=text,
            findings=findings_from_report(text),
            study_started=item.study.get("started"),
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


def _record_generation(seconds: float, reports: Sequence[WrittenReport]) -> None:
    # Imported here: `cxr-cds serve` imports this module before it sets the metrics
    # directory that prometheus_client must see first (cds_service.observability.multiproc).
    from cds_service.observability import metrics

    tokens = sum(report.new_tokens or 0 for report in reports)
    metrics.record_generation(seconds, len(reports), tokens)


def truncation_reason(new_tokens: int | None) -> str:
    where = f" at {new_tokens} tokens" if new_tokens is not None else " at its token limit"
    return f"the model's report was cut off{where}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
