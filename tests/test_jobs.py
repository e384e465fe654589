"""The SQLite job queue and result store: no duplicate jobs, crashed work is retried, no loss."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Any

import pytest

from cds_service.inference.simulated import SIMULATED_MODEL, SimulatedBackend
from cds_service.jobs.sqlite_store import QueueFull, SqliteStore, StudyRef
from cds_service.jobs.worker import MAX_ATTEMPTS, drain, process_one
from cds_service.results import AnalysisResult


def ref(uid: str) -> StudyRef:
    return StudyRef("https://ehr.example", uid, "p1")


STUDY = {"resourceType": "ImagingStudy", "id": "s1", "started": "2026-11-20T10:00:00+00:00"}


def test_enqueue_is_idempotent_per_study_and_model(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "q.sqlite3")
    assert store.enqueue(ref("1.2.3"), SIMULATED_MODEL, STUDY, None)
    assert not store.enqueue(ref("1.2.3"), SIMULATED_MODEL, STUDY, None)
    assert store.queue_depth(SIMULATED_MODEL) == 1
    assert drain(store, SimulatedBackend()) == 1
    stored = store.get_result(ref("1.2.3"), SIMULATED_MODEL)
    assert stored is not None and stored.result.status == "completed"
    assert stored.result.report_text.startswith("SIMULATED")
    assert stored.patient_id == "p1"
    # Another tenant with the same Study UID sees nothing.
    other = StudyRef("https://other-ehr.example", "1.2.3", "p1")
    assert store.get_result(other, SIMULATED_MODEL) is None
    assert store.queue_depth(SIMULATED_MODEL) == 0


def test_full_queue_refuses_cleanly(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "q.sqlite3", max_queue=2)
    store.enqueue(ref("1"), SIMULATED_MODEL, STUDY, None)
    store.enqueue(ref("2"), SIMULATED_MODEL, STUDY, None)
    with pytest.raises(QueueFull):
        store.enqueue(ref("3"), SIMULATED_MODEL, STUDY, None)


def test_job_of_a_crashed_worker_is_taken_again(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "q.sqlite3")
    store.enqueue(ref("1.2.3"), SIMULATED_MODEL, STUDY, None)
    claimed = store.claim(SIMULATED_MODEL)
    assert claimed is not None
    assert store.claim(SIMULATED_MODEL) is None  # running, not stale yet
    # The worker died without finishing: after the stale timeout the job is claimed again.
    again = store.claim(SIMULATED_MODEL, stale_after_s=-1)
    assert again is not None and again.id == claimed.id and again.attempts == 2


class Exploding(SimulatedBackend):
    def analyse(self, study_uid: str, study: dict[str, Any]) -> AnalysisResult:
        raise RuntimeError("GPU fell off the bus")


def test_failing_backend_retries_then_records_failure(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "q.sqlite3")
    store.enqueue(ref("9.9"), SIMULATED_MODEL, STUDY, None)
    for _ in range(MAX_ATTEMPTS):
        assert process_one(store, Exploding())
    assert not process_one(store, Exploding())
    stored = store.get_result(ref("9.9"), SIMULATED_MODEL)
    assert stored is not None and stored.result.status == "failed"
    assert "failed" in stored.result.reason
    assert store.queue_depth(SIMULATED_MODEL) == 0


def test_replay_cache_remembers_across_connections(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    first, second = SqliteStore(path), SqliteStore(path)
    exp = int(time.time()) + 300
    assert first.remember_jti("iss", "abc", exp)
    assert not second.remember_jti("iss", "abc", exp)
    assert second.remember_jti("other-iss", "abc", exp)


def _claim_many(path: str, out: Any) -> None:
    store = SqliteStore(path)
    while (job := store.claim(SIMULATED_MODEL)) is not None:
        out.put(job.id)


def test_two_worker_processes_never_take_the_same_job(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    store = SqliteStore(path)
    for index in range(60):
        store.enqueue(ref(f"1.{index}"), SIMULATED_MODEL, STUDY, None)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_claim_many, args=(str(path), queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    ids = [queue.get(timeout=5) for _ in range(60)]
    assert len(set(ids)) == 60
