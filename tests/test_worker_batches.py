"""The worker claims jobs in batches and hands their images to the model together (issue 12,
item 4): a bad image fails alone, an unavailable model puts the whole batch back, and a dead
worker's claims come back."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from cds_service.composition import Composition
from cds_service.imaging.errors import ImageFetchError, NoAccess, NotAnalysable
from cds_service.imaging.files import DecodedImage, read_image_file
from cds_service.inference.base import BatchBackend, ModelUnavailable, ReportRequest
from cds_service.inference.pipeline import ImagePipelineBackend
from cds_service.inference.simulated import SimulatedReportWriter
from cds_service.jobs.worker import drain, process_batch, run_forever
from cds_service.storage.ports import Storage, StudyRef
from cds_service.storage.sqlite import open_sqlite_storage
from tests.imaging.conftest import seed_file

FILM = read_image_file(seed_file("nih-cxr14-00000002_000-no-finding-dx.dcm"))


class CountingWriter:
    """The simulated model, recording how many images each call to it carried."""

    def __init__(self, unavailable: bool = False) -> None:
        self.inner = SimulatedReportWriter()
        self.model = self.inner.model
        self.calls: list[int] = []
        self.unavailable = unavailable

    def write_reports(self, requests: Sequence[ReportRequest]) -> list[str]:
        if self.unavailable:
            raise ModelUnavailable("the inference engine is stopped")
        self.calls.append(len(requests))
        return self.inner.write_reports(requests)


class Images:
    """Studies whose id says what their image does: 'fetch-error', 'lateral', else a film."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def load(self, study: dict[str, Any], fhir_server: str | None) -> DecodedImage:
        self.loaded.append(study["id"])
        if study["id"].startswith("fetch-error"):
            raise ImageFetchError("image server unreachable (ConnectionError)")
        if study["id"].startswith("lateral"):
            raise NotAnalysable("lateral view")
        return FILM


def queue(store: Storage, model: Any, ids: list[str]) -> list[StudyRef]:
    refs = []
    for number, study_id in enumerate(ids):
        ref = StudyRef("http://ehr", f"1.2.{number}", "p1")
        study = {"resourceType": "ImagingStudy", "id": study_id}
        store.jobs.enqueue(ref, model, study, "http://ehr/fhir")
        refs.append(ref)
    return refs


def job_rows(path: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT status, attempts FROM jobs ORDER BY id")
        return [(str(r[0]), int(r[1])) for r in rows]


def test_the_pipeline_backend_is_a_batch_backend() -> None:
    assert isinstance(ImagePipelineBackend(CountingWriter(), Images()), BatchBackend)


def test_queued_jobs_reach_the_model_in_batches_of_the_configured_size(tmp_path: Path) -> None:
    store = open_sqlite_storage(tmp_path / "q.sqlite3")
    writer = CountingWriter()
    backend = ImagePipelineBackend(writer, Images())
    refs = queue(store, backend.model, [f"s{i}" for i in range(10)])
    assert drain(store, backend, batch_size=4) == 10
    assert writer.calls == [4, 4, 2]
    for ref in refs:
        stored = store.results.get_result(ref, backend.model)
        assert stored is not None and stored.result.status == "completed"
        assert stored.result.study_uid == ref.study_uid
    assert store.jobs.queue_depth(backend.model) == 0


def test_a_bad_image_fails_alone(tmp_path: Path) -> None:
    store = open_sqlite_storage(tmp_path / "q.sqlite3")
    writer = CountingWriter()
    images = Images()
    backend = ImagePipelineBackend(writer, images)
    refs = queue(store, backend.model, ["s0", "fetch-error", "lateral", "s3"])
    assert process_batch(store, backend, batch_size=8) == 4
    assert writer.calls == [2]  # the two readable films went to the model together
    results = [store.results.get_result(ref, backend.model) for ref in refs]
    assert results[0] is not None and results[0].result.status == "completed"
    assert results[1] is None  # a network failure is retried, never stored as final
    assert results[2] is not None and results[2].result.status == "not-analysed"
    assert results[2].result.reason == "lateral view"
    assert results[3] is not None and results[3].result.status == "completed"
    assert job_rows(tmp_path / "q.sqlite3") == [
        ("done", 1),
        ("queued", 1),
        ("done", 1),
        ("done", 1),
    ]


def test_an_unavailable_model_puts_the_whole_batch_back_uncounted(tmp_path: Path) -> None:
    store = open_sqlite_storage(tmp_path / "q.sqlite3")
    backend = ImagePipelineBackend(CountingWriter(unavailable=True), Images())
    queue(store, backend.model, ["s0", "s1", "s2"])
    with pytest.raises(ModelUnavailable):
        process_batch(store, backend, batch_size=8)
    assert job_rows(tmp_path / "q.sqlite3") == [("queued", 0)] * 3
    working = ImagePipelineBackend(CountingWriter(), Images())
    assert drain(store, working, batch_size=8) == 3


def test_a_dead_workers_batch_comes_back_after_its_lease(tmp_path: Path) -> None:
    store = open_sqlite_storage(tmp_path / "q.sqlite3")
    model = SimulatedReportWriter().model
    queue(store, model, ["s0", "s1", "s2"])
    first = store.jobs.claim_batch(model, 2)
    assert [job.ref.study_uid for job in first] == ["1.2.0", "1.2.1"]
    # The claimer died: its jobs are not handed out again until the lease runs out.
    second = store.jobs.claim_batch(model, 8)
    assert [job.ref.study_uid for job in second] == ["1.2.2"]
    assert store.jobs.claim_batch(model, 8) == []
    again = store.jobs.claim_batch(model, 8, stale_after_s=-1)
    assert sorted(job.ref.study_uid for job in again) == ["1.2.0", "1.2.1", "1.2.2"]
    assert {job.attempts for job in again} == {2}
    with pytest.raises(ValueError):
        store.jobs.claim_batch(model, 0)


def test_a_live_worker_renews_its_leases(tmp_path: Path) -> None:
    """A batch that runs longer than the lease is not handed out twice while its worker
    still beats; another worker's unrenewed jobs are."""
    store = open_sqlite_storage(tmp_path / "q.sqlite3")
    model = SimulatedReportWriter().model
    queue(store, model, ["s0", "s1"])
    [alive] = store.jobs.claim_batch(model, 1, owner="worker-a")
    [dead] = store.jobs.claim_batch(model, 1, owner="worker-b")
    with sqlite3.connect(tmp_path / "q.sqlite3") as conn:  # both leases long expired
        conn.execute("UPDATE jobs SET updated_at = updated_at - 3600")
    store.jobs.renew_leases("worker-a")
    again = store.jobs.claim_batch(model, 8, stale_after_s=60, owner="worker-c")
    assert [job.id for job in again] == [dead.id]
    assert alive.id != dead.id


def test_two_claimers_never_share_a_job(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    model = SimulatedReportWriter().model
    queue(open_sqlite_storage(path), model, [f"s{i}" for i in range(60)])
    claimed: list[list[int]] = [[], []]

    def claim(slot: int) -> None:
        store = open_sqlite_storage(path)
        while jobs := store.jobs.claim_batch(model, 7):
            claimed[slot].extend(job.id for job in jobs)

    threads = [threading.Thread(target=claim, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    everything = claimed[0] + claimed[1]
    assert len(everything) == 60 and len(set(everything)) == 60


def test_run_forever_batches_what_is_queued(tmp_path: Path) -> None:
    store = open_sqlite_storage(tmp_path / "q.sqlite3")
    writer = CountingWriter()
    backend = ImagePipelineBackend(writer, Images())
    refs = queue(store, backend.model, [f"s{i}" for i in range(12)])
    stop = threading.Event()
    worker = threading.Thread(
        target=run_forever,
        args=(store, backend, stop),
        kwargs={"poll_s": 0.01, "batch_size": 8},
    )
    worker.start()
    try:
        for _ in range(500):
            if store.jobs.queue_depth(backend.model) == 0:
                break
            stop.wait(0.01)
    finally:
        stop.set()
        worker.join(timeout=10)
    assert sorted(writer.calls, reverse=True) == [8, 4]
    assert all(store.results.get_result(ref, backend.model) is not None for ref in refs)


class NoAccessImages(Images):
    def load(self, study: dict[str, Any], fhir_server: str | None) -> DecodedImage:
        if study["id"].startswith("elsewhere"):
            raise NoAccess(fhir_server)
        return super().load(study, fhir_server)


def test_a_study_without_access_waits_with_the_reason_and_is_never_final(tmp_path: Path) -> None:
    """No registered access to the study's EHR: not a fact about the study. The job waits,
    uncounted, says why (the FHIR base and the setting to add), and runs once a worker
    starts again with the settings fixed."""
    store = open_sqlite_storage(tmp_path / "q.sqlite3")
    writer = CountingWriter()
    backend = ImagePipelineBackend(writer, NoAccessImages())
    refs = queue(store, backend.model, ["elsewhere-1", "s1"])
    assert process_batch(store, backend, batch_size=8) == 2
    assert store.results.get_result(refs[0], backend.model) is None  # never a final "not analysed"
    completed = store.results.get_result(refs[1], backend.model)
    assert completed is not None and completed.result.status == "completed"
    assert job_rows(tmp_path / "q.sqlite3") == [("queued", 0), ("done", 1)]
    reason = store.jobs.waiting_reason(refs[0], backend.model)
    assert reason is not None
    assert "no access to http://ehr/fhir" in reason and "CXR_CDS_EHR_CLIENTS" in reason
    assert store.jobs.claim_batch(backend.model, 8) == []  # waits: not claimed again at once
    # A worker that starts (with new settings) releases the waiting jobs.
    assert store.jobs.release_waiting() == 1
    assert store.jobs.waiting_reason(refs[0], backend.model) is None
    fixed = ImagePipelineBackend(writer, Images())
    assert drain(store, fixed, batch_size=8) == 1
    stored = store.results.get_result(refs[0], backend.model)
    assert stored is not None and stored.result.status == "completed"


def test_the_card_of_a_waiting_study_says_why() -> None:
    from datetime import UTC, datetime

    from cds_service.fhir_out.cards import CardContext, StudyStatus, cards_for_study

    study = {
        "resourceType": "ImagingStudy",
        "id": "s1",
        "started": "2026-11-30T10:00:00+00:00",
        "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}],
    }
    reason = str(NoAccess("http://ehr/fhir"))
    ctx = CardContext(
        model=SimulatedReportWriter().model,
        smart_launch_url="http://127.0.0.1:9/app/launch",
        now=datetime(2026, 12, 1, tzinfo=UTC),
    )
    cards = cards_for_study(StudyStatus(study=study, state="in-progress", reason=reason), ctx)
    assert len(cards) == 1
    assert cards[0]["summary"].endswith("AI analysis waiting")
    assert "no access to http://ehr/fhir" in cards[0]["detail"]
    assert "CXR_CDS_EHR_CLIENTS" in cards[0]["detail"]


def test_readyz_tells_whether_a_worker_with_its_model_is_alive(tmp_path: Path) -> None:
    from cds_service.config import Settings
    from cds_service.web.app import create_app

    settings = Settings.from_env(
        {
            "CXR_CDS_MODE": "development",
            "CXR_CDS_AUTH": "off",
            "CXR_CDS_PUBLIC_URL": "http://127.0.0.1:9",
            "CXR_CDS_DB": str(tmp_path / "cds.sqlite3"),
        }
    )
    store = open_sqlite_storage(settings.database)
    client = create_app(Composition(settings, storage=store)).test_client()
    answer = client.get("/readyz")
    assert answer.status_code == 503
    assert "no inference worker" in answer.get_json()["reasons"][0]
    assert client.get("/healthz").status_code == 200  # alive, just not ready

    model = SimulatedReportWriter().model
    store.workers.heartbeat("host:1:1", model.label, "the model is unavailable (next try in 4 s)")
    answer = client.get("/readyz")
    assert answer.status_code == 503
    assert answer.get_json()["reasons"] == ["the model is unavailable (next try in 4 s)"]

    store.workers.heartbeat("host:1:1", model.label)
    answer = client.get("/readyz")
    assert answer.status_code == 200 and answer.get_json()["status"] == "ready"


def test_run_forever_reports_in(tmp_path: Path) -> None:
    store = open_sqlite_storage(tmp_path / "q.sqlite3")
    backend = ImagePipelineBackend(CountingWriter(), Images())
    stop = threading.Event()
    worker = threading.Thread(
        target=run_forever, args=(store, backend, stop), kwargs={"poll_s": 0.01}
    )
    worker.start()
    try:
        for _ in range(300):
            if store.workers.alive(backend.model.label, 30):
                break
            stop.wait(0.01)
    finally:
        stop.set()
        worker.join(timeout=10)
    assert [error for _, error in store.workers.alive(backend.model.label, 30)] == [None]
