"""The SQLite job queue and result store: no duplicate jobs, crashed work is retried, no loss."""

from __future__ import annotations

import logging
import multiprocessing
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cds_service.inference.base import ModelUnavailable
from cds_service.inference.engine import BatchEngine, BatchResult
from cds_service.inference.simulated import SIMULATED_MODEL, SimulatedBackend
from cds_service.jobs.worker import (
    MAX_ATTEMPTS,
    ModelAvailability,
    drain,
    process_one,
    run_forever,
)
from cds_service.results import AnalysisResult, ModelInfo
from cds_service.storage.ports import QueueFull, StudyRef
from cds_service.storage.sqlite import open_sqlite_storage


def ref(uid: str) -> StudyRef:
    return StudyRef("https://ehr.example", uid, "p1")


STUDY = {"resourceType": "ImagingStudy", "id": "s1", "started": "2026-11-20T10:00:00+00:00"}


def test_enqueue_is_idempotent_per_study_and_model(tmp_path: Path) -> None:
    store = open_sqlite_storage(tmp_path / "q.sqlite3")
    assert store.jobs.enqueue(ref("1.2.3"), SIMULATED_MODEL, STUDY, None)
    assert not store.jobs.enqueue(ref("1.2.3"), SIMULATED_MODEL, STUDY, None)
    assert store.jobs.queue_depth(SIMULATED_MODEL) == 1
    assert drain(store, SimulatedBackend()) == 1
    stored = store.results.get_result(ref("1.2.3"), SIMULATED_MODEL)
    assert stored is not None and stored.result.status == "completed"
    assert stored.result.report_text.startswith("SIMULATED")
    assert stored.patient_id == "p1"
    # Another data source with the same Study UID sees nothing.
    other = StudyRef("https://other-ehr.example", "1.2.3", "p1")
    assert store.results.get_result(other, SIMULATED_MODEL) is None
    assert store.jobs.queue_depth(SIMULATED_MODEL) == 0


def test_full_queue_refuses_cleanly(tmp_path: Path) -> None:
    store = open_sqlite_storage(tmp_path / "q.sqlite3", max_queue=2)
    store.jobs.enqueue(ref("1"), SIMULATED_MODEL, STUDY, None)
    store.jobs.enqueue(ref("2"), SIMULATED_MODEL, STUDY, None)
    with pytest.raises(QueueFull):
        store.jobs.enqueue(ref("3"), SIMULATED_MODEL, STUDY, None)


def test_job_of_a_crashed_worker_is_taken_again(tmp_path: Path) -> None:
    store = open_sqlite_storage(tmp_path / "q.sqlite3")
    store.jobs.enqueue(ref("1.2.3"), SIMULATED_MODEL, STUDY, None)
    claimed = store.jobs.claim(SIMULATED_MODEL)
    assert claimed is not None
    assert store.jobs.claim(SIMULATED_MODEL) is None  # running, not stale yet
    # The worker died without finishing: after the stale timeout the job is claimed again.
    again = store.jobs.claim(SIMULATED_MODEL, stale_after_s=-1)
    assert again is not None and again.id == claimed.id and again.attempts == 2


class Exploding(SimulatedBackend):
    def analyse(self, study_uid: str, study: dict[str, Any]) -> AnalysisResult:
        raise RuntimeError("GPU fell off the bus")


def test_failing_backend_retries_then_records_failure(tmp_path: Path) -> None:
    store = open_sqlite_storage(tmp_path / "q.sqlite3")
    store.jobs.enqueue(ref("9.9"), SIMULATED_MODEL, STUDY, None)
    for attempt in range(MAX_ATTEMPTS):
        assert process_one(store, Exploding())
        if attempt < MAX_ATTEMPTS - 1:
            # Retried after a pause, not at once: until then the job waits, with the reason.
            assert not process_one(store, Exploding())
            assert "GPU fell off the bus" in (
                store.jobs.waiting_reason(ref("9.9"), SIMULATED_MODEL) or ""
            )
            store.jobs.release_waiting()  # the pause is over
    assert not process_one(store, Exploding())
    stored = store.results.get_result(ref("9.9"), SIMULATED_MODEL)
    assert stored is not None and stored.result.status == "failed"
    assert "failed" in stored.result.reason
    assert store.jobs.queue_depth(SIMULATED_MODEL) == 0


def job_rows(path: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(path) as conn:
        return [(str(r[0]), int(r[1])) for r in conn.execute("SELECT status, attempts FROM jobs")]


class Unavailable(SimulatedBackend):
    def analyse(self, study_uid: str, study: dict[str, Any]) -> AnalysisResult:
        raise ModelUnavailable("the inference engine is stopped")


def test_an_unavailable_model_puts_the_job_back_without_using_an_attempt(tmp_path: Path) -> None:
    store = open_sqlite_storage(tmp_path / "q.sqlite3")
    store.jobs.enqueue(ref("9.9"), SIMULATED_MODEL, STUDY, None)
    for _ in range(MAX_ATTEMPTS + 2):
        with pytest.raises(ModelUnavailable):
            process_one(store, Unavailable())
    assert job_rows(tmp_path / "q.sqlite3") == [("queued", 0)]
    assert store.results.get_result(ref("9.9"), SIMULATED_MODEL) is None
    assert drain(store, SimulatedBackend()) == 1  # once the model is back, it is analysed
    assert job_rows(tmp_path / "q.sqlite3") == [("done", 1)]


ENGINE_MODEL = ModelInfo(model_id="engine-test-model", version="1")


class EngineBackend:
    """A Backend whose "model" runs in a real BatchEngine; the item "hang" blocks its batch
    until `release` is set, which makes the engine's watchdog declare the model hung."""

    model = ENGINE_MODEL

    def __init__(self) -> None:
        self.release = threading.Event()
        self.engine: BatchEngine[str, str] = BatchEngine(
            self._run_batch, max_batch_size=1, timeout_s=30, hang_s=0.2
        ).start()

    def _run_batch(self, items: list[str]) -> BatchResult[str]:
        if "hang" in items:
            self.release.wait(30)
        return BatchResult([f"report on {item}" for item in items])

    def analyse(self, study_uid: str, study: dict[str, Any]) -> AnalysisResult:
        (text,) = self.engine.run([study_uid])
        return AnalysisResult(
            study_uid=study_uid, model=self.model, status="completed", report_text=text
        )


def wait_until(condition: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


def test_jobs_wait_out_an_unhealthy_engine_and_complete_once_it_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cds_service.jobs.worker")
    path = tmp_path / "q.sqlite3"
    store = open_sqlite_storage(path)
    backend = EngineBackend()
    stop = threading.Event()
    worker = threading.Thread(
        target=run_forever,
        args=(store, backend, stop),
        kwargs={"poll_s": 0.02, "availability": ModelAvailability(0.02, 0.05)},
    )
    try:
        backend.engine.submit("hang")
        assert wait_until(lambda: not backend.engine.healthy)
        uids = [f"1.2.{index}" for index in range(3)]
        for uid in uids:
            store.jobs.enqueue(
                StudyRef("https://ehr.example", uid, "p1"), ENGINE_MODEL, STUDY, None
            )
        worker.start()
        time.sleep(1.0)  # some twenty claims, far more than MAX_ATTEMPTS
        assert job_rows(path) == [("queued", 0)] * 3  # nothing finalised as failed
        backend.release.set()  # the hung batch returns: the engine is healthy again
        assert wait_until(lambda: job_rows(path) == [("done", 1)] * 3)
    finally:
        stop.set()
        backend.release.set()
        if worker.is_alive():
            worker.join(5)
        backend.engine.stop()
    for uid in uids:
        stored = store.results.get_result(StudyRef("https://ehr.example", uid, "p1"), ENGINE_MODEL)
        assert stored is not None and stored.result.status == "completed"
        assert stored.result.report_text == f"report on {uid}"
    messages = [r.getMessage() for r in caplog.records if r.name == "cds_service.jobs.worker"]
    assert sum("model is unavailable" in m for m in messages) == 1  # once, not per claim
    assert sum("available again" in m for m in messages) == 1
    assert not any(uid in m for m in messages for uid in uids)  # no study identifiers


def test_replay_cache_remembers_across_connections(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    first, second = open_sqlite_storage(path), open_sqlite_storage(path)
    exp = int(time.time()) + 300
    assert first.replay.remember_jti("iss", "abc", exp)
    assert not second.replay.remember_jti("iss", "abc", exp)
    assert second.replay.remember_jti("other-iss", "abc", exp)


def _claim_many(path: str, out: Any) -> None:
    store = open_sqlite_storage(path)
    while (job := store.jobs.claim(SIMULATED_MODEL)) is not None:
        out.put(job.id)


def test_two_worker_processes_never_take_the_same_job(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    store = open_sqlite_storage(path)
    for index in range(60):
        store.jobs.enqueue(ref(f"1.{index}"), SIMULATED_MODEL, STUDY, None)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_claim_many, args=(str(path), queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    ids = [queue.get(timeout=5) for _ in range(60)]
    assert len(set(ids)) == 60


OLD_JOBS_SCHEMA = """
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL, study_uid TEXT NOT NULL, patient_id TEXT,
    model_id TEXT NOT NULL, model_version TEXT NOT NULL,
    fhir_server TEXT, study_resource TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0, error TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE results (
    tenant TEXT NOT NULL, study_uid TEXT NOT NULL,
    model_id TEXT NOT NULL, model_version TEXT NOT NULL, patient_id TEXT,
    status TEXT NOT NULL, body TEXT NOT NULL, created_at REAL NOT NULL,
    PRIMARY KEY (tenant, study_uid, model_id, model_version)
);
"""


def test_a_file_from_before_schema_versions_is_migrated_not_broken(tmp_path: Path) -> None:
    import json as json_module

    from cds_service.storage.sqlite.schema import SCHEMA_VERSION

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_JOBS_SCHEMA)
        conn.execute(
            "INSERT INTO jobs (tenant, study_uid, patient_id, model_id, model_version, "
            "fhir_server, study_resource, status, created_at, updated_at) "
            "VALUES ('t', '1.2.3', 'p', ?, ?, NULL, ?, 'queued', 0, 0)",
            (SIMULATED_MODEL.model_id, SIMULATED_MODEL.version, json_module.dumps(STUDY)),
        )
    store = open_sqlite_storage(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        jobs = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
        results = {row[1] for row in conn.execute("PRAGMA table_info(results)")}
    assert "not_before" in jobs and "filed_location" in results
    job = store.jobs.claim(SIMULATED_MODEL)
    assert job is not None and job.ref.study_uid == "1.2.3"
    open_sqlite_storage(path)  # opening it again changes nothing
