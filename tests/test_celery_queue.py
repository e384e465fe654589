"""The Celery queue's parts that need no broker: which changes wake a worker, the sweep that
makes up for lost wake-ups, and a worker's time slice (tests/test_scale_out.py runs the whole
thing on real Redis and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cds_service.composition import Composition
from cds_service.config import ConfigurationError, Settings
from cds_service.inference.simulated import SimulatedReportWriter
from cds_service.jobs.celery_queue import Sweeper, WakingJobQueue, slice_of_work
from cds_service.results import AnalysisResult
from cds_service.storage.sqlite import open_sqlite_storage
from tests.test_worker_batches import queue

MODEL = SimulatedReportWriter().model


class CountingWakeups:
    """Stands in for the broker (a mock: these tests are about when to wake, not Redis)."""

    def __init__(self, waiting: int | None = 0) -> None:
        self.sent = 0
        self._waiting = waiting

    def wake(self, count: int = 1) -> None:
        self.sent += count

    def waiting(self) -> int | None:
        return self._waiting


def test_a_new_job_wakes_a_worker_and_a_known_one_does_not(tmp_path: Path) -> None:
    storage = open_sqlite_storage(tmp_path / "q.sqlite3")
    wakeups = CountingWakeups()
    jobs = WakingJobQueue(storage.jobs, wakeups)  # type: ignore[arg-type]
    [ref] = queue(storage, MODEL, ["s0"])  # queued before the wrapper: no wake-up
    assert wakeups.sent == 0
    assert not jobs.enqueue(ref, MODEL, {"resourceType": "ImagingStudy", "id": "s0"}, None)
    assert wakeups.sent == 0  # already live: nothing new to do
    other = type(ref)(ref.source, "1.2.new", "p1")
    assert jobs.enqueue(other, MODEL, {"resourceType": "ImagingStudy", "id": "n"}, None)
    assert wakeups.sent == 1
    # An image given to a live job makes it claimable at once: wake.
    assert not jobs.enqueue(ref, MODEL, {"resourceType": "ImagingStudy"}, None, b"DICM")
    assert wakeups.sent == 2


def test_requeue_and_released_waits_wake_one_worker_per_job(tmp_path: Path) -> None:
    storage = open_sqlite_storage(tmp_path / "q.sqlite3")
    wakeups = CountingWakeups()
    jobs = WakingJobQueue(storage.jobs, wakeups)  # type: ignore[arg-type]
    queue(storage, MODEL, ["a", "b", "c"])
    for job in storage.jobs.claim_batch(MODEL, 3):
        final = AnalysisResult(job.ref.study_uid, MODEL, "failed", reason="test")
        storage.jobs.fail(job, "test", final=final)
    assert jobs.requeue(MODEL, dry_run=True) == 3 and wakeups.sent == 0
    assert jobs.requeue(MODEL) == 3 and wakeups.sent == 3
    for job in storage.jobs.claim_batch(MODEL, 2):
        storage.jobs.defer(job, "no access", 300)
    assert jobs.release_waiting() == 2 and wakeups.sent == 5


def test_the_sweep_wakes_only_when_work_waits_without_a_message(tmp_path: Path) -> None:
    storage = open_sqlite_storage(tmp_path / "q.sqlite3")
    idle = CountingWakeups(waiting=0)
    assert not Sweeper(storage.jobs, MODEL, idle).sweep()  # nothing queued
    queue(storage, MODEL, ["a"])
    assert Sweeper(storage.jobs, MODEL, idle).sweep() and idle.sent == 1  # a lost wake-up
    busy = CountingWakeups(waiting=3)
    assert not Sweeper(storage.jobs, MODEL, busy).sweep()  # messages wait already
    down = CountingWakeups(waiting=None)
    assert not Sweeper(storage.jobs, MODEL, down).sweep()  # broker down: nothing to send to
    # A running job (its lease may lapse) keeps the sweep looking.
    storage.jobs.claim_batch(MODEL, 1)
    assert Sweeper(storage.jobs, MODEL, idle).sweep() and idle.sent == 2


def test_a_slice_runs_batches_until_empty_or_over_then_hands_over() -> None:
    wakeups = CountingWakeups()
    batches = iter([8, 8, 3, 0])
    assert slice_of_work(lambda: next(batches), wakeups, 60.0) == 19  # type: ignore[arg-type]
    assert wakeups.sent == 0  # the queue ran dry: nobody to wake
    now = iter([0.0, 10.0, 61.0])
    more = iter([8, 8, 8])
    done = slice_of_work(lambda: next(more), wakeups, 60.0, clock=lambda: next(now))  # type: ignore[arg-type]
    assert done == 16 and wakeups.sent == 1  # slice over with work left: another worker wakes


def test_celery_mode_needs_redis_and_postgresql(tmp_path: Path) -> None:
    base = {"mode": "demo", "public_url": "http://127.0.0.1:1", "database": tmp_path / "x"}
    with pytest.raises(ConfigurationError, match="CXR_CDS_REDIS_URL"):
        Settings(**base, queue="celery").validated()  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="postgresql://"):
        Settings(**base, database_url="mysql://x/y").validated()  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="CXR_CDS_QUEUE"):
        Settings(**base, queue="rabbit").validated()  # type: ignore[arg-type]


def test_settings_read_the_database_url_from_a_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "db-url"
    secret.write_text("postgresql://cds:s3cret@db:5432/cds\n")
    env = {
        "CXR_CDS_MODE": "demo",
        "CXR_CDS_PUBLIC_URL": "http://127.0.0.1:1",
        "CXR_CDS_DATABASE_URL_FILE": str(secret),
    }
    settings = Settings.from_env(env)
    assert settings.database_url == "postgresql://cds:s3cret@db:5432/cds"
    assert "s3cret" not in repr(settings)  # never shown in a log line or traceback


def test_the_embedded_queue_is_not_wrapped(tmp_path: Path) -> None:
    parts = Composition(Settings(database=tmp_path / "q.sqlite3", public_url="http://x"))
    assert not isinstance(parts.storage.jobs, WakingJobQueue)
