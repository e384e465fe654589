"""The worker's backend from the settings, with a real (tiny) model: the sandbox's study goes
through image retrieval and selection, the model writes the report, the findings are coded
and the report is filed, all as `cxr-cds serve` would do it."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import requests

from cds_service.composition import Composition
from cds_service.config import SERVICE_SCOPE, EhrClient, Settings
from cds_service.fhir import imaging_study
from cds_service.fhir.backend_services import BackendServicesClients
from cds_service.inference.cxr_llava import writer as writer_module
from cds_service.inference.cxr_llava.writer import TINY_BANNER
from cds_service.inference.pipeline import ImagePipelineBackend
from cds_service.inference.registry import device_info
from cds_service.jobs.filing import ReportFiler
from cds_service.jobs.worker import drain
from cds_service.storage.ports import StudyRef
from cds_service.storage.sqlite import open_sqlite_storage
from ehr_sandbox.cds_client import SigningKey
from tests.conftest import SandboxHandle


def test_tiny_model_analyses_and_files_a_sandbox_study(
    tmp_path: Path, sandbox: SandboxHandle, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The random model seldom ends a text by itself within a few tokens; this test is about
    # retrieval, coding and filing, so its texts count as whole (truncation: test_truncation).
    monkeypatch.setattr(writer_module, "hit_token_limit", lambda *_: False)
    key = SigningKey.load_or_create(tmp_path / "backend.jwk.json")
    sandbox.sandbox.backend.register("cxr-cds-tiny-worker", key.public_jwks(), SERVICE_SCOPE)
    ehr = EhrClient(
        fhir_base=sandbox.fhir,
        token_url=f"{sandbox.base}/auth/token",
        client_id="cxr-cds-tiny-worker",
        key_file=tmp_path / "backend.jwk.json",
    )
    settings = Settings(
        mode="demo",
        public_url="http://127.0.0.1:9",
        database=tmp_path / "cds.sqlite3",
        backend="tiny",
        model_dir=str(tiny_dir),
        model_device="cpu",
        max_new_tokens=8,
        ehr_clients=(ehr,),
    ).validated()
    backend = Composition(settings).backend()
    assert isinstance(backend, ImagePipelineBackend)
    assert backend.model.simulated  # random weights: marked like the simulated backend

    store = open_sqlite_storage(settings.database)
    study = sandbox.studies[1]
    uid = imaging_study.study_uid(study)
    patient = imaging_study.subject_patient_id(study)
    assert uid and patient
    ref = StudyRef(sandbox.fhir, uid, patient)
    store.jobs.enqueue(ref, backend.model, study, sandbox.fhir)
    filer = ReportFiler(
        BackendServicesClients(settings.ehr_clients), device_info(settings, backend.model)
    )
    assert drain(store, backend, filer) == 1

    stored = store.results.get_result(ref, backend.model)
    assert stored is not None
    result = stored.result
    assert result.status == "completed", result.reason
    assert result.report_text.startswith(TINY_BANNER)
    assert result.extra["transfer_syntax"]  # the pixels really came from the DICOM
    assert stored.filed_location and "DiagnosticReport/" in stored.filed_location

    report: dict[str, Any] = requests.get(stored.filed_location, timeout=10).json()
    assert report["resourceType"] == "DiagnosticReport"
    assert report["status"] == "preliminary"
    assert "AIAST" in {s.get("code") for s in report["meta"]["security"]}
    texts = [base64.b64decode(f["data"]).decode() for f in report["presentedForm"]]
    assert any(TINY_BANNER in t for t in texts)  # after the AI-report header
