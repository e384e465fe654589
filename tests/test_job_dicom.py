"""A job that carries its own DICOM (issue 12, item 3: "Request analysis" in the viewer hands
the job the image it read with the clinician's token): the store keeps the bytes with the
job until it closes, and the worker analyses them without fetching anything, so an EHR that
gave the service no access of its own still gets its study analysed."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from cds_service.imaging.errors import NoAccess
from cds_service.imaging.files import DecodedImage
from cds_service.imaging.limits import ImageLimits
from cds_service.inference.base import StudyWork
from cds_service.inference.pipeline import ImagePipelineBackend
from cds_service.inference.simulated import SIMULATED_MODEL, SimulatedBackend, SimulatedReportWriter
from cds_service.jobs.arrivals import enqueue_arrival
from cds_service.jobs.worker import drain, process_batch
from cds_service.results import AnalysisResult
from cds_service.storage.ports import ImageTooLarge, StudyRef
from cds_service.storage.sqlite import open_sqlite_storage
from smart_app import viewer
from tests.imaging.conftest import seed_file

FRONTAL = seed_file("nih-cxr14-00000002_000-no-finding-dx.dcm").read_bytes()
LATERAL = seed_file("dog-lateral-thorax-dx.dcm").read_bytes()
FHIR = "http://launcher.example/fhir"
REF = StudyRef(FHIR, "1.2.3", "p1")
STUDY = {
    "resourceType": "ImagingStudy",
    "id": "s1",
    "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}],
    "subject": {"reference": "Patient/p1"},
    "modality": [{"code": "DX"}],
    "started": "2026-11-20T10:00:00+00:00",
}


class NoFetching:
    """An image source that must not be used: the job brought its image."""

    def __init__(self) -> None:
        self.calls = 0

    def load(self, study: dict[str, Any], fhir_server: str | None) -> DecodedImage:
        self.calls += 1
        raise AssertionError("the study's images were fetched although the job carried them")


class NoAccessImages:
    """What the service's loader does for an EHR it holds no registration for."""

    def __init__(self) -> None:
        self.calls = 0

    def load(self, study: dict[str, Any], fhir_server: str | None) -> DecodedImage:
        self.calls += 1
        raise NoAccess(fhir_server)


def dicom_rows(path: Path) -> list[tuple[int, int]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT job_id, length(body) FROM job_dicom ORDER BY job_id")
        return [(int(r[0]), int(r[1])) for r in rows]


def result(status: str = "completed") -> AnalysisResult:
    return AnalysisResult(study_uid=REF.study_uid, model=SIMULATED_MODEL, status=status)


# -- store ------------------------------------------------------------------------------------
def test_the_bytes_are_stored_with_the_job_claimed_with_it_and_gone_when_it_is_done(
    tmp_path: Path,
) -> None:
    store = open_sqlite_storage(tmp_path / "q.sqlite3")
    assert store.jobs.enqueue(REF, SIMULATED_MODEL, STUDY, FHIR, FRONTAL)
    assert dicom_rows(tmp_path / "q.sqlite3") == [(1, len(FRONTAL))]
    job = store.jobs.claim(SIMULATED_MODEL)
    assert job is not None and job.dicom == FRONTAL
    assert job.fhir_server == FHIR  # supplied bytes do not change where the job came from
    store.jobs.finish(job, result())
    assert dicom_rows(tmp_path / "q.sqlite3") == []


def test_a_job_without_bytes_is_claimed_without_them(tmp_path: Path) -> None:
    store = open_sqlite_storage(tmp_path / "q.sqlite3")
    store.jobs.enqueue(REF, SIMULATED_MODEL, STUDY, FHIR)
    job = store.jobs.claim(SIMULATED_MODEL)
    assert job is not None and job.dicom is None
    assert dicom_rows(tmp_path / "q.sqlite3") == []


def test_the_bytes_stay_while_the_job_is_retried_and_go_when_it_fails_for_good(
    tmp_path: Path,
) -> None:
    store = open_sqlite_storage(tmp_path / "q.sqlite3")
    store.jobs.enqueue(REF, SIMULATED_MODEL, STUDY, FHIR, FRONTAL)
    job = store.jobs.claim(SIMULATED_MODEL)
    assert job is not None
    store.jobs.fail(job, "RuntimeError: boom")  # back to the queue: it still needs its image
    again = store.jobs.claim(SIMULATED_MODEL)
    assert again is not None and again.dicom == FRONTAL
    store.jobs.fail(again, "RuntimeError: boom", final=result("failed"))
    assert dicom_rows(tmp_path / "q.sqlite3") == []


def test_a_second_request_for_a_live_job_adds_no_bytes(tmp_path: Path) -> None:
    store = open_sqlite_storage(tmp_path / "q.sqlite3")
    assert store.jobs.enqueue(REF, SIMULATED_MODEL, STUDY, FHIR, FRONTAL)
    assert not store.jobs.enqueue(REF, SIMULATED_MODEL, STUDY, FHIR, LATERAL)
    assert store.jobs.queue_depth(SIMULATED_MODEL) == 1
    assert dicom_rows(tmp_path / "q.sqlite3") == [(1, len(FRONTAL))]  # the first image kept
    job = store.jobs.claim(SIMULATED_MODEL)
    assert job is not None and job.dicom == FRONTAL


def test_a_waiting_job_without_bytes_gets_them_and_runs_at_once(tmp_path: Path) -> None:
    """A study queued by a hook or the watcher waits for access to an EHR the service has no
    registration for; the clinician's request brings the image, and the job runs now."""
    store = open_sqlite_storage(tmp_path / "q.sqlite3")
    assert store.jobs.enqueue(REF, SIMULATED_MODEL, STUDY, FHIR)
    job = store.jobs.claim(SIMULATED_MODEL)
    assert job is not None
    store.jobs.defer(job, f"no access to {FHIR}", 300.0)
    assert store.jobs.waiting_reason(REF, SIMULATED_MODEL) is not None
    assert store.jobs.claim(SIMULATED_MODEL) is None
    assert not store.jobs.enqueue(REF, SIMULATED_MODEL, STUDY, FHIR, FRONTAL)  # no second job
    assert store.jobs.waiting_reason(REF, SIMULATED_MODEL) is None
    claimed = store.jobs.claim(SIMULATED_MODEL)
    assert claimed is not None and claimed.id == job.id and claimed.dicom == FRONTAL


def test_bytes_over_the_image_limit_are_refused_and_nothing_is_queued(tmp_path: Path) -> None:
    store = open_sqlite_storage(tmp_path / "q.sqlite3")
    with pytest.raises(ImageTooLarge, match=r"over the 1000 byte image limit"):
        store.jobs.enqueue(REF, SIMULATED_MODEL, STUDY, FHIR, FRONTAL, max_dicom_bytes=1000)
    assert store.jobs.queue_depth(SIMULATED_MODEL) == 0
    with pytest.raises(ImageTooLarge):
        enqueue_arrival(store, SIMULATED_MODEL, STUDY, FHIR, dicom=FRONTAL, max_dicom_bytes=1000)
    assert store.jobs.queue_depth(SIMULATED_MODEL) == 0


def test_an_arrival_with_bytes_queues_them_and_a_request_analyses_a_failed_study_again(
    tmp_path: Path,
) -> None:
    store = open_sqlite_storage(tmp_path / "q.sqlite3")
    store.results.put_result(REF, result("failed"))
    known = enqueue_arrival(store, SIMULATED_MODEL, STUDY, FHIR, dicom=FRONTAL)
    assert known.outcome == "known" and store.jobs.queue_depth(SIMULATED_MODEL) == 0
    asked = enqueue_arrival(store, SIMULATED_MODEL, STUDY, FHIR, dicom=FRONTAL, again=True)
    assert asked.outcome == "queued" and asked.ref == REF
    job = store.jobs.claim(SIMULATED_MODEL)
    assert job is not None and job.dicom == FRONTAL
    store.jobs.finish(job, result())
    # A completed study is never analysed again, even on request.
    repeat = enqueue_arrival(store, SIMULATED_MODEL, STUDY, FHIR, dicom=FRONTAL, again=True)
    assert repeat.outcome == "known" and store.jobs.queue_depth(SIMULATED_MODEL) == 0


# -- pipeline and worker ----------------------------------------------------------------------
def test_the_pipeline_analyses_the_supplied_bytes_without_fetching(tmp_path: Path) -> None:
    images = NoFetching()
    backend = ImagePipelineBackend(SimulatedReportWriter(), images)
    store = open_sqlite_storage(tmp_path / "q.sqlite3")
    store.jobs.enqueue(REF, backend.model, STUDY, FHIR, FRONTAL)
    assert drain(store, backend) == 1
    assert images.calls == 0
    stored = store.results.get_result(REF, backend.model)
    assert stored is not None and stored.result.status == "completed"
    assert stored.result.report_text.startswith("SIMULATED OUTPUT")
    assert stored.result.extra["transfer_syntax"]  # decoded from the DICOM it came with
    assert dicom_rows(tmp_path / "q.sqlite3") == []


def test_a_supplied_lateral_is_not_analysed_with_the_reason() -> None:
    images = NoFetching()
    backend = ImagePipelineBackend(SimulatedReportWriter(), images)
    [outcome] = backend.analyse_batch([StudyWork("1.2.3", STUDY, FHIR, LATERAL)])
    assert isinstance(outcome, AnalysisResult)
    assert outcome.status == "not-analysed" and not outcome.report_text
    assert outcome.reason == "lateral view"  # the loader's own selection check
    assert images.calls == 0


def test_supplied_bytes_over_the_backends_image_limit_are_not_analysed() -> None:
    backend = ImagePipelineBackend(
        SimulatedReportWriter(), NoFetching(), ImageLimits(max_bytes=1000)
    )
    [outcome] = backend.analyse_batch([StudyWork("1.2.3", STUDY, FHIR, FRONTAL)])
    assert isinstance(outcome, AnalysisResult) and outcome.status == "not-analysed"
    assert outcome.reason and "1000 byte limit" in outcome.reason


def test_a_job_with_bytes_never_waits_for_access_to_its_ehr(tmp_path: Path) -> None:
    """In one batch: the job without bytes waits ("no access"), the one with bytes runs."""
    images = NoAccessImages()
    backend = ImagePipelineBackend(SimulatedReportWriter(), images)
    store = open_sqlite_storage(tmp_path / "q.sqlite3")
    other = StudyRef(FHIR, "1.2.4", "p1")
    store.jobs.enqueue(other, backend.model, {**STUDY, "id": "s2"}, FHIR)
    store.jobs.enqueue(REF, backend.model, STUDY, FHIR, FRONTAL)
    assert process_batch(store, backend, batch_size=8) == 2
    assert images.calls == 1  # only for the job without bytes
    assert store.jobs.waiting_reason(other, backend.model) is not None
    assert store.jobs.waiting_reason(REF, backend.model) is None
    stored = store.results.get_result(REF, backend.model)
    assert stored is not None and stored.result.status == "completed"


def test_a_simulated_worker_completes_a_job_with_bytes(tmp_path: Path) -> None:
    store = open_sqlite_storage(tmp_path / "q.sqlite3")
    store.jobs.enqueue(REF, SIMULATED_MODEL, STUDY, FHIR, FRONTAL)
    assert drain(store, SimulatedBackend()) == 1
    stored = store.results.get_result(REF, SIMULATED_MODEL)
    assert stored is not None and stored.result.status == "completed"
    assert dicom_rows(tmp_path / "q.sqlite3") == []


def test_an_older_file_gets_the_table_and_keeps_its_jobs(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    open_sqlite_storage(path).jobs.enqueue(REF, SIMULATED_MODEL, STUDY, FHIR)
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE job_dicom")
    store = open_sqlite_storage(path)  # as opened by this version
    assert not store.jobs.enqueue(REF, SIMULATED_MODEL, STUDY, FHIR, FRONTAL)
    job = store.jobs.claim(SIMULATED_MODEL)
    assert job is not None and job.dicom == FRONTAL


def test_the_viewer_says_a_job_waits_for_access_and_not_for_a_retry(tmp_path: Path) -> None:
    """'Request analysis' is offered for a job waiting for access to the EHR's images (the
    viewer's film lets it run), not for one merely paused before its next try."""
    store = open_sqlite_storage(tmp_path / "q.sqlite3")
    store.jobs.enqueue(REF, SIMULATED_MODEL, STUDY, FHIR)
    assert viewer.ai_status(store, REF, SIMULATED_MODEL) == "in progress"
    job = store.jobs.claim(SIMULATED_MODEL)
    assert job is not None
    store.jobs.defer(job, NoAccess(FHIR).description, 300.0)
    assert viewer.ai_status(store, REF, SIMULATED_MODEL) == viewer.WAITING_FOR_ACCESS
    store.jobs.release_waiting()
    job = store.jobs.claim(SIMULATED_MODEL)
    assert job is not None
    store.jobs.defer(job, "RuntimeError: the model failed", 300.0)
    assert viewer.ai_status(store, REF, SIMULATED_MODEL) == "in progress"
