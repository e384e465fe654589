"""`cxr-cds requeue`: operators analyse again studies that ended 'not analysed' or 'failed',
by study, by state or reason, by FHIR base; completed results are never redone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cds_service.cli import main
from cds_service.imaging.errors import NotAnalysable
from cds_service.imaging.files import DecodedImage
from cds_service.inference.pipeline import ImagePipelineBackend
from cds_service.inference.simulated import SIMULATED_MODEL, SimulatedReportWriter
from cds_service.jobs.worker import MAX_ATTEMPTS, drain
from cds_service.storage.ports import Storage, StudyRef
from cds_service.storage.sqlite import open_sqlite_storage
from tests.test_worker_batches import FILM


class Images:
    """'lateral*' studies are lateral views, 'broken*' ones always fail, others are films."""

    def load(self, study: dict[str, Any], fhir_server: str | None) -> DecodedImage:
        if study["id"].startswith("lateral"):
            raise NotAnalysable("lateral view")
        if study["id"].startswith("broken"):
            raise RuntimeError("decoder crashed")
        return FILM


def analysed_store(path: Path) -> tuple[Storage, dict[str, StudyRef]]:
    store = open_sqlite_storage(path)
    backend = ImagePipelineBackend(SimulatedReportWriter(), Images())
    refs = {}
    for number, (study_id, server) in enumerate(
        [
            ("film", "http://a/fhir"),
            ("lateral-a", "http://a/fhir"),
            ("lateral-b", "http://b/fhir"),
            ("broken", "http://a/fhir"),
        ]
    ):
        ref = StudyRef("https://ehr.example/fhir", f"1.2.{number}", "p1")
        store.jobs.enqueue(
            ref, backend.model, {"resourceType": "ImagingStudy", "id": study_id}, server
        )
        refs[study_id] = ref
    for _ in range(MAX_ATTEMPTS):
        drain(store, backend, batch_size=8)
        store.jobs.release_waiting()  # skip the pause before a failed job's next attempt
    return store, refs


def status(store: Storage, ref: StudyRef) -> str | None:
    stored = store.results.get_result(ref, SIMULATED_MODEL)
    return stored.result.status if stored is not None else None


def test_requeue_filters_and_never_redoes_a_completed_result(tmp_path: Path) -> None:
    store, refs = analysed_store(tmp_path / "q.sqlite3")
    assert [status(store, refs[k]) for k in refs] == [
        "completed",
        "not-analysed",
        "not-analysed",
        "failed",
    ]
    assert store.jobs.requeue(SIMULATED_MODEL, reason="lateral", dry_run=True) == 2
    assert status(store, refs["lateral-a"]) == "not-analysed"  # a dry run changes nothing
    assert store.jobs.requeue(SIMULATED_MODEL, reason="LATERAL", fhir_server="http://b/fhir/") == 1
    assert status(store, refs["lateral-b"]) is None
    assert store.jobs.job_state(refs["lateral-b"], SIMULATED_MODEL) == "queued"
    assert status(store, refs["lateral-a"]) == "not-analysed"
    assert store.jobs.requeue(SIMULATED_MODEL, statuses=("failed",)) == 1
    assert store.jobs.job_state(refs["broken"], SIMULATED_MODEL) == "queued"
    assert store.jobs.requeue(SIMULATED_MODEL, study_uid=refs["lateral-a"].study_uid) == 1
    assert status(store, refs["film"]) == "completed"
    with pytest.raises(ValueError):
        store.jobs.requeue(SIMULATED_MODEL, statuses=("completed",))
    # The requeued jobs run again from a fresh attempt count: the broken one gets all its
    # attempts again (3 claims), each lateral one is judged again (1 claim each).
    working = ImagePipelineBackend(SimulatedReportWriter(), Images())
    claims = 0
    for _ in range(MAX_ATTEMPTS):
        claims += drain(store, working, batch_size=8)
        store.jobs.release_waiting()  # skip the pause before a failed job's next attempt
    assert claims == MAX_ATTEMPTS + 2
    assert status(store, refs["lateral-b"]) == "not-analysed"
    assert status(store, refs["broken"]) == "failed"
    assert status(store, refs["film"]) == "completed"


def test_requeue_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "q.sqlite3"
    analysed_store(path)
    monkeypatch.setenv("CXR_CDS_DB", str(path))
    monkeypatch.setenv("CXR_CDS_MODE", "development")
    monkeypatch.setenv("CXR_CDS_AUTH", "off")
    monkeypatch.setenv("CXR_CDS_PUBLIC_URL", "http://127.0.0.1:9")
    assert main(["requeue", "--state", "not-analysed", "--dry-run"]) == 0
    assert "2 studies would be queued again" in capsys.readouterr().out
    assert main(["requeue", "--reason", "repeated errors", "--waiting"]) == 0
    out = capsys.readouterr().out
    assert "1 study queued again" in out and "0 waiting jobs released" in out
    monkeypatch.setenv("CXR_CDS_DB", str(tmp_path / "missing.sqlite3"))
    assert main(["requeue"]) == 2
    assert "no database" in capsys.readouterr().err
