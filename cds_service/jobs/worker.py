"""The inference worker: drains the job queue through one backend; a crash loses no job.

While the model is unavailable (the engine stopped or hung) jobs go back to the queue without
using up an attempt and the worker waits, longer each time, before it tries again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime

from cds_service.config import HEARTBEAT_S, JOB_LEASE_S
from cds_service.errors import CdsServiceError
from cds_service.fhir.client import FhirError
from cds_service.imaging.errors import NoAccess
from cds_service.inference.base import (
    Backend,
    BatchBackend,
    ModelUnavailable,
    SourceAwareBackend,
    StudyWork,
)
from cds_service.jobs.filing import ReportFiler
from cds_service.observability import metrics
from cds_service.results import AnalysisResult
from cds_service.storage.ports import Job, Storage

log = logging.getLogger(__name__)
RETRY_BACKOFF_S = 5.0  # first pause before a failed job is tried again
MAX_ATTEMPTS = 3
FIRST_UNAVAILABLE_WAIT_S = 2.0
MAX_UNAVAILABLE_WAIT_S = 30.0
NO_ACCESS_RETRY_S = 300.0  # a job without access to its EHR is tried again this much later
_WARNED_NO_ACCESS: set[str | None] = set()  # FHIR bases (not PHI) already logged


def process_one(store: Storage, backend: Backend, filer: ReportFiler | None = None) -> bool:
    """Run the oldest queued job; False when the queue was empty.

    Raises ModelUnavailable, after putting the job back uncounted, when the model cannot take
    work now: the caller waits before it claims again.
    """
    return process_batch(store, backend, filer, batch_size=1) > 0


def process_batch(
    store: Storage,
    backend: Backend,
    filer: ReportFiler | None = None,
    batch_size: int = 1,
    owner: str | None = None,
    lease_s: float = JOB_LEASE_S,
) -> int:
    """Claim up to ``batch_size`` queued jobs in one transaction and run them as one batch
    (a BatchBackend hands all their images to the model together); returns how many jobs
    were claimed, 0 when the queue was empty.

    Each job ends on its own: a study whose image cannot be fetched fails (and is retried)
    alone. Raises ModelUnavailable, after putting every claimed job back uncounted, when the
    model cannot take work now.
    """
    jobs = store.jobs.claim_batch(backend.model, batch_size, lease_s, owner=owner)
    if not jobs:
        return 0
    try:
        outcomes = _analyse(backend, jobs)
    except ModelUnavailable as exc:
        for job in jobs:
            store.jobs.put_back(job, f"{type(exc).__name__}: {exc}")
            metrics.record_outcome(metrics.PUT_BACK)
        raise
    metrics.record_batch(len(jobs))
    if len(jobs) > 1:
        log.info("analysed a batch of %d jobs", len(jobs))
    for job, outcome in zip(jobs, outcomes, strict=True):
        if isinstance(outcome, NoAccess):
            _wait_for_access(store, job, outcome)
        elif isinstance(outcome, Exception):
            _record_failure(store, job, outcome)
        else:
            _finish(store, filer, job, outcome)
    return len(jobs)


def _analyse(backend: Backend, jobs: list[Job]) -> list[AnalysisResult | Exception]:
    """One outcome per job, in order. ModelUnavailable propagates (nothing was analysed)."""
    if isinstance(backend, BatchBackend):
        # A job's own DICOM (queued by the viewer) is analysed as it is: no fetch, so no
        # "no access" wait for an EHR that gave the service none.
        work = [StudyWork(j.ref.study_uid, j.study_resource, j.fhir_server, j.dicom) for j in jobs]
        outcomes = backend.analyse_batch(work)
        if len(outcomes) != len(jobs):
            raise RuntimeError(f"the backend answered {len(outcomes)} of {len(jobs)} studies")
        return outcomes
    answers: list[AnalysisResult | Exception] = []
    for job in jobs:
        try:
            if isinstance(backend, SourceAwareBackend):
                answers.append(
                    backend.analyse_from(job.ref.study_uid, job.study_resource, job.fhir_server)
                )
            else:
                answers.append(backend.analyse(job.ref.study_uid, job.study_resource))
        except ModelUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad study must not stop the worker
            answers.append(exc)
    return answers


def _finish(store: Storage, filer: ReportFiler | None, job: Job, result: AnalysisResult) -> None:
    if result.status == "completed" and not result.report_text.strip():
        # An empty report is not "no finding": say that nothing was analysed.
        result = replace(
            result, status="not-analysed", findings=(), reason="the model returned no text"
        )
    # Filed before the job is closed: a worker killed in between runs the job again and files
    # again, which the EHR's conditional create (a stable report identifier) makes a no-op.
    # Closed first, a kill would leave a finished job whose report nobody ever files.
    location = None
    if filer is not None and result.status == "completed":
        location = _file(filer, job, result)
    store.jobs.finish(job, result, filed_location=location)
    metrics.record_result(result.status, job.created_at)
    log.info("analysed job %s (%s)", job.id, result.status)


def _file(filer: ReportFiler, job: Job, result: AnalysisResult) -> str | None:
    """Where the EHR keeps the report. Write-back failures leave the result unfiled (None):
    the card then offers 'File AI report'."""
    try:
        written = filer.file(job, result)
    except (FhirError, ValueError, CdsServiceError) as exc:
        log.warning("job %s: report not filed: %s", job.id, type(exc).__name__)
        return None
    return written.report_location if written is not None else None


def _wait_for_access(store: Storage, job: Job, exc: NoAccess) -> None:
    """No access to the study's EHR: the job waits, uncounted, with the reason, and is tried
    again later (at once when a worker restarts with new settings); never a final result."""
    if exc.fhir_server not in _WARNED_NO_ACCESS:
        _WARNED_NO_ACCESS.add(exc.fhir_server)
        log.warning("jobs wait: %s", exc.description)
    store.jobs.defer(job, exc.description, NO_ACCESS_RETRY_S)
    metrics.record_outcome(metrics.WAITING_FOR_ACCESS)


def _record_failure(store: Storage, job: Job, exc: Exception) -> None:
    log.warning("job %s attempt %s failed: %s", job.id, job.attempts, type(exc).__name__)
    error = f"{type(exc).__name__}: {exc}"
    if job.attempts < MAX_ATTEMPTS:
        # A network or EHR hiccup: try again after a pause that doubles with each attempt.
        store.jobs.fail(job, error, retry_in_s=RETRY_BACKOFF_S * 2 ** (job.attempts - 1))
        metrics.record_outcome(metrics.RETRIED)
        return
    store.jobs.fail(
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
    metrics.record_result(metrics.FAILED, job.created_at)


def drain(
    store: Storage, backend: Backend, filer: ReportFiler | None = None, batch_size: int = 1
) -> int:
    """Process jobs until the queue is empty; returns how many were processed. Raises
    ModelUnavailable (the jobs put back) when the model cannot take work."""
    count = 0
    while claimed := process_batch(store, backend, filer, batch_size):
        count += claimed
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


def worker_name() -> str:
    """This worker's name in the registry and on its leases (host, process, thread)."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


@contextmanager
def heartbeats(
    store: Storage, name: str, model_label: str, availability: ModelAvailability
) -> Iterator[None]:
    """While inside: say every HEARTBEAT_S that worker ``name`` is alive (and whether its model
    is), and renew the leases of the jobs it runs, from a thread of its own so that leases
    are renewed during a long batch too."""
    beating = threading.Event()

    def beat() -> None:
        while not beating.is_set():
            problem = (
                f"the model is unavailable (next try in {availability.wait_s:.0f} s)"
                if availability.wait_s
                else None
            )
            try:
                store.workers.heartbeat(name, model_label, problem)
                store.jobs.renew_leases(name)
            except store.errors as exc:
                log.warning("job store error on heartbeat: %s", exc)
            beating.wait(HEARTBEAT_S)

    thread = threading.Thread(target=beat, name="worker-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        beating.set()
        thread.join(timeout=HEARTBEAT_S)


def run_forever(
    store: Storage,
    backend: Backend,
    stop: threading.Event,
    poll_s: float = 0.2,
    filer: ReportFiler | None = None,
    availability: ModelAvailability | None = None,
    batch_size: int = 1,
    lease_s: float = JOB_LEASE_S,
) -> None:
    """Claim and run batches of up to ``batch_size`` jobs (CXR_CDS_MODEL_BATCH_SIZE) until
    ``stop`` is set."""
    log.info(
        "inference worker started for %s (batches of up to %d)", backend.model.label, batch_size
    )
    availability = availability or ModelAvailability()
    released = store.jobs.release_waiting()
    if released:
        log.info("%d waiting jobs released: the settings may now give access", released)
    name = worker_name()
    with heartbeats(store, name, backend.model.label, availability):
        _work(store, backend, stop, poll_s, filer, availability, batch_size, name, lease_s)
    log.info("inference worker stopped")


def _work(
    store: Storage,
    backend: Backend,
    stop: threading.Event,
    poll_s: float,
    filer: ReportFiler | None,
    availability: ModelAvailability,
    batch_size: int,
    name: str,
    lease_s: float,
) -> None:
    while not stop.is_set():
        try:
            busy = process_batch(store, backend, filer, batch_size, name, lease_s) > 0
        except ModelUnavailable as exc:
            stop.wait(availability.unavailable(exc))
            continue
        except store.errors as exc:
            # A locked or briefly unavailable database must not end the worker.
            log.warning("job store error: %s; retrying", exc)
            busy = False
        if busy:
            availability.available()  # a job got through to the model (or failed on its own)
        else:
            stop.wait(poll_s)
