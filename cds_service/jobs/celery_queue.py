"""Scale-out queue (CXR_CDS_QUEUE=celery): Celery on Redis carries wake-ups, PostgreSQL keeps
the jobs.

A message says only "there is work for this model"; the job itself, its lease and its result
live in the database, whose unique keys hold exactly-once. So a message delivered twice, a
worker killed mid-batch (its message goes back to Redis: late acknowledgement, rejected when
the worker is lost) or a Redis that restarts and forgets its messages never analyses a film
twice nor loses one:

- every change that makes a job claimable (enqueue, requeue, released waits) publishes one
  wake-up (`WakingJobQueue`); publishing never fails the caller;
- a woken worker claims batches of up to CXR_CDS_MODEL_BATCH_SIZE jobs from the database
  (`FOR UPDATE SKIP LOCKED` there: workers on any number of machines each form their own
  batches) until none is left or its time slice ends, then wakes another;
- each worker sweeps the database every few seconds and publishes a wake-up when jobs are
  claimable while no message waits: retries after their backoff, leases of dead workers,
  and anything a lost message would have started.

Prefetch is 1 and the broker's visibility timeout is above the longest time slice, so a
message is redelivered only when its worker died.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from cds_service.imaging.limits import DEFAULT_MAX_BYTES
from cds_service.inference.base import Backend, ModelUnavailable
from cds_service.results import AnalysisResult, ModelInfo
from cds_service.storage.ports import Job, JobQueue, Storage, StudyRef

if TYPE_CHECKING:
    from cds_service.jobs.filing import ReportFiler

log = logging.getLogger(__name__)

TASK = "cxr_cds.analyse_queued"
# One queue for the deployment (KEDA scales the workers on its length). A worker of another
# model version that takes a wake-up claims nothing; the sweep of the right one makes up.
QUEUE = "cxr-cds-analyses"
SWEEP_S = 5.0
MAX_WAKEUPS = 1000  # per call: a requeue of many studies needs no more to wake every worker


def celery_app(redis_url: str, time_slice_s: float) -> Any:
    """The Celery app for publishing and for workers; the broker's visibility timeout is
    well above a worker's time slice (a batch cannot outlast its slice by much)."""
    from celery import Celery

    app = Celery("cxr_cds", broker=redis_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=QUEUE,
        broker_transport_options={"visibility_timeout": int(max(3600.0, 4 * time_slice_s))},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits for Redis to come back
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


class Wakeups:
    """Publishes wake-ups; a failure to publish is logged, never raised (the sweep makes up)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._warned = False

    def wake(self, count: int = 1) -> None:
        try:
            for _ in range(min(count, MAX_WAKEUPS)):
                self.app.send_task(TASK, queue=QUEUE, retry=False)
        except Exception as exc:  # noqa: BLE001 - the broker is down: the job is safe in the database
            if not self._warned:
                log.warning(
                    "cannot reach the Celery broker (%s): queued jobs wait for a worker's sweep",
                    type(exc).__name__,
                )
                self._warned = True
            return
        self._warned = False

    def waiting(self) -> int | None:
        """Messages waiting in the queue (None: the broker did not answer)."""
        try:
            with self.app.connection_for_read() as conn:
                return int(conn.default_channel.client.llen(QUEUE))
        except Exception:  # noqa: BLE001 - reported as unknown
            return None


class WakingJobQueue:
    """A JobQueue that wakes a worker after each change that makes a job claimable."""

    def __init__(self, inner: JobQueue, wakeups: Wakeups) -> None:
        self.inner = inner
        self.wakeups = wakeups

    def enqueue(
        self,
        ref: StudyRef,
        model: ModelInfo,
        study_resource: dict[str, Any],
        fhir_server: str | None,
        dicom: bytes | None = None,
        *,
        max_dicom_bytes: int = DEFAULT_MAX_BYTES,
    ) -> bool:
        created = self.inner.enqueue(
            ref, model, study_resource, fhir_server, dicom, max_dicom_bytes=max_dicom_bytes
        )
        if created or dicom is not None:  # new, or a waiting job that now has its image
            self.wakeups.wake()
        return created

    def requeue(
        self,
        model: ModelInfo,
        *,
        study_uid: str | None = None,
        statuses: Iterable[str] = ("not-analysed", "failed"),
        reason: str | None = None,
        fhir_server: str | None = None,
        dry_run: bool = False,
    ) -> int:
        count = self.inner.requeue(
            model,
            study_uid=study_uid,
            statuses=statuses,
            reason=reason,
            fhir_server=fhir_server,
            dry_run=dry_run,
        )
        if count and not dry_run:
            self.wakeups.wake(count)
        return count

    def release_waiting(self) -> int:
        count = self.inner.release_waiting()
        if count:
            self.wakeups.wake(count)
        return count

    def fail(
        self, job: Job, error: str, final: AnalysisResult | None = None, retry_in_s: float = 0.0
    ) -> None:
        self.inner.fail(job, error, final, retry_in_s)  # the sweep wakes a worker after the pause

    def __getattr__(self, name: str) -> Any:
        # Claims, leases, reads: as the database adapter does them.
        return getattr(self.inner, name)


class Sweeper:
    """Every ``every_s``, one wake-up when jobs of ``model`` are claimable (or held by a lease
    that may have lapsed) and no message waits for them."""

    def __init__(
        self, queue: JobQueue, model: ModelInfo, wakeups: Wakeups, every_s: float = SWEEP_S
    ) -> None:
        self.queue = queue
        self.model = model
        self.wakeups = wakeups
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="celery-sweep", daemon=True)

    def sweep(self) -> bool:
        """One sweep; True when it published a wake-up."""
        try:
            counts = self.queue.job_counts(self.model)
        except Exception as exc:  # noqa: BLE001 - the database is down: try at the next sweep
            log.warning("sweep: job store error (%s)", type(exc).__name__)
            return False
        if counts["queued"] == 0 and counts["running"] == 0:
            return False
        if self.wakeups.waiting() != 0:  # messages wait already (or the broker is down)
            return False
        self.wakeups.wake()
        return True

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.every_s)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sweep()


def time_slice_s(lease_s: float) -> float:
    """How long one wake-up keeps a worker claiming batches before it hands over."""
    return max(30.0, 2 * lease_s)


def slice_of_work(
    run_batch: Callable[[], int],
    wakeups: Wakeups,
    slice_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Run batches (``run_batch()`` returns how many jobs it took) until the queue is empty or
    ``slice_s`` is over; then, if work may remain, wake a worker for it. Returns jobs run."""
    deadline = clock() + slice_s
    total = 0
    while True:
        taken = int(run_batch())
        total += taken
        if taken == 0:
            return total
        if clock() >= deadline:
            wakeups.wake()
            return total


def run_celery_worker(
    storage: Storage,
    backend: Backend,
    filer: ReportFiler | None,
    redis_url: str,
    batch_size: int,
    lease_s: float,
) -> None:
    """A Celery worker process with the model loaded once: one task at a time (solo pool,
    prefetch 1), each a slice of batched work claimed from the database. Stops on SIGTERM
    after its current batch (Celery's warm shutdown)."""
    from cds_service.jobs.worker import ModelAvailability, heartbeats, process_batch, worker_name

    slice_s = time_slice_s(lease_s)
    app = celery_app(redis_url, slice_s)
    wakeups = Wakeups(app)
    availability = ModelAvailability()
    name = worker_name()

    def one_batch() -> int:
        try:
            return process_batch(storage, backend, filer, batch_size, name, lease_s)
        except ModelUnavailable as exc:  # the jobs went back; the sweep wakes a worker later
            time.sleep(availability.unavailable(exc))
            return 0
        except storage.errors as exc:
            log.warning("job store error: %s; the sweep will wake a worker again", exc)
            return 0

    def analyse_queued() -> int:
        done = slice_of_work(one_batch, wakeups, slice_s)
        if done:
            availability.available()
        return done

    app.task(name=TASK)(analyse_queued)
    log.info(
        "Celery inference worker for %s (batches of up to %d, queue %s)",
        backend.model.label,
        batch_size,
        QUEUE,
    )
    released = storage.jobs.release_waiting()
    if released:
        log.info("%d waiting jobs released: the settings may now give access", released)
    sweeper = Sweeper(storage.jobs, backend.model, wakeups)
    sweeper.start()
    try:
        with heartbeats(storage, name, backend.model.label, availability):
            app.worker_main(
                [
                    "worker",
                    "--pool=solo",
                    "--concurrency=1",
                    "--prefetch-multiplier=1",
                    f"--queues={QUEUE}",
                    f"--hostname=cxr-cds-{os.getpid()}@%h",
                    "--without-gossip",
                    "--without-mingle",
                    "--loglevel=WARNING",
                ]
            )
    finally:
        sweeper.stop()
    log.info("Celery inference worker stopped")
