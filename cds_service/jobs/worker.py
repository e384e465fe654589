"""The inference worker: drains the job queue through one backend; a crash loses no job.

While the model is unavailable (the engine stopped or hung) jobs go back to the queue without
using up an attempt and the worker waits, longer each time, before it tries again.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import replace
from datetime import UTC, datetime

from cds_service.errors import CdsServiceError
from cds_service.fhir.client import FhirError
from cds_service.inference.base import Backend, ModelUnavailable, SourceAwareBackend
from cds_service.jobs.filing import ReportFiler
from cds_service.jobs.sqlite_store import Job, SqliteStore
from cds_service.results import AnalysisResult

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3
FIRST_UNAVAILABLE_WAIT_S = 2.0
MAX_UNAVAILABLE_WAIT_S = 30.0


def process_one(store: SqliteStore, backend: Backend, filer: ReportFiler | None = None) -> bool:
    """Run the oldest queued job; False when the queue was empty.

    Raises ModelUnavailable, after putting the job back uncounted, when the model cannot take
    work now: the caller waits before it claims again.
    """
    job = store.claim(backend.model)
    if job is None:
        return False
    try:
        if isinstance(backend, SourceAwareBackend):
            result = backend.analyse_from(job.ref.study_uid, job.study_resource, job.fhir_server)
        else:
            result = backend.analyse(job.ref.study_uid, job.study_resource)
    except ModelUnavailable as exc:
        store.put_back(job, f"{type(exc).__name__}: {exc}")
        raise
    except Exception as exc:  # noqa: BLE001 - one bad study must not stop the worker
        _record_failure(store, job, exc)
        return True
    if result.status == "completed" and not result.report_text.strip():
        # An empty report is not "no finding": say that nothing was analysed.
        result = replace(
            result, status="not-analysed", findings=(), reason="the model returned no text"
        )
    store.finish(job, result)
    log.info("analysed job %s (%s)", job.id, result.status)
    if filer is not None and result.status == "completed":
        _file(store, filer, job, result)
    return True


def _file(store: SqliteStore, filer: ReportFiler, job: Job, result: AnalysisResult) -> None:
    """Write-back failures leave the result unfiled: the card then offers 'File AI report'."""
    try:
        written = filer.file(job, result)
    except (FhirError, ValueError, CdsServiceError) as exc:
        log.warning("job %s: report not filed: %s", job.id, type(exc).__name__)
        return
    if written is not None:
        store.mark_filed(job.ref.tenant, job.ref.study_uid, job.model, written.report_location)


def _record_failure(store: SqliteStore, job: Job, exc: Exception) -> None:
    log.warning("job %s attempt %s failed: %s", job.id, job.attempts, type(exc).__name__)
    error = f"{type(exc).__name__}: {exc}"
    if job.attempts < MAX_ATTEMPTS:
        store.fail(job, error)
        return
    store.fail(
        job,
        error,
        final=AnalysisResult(
            study_uid=job.ref.study_uid,
            model=job.model,
            status="failed",
            reason="analysis failed after repeated errors",
            analysed_at=datetime.now(UTC).isoformat(timespec="seconds"),
        ),
    )


def drain(store: SqliteStore, backend: Backend, filer: ReportFiler | None = None) -> int:
    """Process jobs until the queue is empty; returns how many were processed. Raises
    ModelUnavailable (the job put back) when the model cannot take work."""
    count = 0
    while process_one(store, backend, filer):
        count += 1
    return count


class ModelAvailability:
    """How long to wait before the next claim while the model is unavailable (doubling up to
    a limit); logs each change of availability once."""

    def __init__(
        self,
        first_wait_s: float = FIRST_UNAVAILABLE_WAIT_S,
        max_wait_s: float = MAX_UNAVAILABLE_WAIT_S,
    ) -> None:
        self._first_wait_s = first_wait_s
        self._max_wait_s = max(first_wait_s, max_wait_s)
        self.wait_s = 0.0  # 0 while the model is available

    def unavailable(self, exc: ModelUnavailable) -> float:
        """The seconds to wait before claiming again."""
        if self.wait_s == 0.0:
            self.wait_s = self._first_wait_s
            log.warning(
                "the model is unavailable (%s); queued jobs wait without using up attempts, "
                "next try in %.1f s",
                exc.description,
                self.wait_s,
            )
        else:
            self.wait_s = min(self._max_wait_s, self.wait_s * 2)
        return self.wait_s

    def available(self) -> None:
        if self.wait_s != 0.0:
            self.wait_s = 0.0
            log.warning("the model is available again; serving queued jobs")


def run_forever(
    store: SqliteStore,
    backend: Backend,
    stop: threading.Event,
    poll_s: float = 0.2,
    filer: ReportFiler | None = None,
    availability: ModelAvailability | None = None,
) -> None:
    log.info("inference worker started for %s", backend.model.label)
    availability = availability or ModelAvailability()
    while not stop.is_set():
        try:
            busy = process_one(store, backend, filer)
        except ModelUnavailable as exc:
            stop.wait(availability.unavailable(exc))
            continue
        except sqlite3.Error as exc:
            # A locked or briefly unavailable database must not end the worker.
            log.warning("job store error: %s; retrying", exc)
            busy = False
        if busy:
            availability.available()  # a job got through to the model (or failed on its own)
        else:
            stop.wait(poll_s)
    log.info("inference worker stopped")
