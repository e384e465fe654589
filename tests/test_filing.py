"""Filing AI reports: the worker writes them back once; cards offer filing until one is filed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import requests

from cds_service.config import WRITE_BACK_SCOPE
from cds_service.fhir import imaging_study
from cds_service.fhir.backend_services import BackendServicesClients, EhrClient
from cds_service.fhir.prefetch import PREFETCH_KEY
from cds_service.inference.registry import device_info
from cds_service.inference.simulated import SimulatedBackend
from cds_service.jobs.filing import ReportFiler
from cds_service.jobs.worker import drain
from cds_service.storage.ports import StudyRef
from ehr_sandbox.cds_client import SigningKey
from tests.conftest import (
    SandboxHandle,
    ServiceHandle,
    analyse_seeded,
    patient_view_body,
    signed_post,
)
from tests.test_cds_hooks import assert_valid_cards

PV = "cxr-ai-patient-view"


def post(service: ServiceHandle, sandbox: SandboxHandle, path: str, body: Any) -> Any:
    response = signed_post(service, sandbox, path, body)
    assert response.status_code == 200, response.text
    return response.json()


def hook_for(sandbox: SandboxHandle, study: dict[str, Any]) -> dict[str, Any]:
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": study}]}
    patient = imaging_study.subject_patient_id(study)
    assert patient
    return patient_view_body(patient, fhirServer=sandbox.fhir, prefetch={PREFETCH_KEY: bundle})


def test_unfiled_reports_are_offered_once_per_study(
    service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    analyse_seeded(service, sandbox)
    answer = post(service, sandbox, PV, hook_for(sandbox, sandbox.studies[0]))
    cards = assert_valid_cards(answer)
    offered = [c for c in cards if "suggestions" in c]
    assert len(offered) == 1 and offered[0] is cards[0]
    card = offered[0]
    assert card["selectionBehavior"] == "at-most-one"
    [suggestion] = card["suggestions"]
    assert suggestion["label"] == "File AI report to chart"
    [action] = suggestion["actions"]
    report = action["resource"]
    assert action["type"] == "create" and report["resourceType"] == "DiagnosticReport"
    assert report["status"] == "preliminary"
    assert report["meta"]["security"][0]["code"] == "AIAST"
    assert "result" not in report and "id" not in report
    assert report["imagingStudy"] == [{"reference": f"ImagingStudy/{sandbox.studies[0]['id']}"}]
    assert report["conclusion"].startswith("SIMULATED")

    # The clinician accepts it: the EHR files the report, and the card stops offering it.
    item = {
        "card": card["uuid"],
        "outcome": "accepted",
        "acceptedSuggestions": [{"id": suggestion["uuid"]}],
        "outcomeTimestamp": "2026-11-27T10:00:00Z",
    }
    assert post(service, sandbox, PV + "/feedback", {"feedback": [item]})["stored"] == 1
    again = post(service, sandbox, PV, hook_for(sandbox, sandbox.studies[0]))["cards"]
    assert not any("suggestions" in c for c in again)


def test_worker_files_each_analysis_once(
    tmp_path: Path, service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    key = SigningKey.load_or_create(tmp_path / "backend.jwk.json")
    sandbox.sandbox.backend.register("cxr-cds-test-filer", key.public_jwks(), WRITE_BACK_SCOPE)
    ehr = EhrClient(
        fhir_base=sandbox.fhir,
        token_url=f"{sandbox.base}/auth/token",
        client_id="cxr-cds-test-filer",
        key_file=tmp_path / "backend.jwk.json",
        scope=WRITE_BACK_SCOPE,
    )
    backend = SimulatedBackend()
    filer = ReportFiler(
        BackendServicesClients((ehr,)), device_info(service.settings, backend.model)
    )
    study = sandbox.studies[2]  # cxr-demo-2's film
    uid = imaging_study.study_uid(study)
    assert uid
    ref = StudyRef(sandbox.fhir, uid, "cxr-demo-2")

    def reports() -> list[dict[str, Any]]:
        bundle = requests.get(
            f"{sandbox.fhir}/DiagnosticReport", params={"subject": "Patient/cxr-demo-2"}, timeout=10
        ).json()
        return [e["resource"] for e in bundle.get("entry", [])]

    before = len(reports())
    for _ in range(2):  # the same analysis run twice (e.g. a re-queued job)
        service.store.jobs.enqueue(ref, backend.model, study, sandbox.fhir)
        assert drain(service.store, backend, filer) == 1
    filed = reports()
    assert len(filed) == before + 1
    report = filed[-1]
    assert report["status"] == "preliminary"
    assert all(r["reference"].startswith("Observation/") for r in report["result"])
    stored = service.store.results.get_result(ref, backend.model)
    assert stored is not None and stored.filed_location
    assert stored.filed_location.startswith(f"{sandbox.fhir}/DiagnosticReport/")
    observation = requests.get(
        f"{sandbox.fhir}/{report['result'][0]['reference']}", timeout=10
    ).json()
    assert observation["device"]["reference"].startswith("Device/")
    provenance = requests.get(
        f"{sandbox.fhir}/Provenance", timeout=10, params={"_count": "200"}
    ).json()
    targets = {t["reference"] for e in provenance.get("entry", []) for t in e["resource"]["target"]}
    assert f"DiagnosticReport/{report['id']}" in targets

    # A filed report is not offered again on the card.
    cards = post(service, sandbox, PV, hook_for(sandbox, study))["cards"]
    assert cards and not any("suggestions" in c for c in cards)


def test_filing_failure_leaves_the_offer(
    tmp_path: Path, service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    """An EHR that refuses our token: the result is kept and the card still offers filing."""
    key_file = tmp_path / "unregistered.jwk.json"
    SigningKey.load_or_create(key_file)
    ehr = EhrClient(
        fhir_base=sandbox.fhir,
        token_url=f"{sandbox.base}/auth/token",
        client_id="not-registered",
        key_file=key_file,
        scope=WRITE_BACK_SCOPE,
    )
    backend = SimulatedBackend()
    filer = ReportFiler(
        BackendServicesClients((ehr,)), device_info(service.settings, backend.model)
    )
    study = sandbox.studies[0]
    uid = imaging_study.study_uid(study)
    assert uid
    service.store.jobs.enqueue(
        StudyRef(sandbox.fhir, uid, "cxr-demo-1"), backend.model, study, sandbox.fhir
    )
    assert drain(service.store, backend, filer) == 1
    cards = post(service, sandbox, PV, hook_for(sandbox, study))["cards"]
    assert "suggestions" in cards[0]
    assert json.dumps(cards).count("File AI report to chart") == 1


def test_seeded_demo_analyses_offer_filing(service: ServiceHandle, sandbox: SandboxHandle) -> None:
    analyse_seeded(service, sandbox)
    context_cards = post(service, sandbox, PV, hook_for(sandbox, sandbox.studies[1]))["cards"]
    assert "suggestions" in context_cards[0]
