"""Safety of findings, filing and the sandbox's authorisation (found in an independent review)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
from joserfc.jwk import ECKey

from cds_service.config import WRITE_BACK_SCOPE
from cds_service.fhir import imaging_study
from cds_service.fhir.backend_services import (
    BackendServicesClient,
    BackendServicesClients,
    EhrClient,
)
from cds_service.fhir.client import FhirAccessDenied, FhirClient
from cds_service.fhir.prefetch import PREFETCH_KEY
from cds_service.fhir_out.cards import CardContext, StudyStatus, cards_for_study
from cds_service.findings.observations import Observation
from cds_service.inference.registry import device_info
from cds_service.inference.simulated import SimulatedBackend
from cds_service.jobs.filing import ReportFiler
from cds_service.jobs.worker import drain, process_one
from cds_service.results import AnalysisResult, Finding, ModelInfo
from cds_service.storage.ports import StudyRef
from ehr_sandbox.cds_client import SigningKey
from tests.conftest import (
    SandboxHandle,
    ServiceHandle,
    analyse_seeded,
    make_service,
    patient_view_body,
    signed_post,
    two_issuer_service,
)

PV = "cxr-ai-patient-view"


def prefetch_of(*studies: dict[str, Any], patient: str, fhir_server: str) -> dict[str, Any]:
    """A patient-view from the EHR at ``fhir_server`` with the studies prefetched."""
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": s} for s in studies],
    }
    return patient_view_body(patient, fhirServer=fhir_server, prefetch={PREFETCH_KEY: bundle})


def filer_for(
    sandbox: SandboxHandle, service: ServiceHandle, tmp_path: Path, client_id: str
) -> ReportFiler:
    key = SigningKey.load_or_create(tmp_path / f"{client_id}.jwk.json")
    sandbox.sandbox.backend.register(client_id, key.public_jwks(), WRITE_BACK_SCOPE)
    ehr = EhrClient(
        fhir_base=sandbox.fhir,
        token_url=f"{sandbox.base}/auth/token",
        client_id=client_id,
        key_file=tmp_path / f"{client_id}.jwk.json",
        scope=WRITE_BACK_SCOPE,
    )
    return ReportFiler(
        BackendServicesClients((ehr,)), device_info(service.settings, SimulatedBackend.model)
    )


def test_an_impossible_study_date_costs_only_the_filing_offer(
    service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    analyse_seeded(service, sandbox)
    good = sandbox.studies[0]
    bad = {**sandbox.studies[1], "started": "2024-02-30"}
    response = signed_post(
        service, sandbox, PV, prefetch_of(good, bad, patient="cxr-demo-1", fhir_server=sandbox.fhir)
    )
    assert response.status_code == 200, response.text
    cards = response.json()["cards"]
    uids = {json.loads(c["links"][0]["appContext"])["studyInstanceUid"] for c in cards}
    assert uids == {imaging_study.study_uid(good), imaging_study.study_uid(bad)}


def test_worker_survives_a_report_that_fails_validation(
    tmp_path: Path, service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    filer = filer_for(sandbox, service, tmp_path, "cxr-cds-bad-date")
    backend = SimulatedBackend()
    study = {**sandbox.studies[0], "started": "2023-02-29"}
    uid = imaging_study.study_uid(study)
    assert uid
    service.store.jobs.enqueue(
        StudyRef(sandbox.fhir, uid, "cxr-demo-1"), backend.model, study, sandbox.fhir
    )
    service.store.jobs.enqueue(
        StudyRef(sandbox.fhir, "2.25.77", "cxr-demo-1"),
        backend.model,
        {**study, "id": "nope"},
        sandbox.fhir,
    )
    assert process_one(service.store, backend, filer)
    assert process_one(service.store, backend, filer)  # the worker goes on with the next job


def test_a_relabelled_study_is_never_filed_to_the_wrong_patient(
    tmp_path: Path, service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    filer = filer_for(sandbox, service, tmp_path, "cxr-cds-wrong-patient")
    backend = SimulatedBackend()
    real = sandbox.studies[2]  # belongs to cxr-demo-2 in the EHR
    forged = {**real, "subject": {"reference": "Patient/cxr-demo-1"}}
    uid = imaging_study.study_uid(real)
    assert uid
    before = requests.get(
        f"{sandbox.fhir}/DiagnosticReport",
        timeout=10,
        params={"subject": "Patient/cxr-demo-1", "_summary": "count"},
    ).json()
    service.store.jobs.enqueue(
        StudyRef(sandbox.fhir, uid, "cxr-demo-1"), backend.model, forged, sandbox.fhir
    )
    assert drain(service.store, backend, filer) == 1
    after = requests.get(
        f"{sandbox.fhir}/DiagnosticReport",
        timeout=10,
        params={"subject": "Patient/cxr-demo-1", "_summary": "count"},
    ).json()
    assert after["total"] == before["total"]
    stored = service.store.results.get_result(
        StudyRef(sandbox.fhir, uid, "cxr-demo-1"), backend.model
    )
    assert stored is not None and stored.filed_location is None


def test_no_filing_offer_where_the_service_files_itself(
    tmp_path: Path, sandbox: SandboxHandle
) -> None:
    ehr = EhrClient(
        fhir_base=sandbox.fhir,
        token_url=f"{sandbox.base}/auth/token",
        client_id="x",
        key_file=tmp_path / "k.json",
    )
    handle, server = make_service(tmp_path, sandbox, ehr_clients=(ehr,))
    try:
        analyse_seeded(handle, sandbox)
        body = prefetch_of(sandbox.studies[0], patient="cxr-demo-1", fhir_server=sandbox.fhir)
        body["fhirServer"] = sandbox.fhir
        cards = signed_post(handle, sandbox, PV, body).json()["cards"]
        assert cards and not any("suggestions" in c for c in cards)
    finally:
        server.stop()


def test_feedback_marks_filed_only_for_the_right_data_source_and_suggestion(
    tmp_path: Path, sandbox: SandboxHandle
) -> None:
    from tests.conftest import claims_for, sign

    handle, server, other_key, other = two_issuer_service(
        tmp_path, sandbox, "https://other.example"
    )
    try:
        analyse_seeded(handle, sandbox)
        body = prefetch_of(sandbox.studies[0], patient="cxr-demo-1", fhir_server=sandbox.fhir)
        card = signed_post(handle, sandbox, PV, body).json()["cards"][0]
        suggestion = card["suggestions"][0]["uuid"]

        def accepted(ids: list[str]) -> dict[str, Any]:
            return {
                "feedback": [
                    {
                        "card": card["uuid"],
                        "outcome": "accepted",
                        "acceptedSuggestions": [{"id": i} for i in ids],
                        "outcomeTimestamp": "2026-11-27T10:00:00Z",
                    }
                ]
            }

        url = handle.url(PV) + "/feedback"
        token = sign(other_key, claims_for(other.iss, url))
        requests.post(
            url,
            json=accepted([suggestion]),
            timeout=10,
            headers={"Authorization": f"Bearer {token}"},
        )  # another data source
        signed_post(handle, sandbox, PV + "/feedback", accepted(["not-the-filing-one"]))
        still = signed_post(handle, sandbox, PV, body).json()["cards"][0]
        assert "suggestions" in still
        # Accepted, but the EHR did not run the suggestion's action (as the CDS Hooks
        # sandbox does): the report is not in the EHR, so it is still offered. (Earlier tests
        # may have filed this analysis' report to the shared sandbox: removed first.)
        report = card["suggestions"][0]["actions"][0]["resource"]
        store = sandbox.sandbox.store
        value = report["identifier"][0]["value"]
        for earlier in store.search("DiagnosticReport", [("identifier", value)]).resources:
            store.delete("DiagnosticReport", earlier["id"])
        signed_post(handle, sandbox, PV + "/feedback", accepted([suggestion]))
        still = signed_post(handle, sandbox, PV, body).json()["cards"][0]
        assert "suggestions" in still
        # Once the EHR holds the report (read back by its identifier), it counts as filed.
        created = store.create(report)
        signed_post(handle, sandbox, PV + "/feedback", accepted([suggestion]))
        filed = signed_post(handle, sandbox, PV, body).json()["cards"][0]
        assert "suggestions" not in filed
        ref = StudyRef(sandbox.fhir, imaging_study.study_uid(sandbox.studies[0]) or "", None)
        stored = handle.store.results.get_result(ref, SimulatedBackend().model)
        assert stored is not None
        assert stored.filed_location == f"DiagnosticReport/{created['id']}"
    finally:
        server.stop()


def test_an_empty_model_report_is_not_analysed_not_normal(
    service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    class Silent(SimulatedBackend):
        def analyse(self, study_uid: str, study: dict[str, Any]) -> AnalysisResult:
            return AnalysisResult(
                study_uid=study_uid, model=self.model, status="completed", report_text="   "
            )

    study = sandbox.studies[0]
    uid = imaging_study.study_uid(study)
    assert uid
    ref = StudyRef(sandbox.fhir, uid, "cxr-demo-1")
    service.store.jobs.enqueue(ref, Silent.model, study, sandbox.fhir)
    assert drain(service.store, Silent()) == 1
    [card] = signed_post(
        service, sandbox, PV, prefetch_of(study, patient="cxr-demo-1", fhir_server=sandbox.fhir)
    ).json()["cards"]
    assert card["summary"].endswith("not analysed by AI: the model returned no text")


def test_a_possible_pneumothorax_is_critical() -> None:
    from datetime import UTC, datetime

    result = AnalysisResult(
        study_uid="1.2.3",
        model=ModelInfo("m", "v"),
        status="completed",
        findings=(Finding(Observation.PNEUMOTHORAX, "uncertain", "x"),),
    )
    study = {
        "resourceType": "ImagingStudy",
        "id": "s",
        "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}],
    }
    ctx = CardContext(model=result.model, smart_launch_url="https://app", now=datetime.now(UTC))
    [card] = cards_for_study(StudyStatus(study, "completed", result), ctx)
    assert card["indicator"] == "critical" and "possible pneumothorax" in card["summary"]


# -- sandbox authorisation --------------------------------------------------------------------
def token_for(sandbox: SandboxHandle, tmp_path: Path, client_id: str, scope: str) -> str:
    key = ECKey.generate_key("P-384", auto_kid=True)
    sandbox.sandbox.backend.register(
        client_id, {"keys": [{**key.as_dict(private=False), "kid": key.kid}]}, scope
    )
    ehr = EhrClient(
        fhir_base=sandbox.fhir,
        token_url=f"{sandbox.base}/auth/token",
        client_id=client_id,
        key_file=tmp_path / "unused",
        scope=scope,
    )
    return BackendServicesClient(ehr, key).access_token()


def test_a_create_scope_cannot_update_or_delete(tmp_path: Path, sandbox: SandboxHandle) -> None:
    token = token_for(sandbox, tmp_path, "creator", "system/DiagnosticReport.c")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    report = {"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "x"}}
    created = requests.post(
        f"{sandbox.fhir}/DiagnosticReport", json=report, headers=headers, timeout=10
    )
    assert created.status_code == 201
    rid = created.json()["id"]
    changed = {**created.json(), "status": "entered-in-error"}
    assert (
        requests.put(
            f"{sandbox.fhir}/DiagnosticReport/{rid}", json=changed, headers=headers, timeout=10
        ).status_code
        == 403
    )
    assert (
        requests.delete(
            f"{sandbox.fhir}/DiagnosticReport/{rid}", headers=headers, timeout=10
        ).status_code
        == 403
    )


@pytest.mark.parametrize(
    "aud", ["{url}/other", "https://evil.example/cb?x={url}", 12345, {"{url}": 1}]
)
def test_assertion_aud_must_be_exactly_the_token_url(aud: Any, sandbox: SandboxHandle) -> None:
    import time
    import uuid

    from joserfc import jwt

    key = ECKey.generate_key("P-384", auto_kid=True)
    sandbox.sandbox.backend.register(
        "aud-test", {"keys": [{**key.as_dict(private=False), "kid": key.kid}]}, WRITE_BACK_SCOPE
    )
    url = f"{sandbox.base}/auth/token"
    if isinstance(aud, str):
        aud = aud.format(url=url)
    elif isinstance(aud, dict):
        aud = {url: 1}
    now = int(time.time())
    assertion = jwt.encode(
        {"alg": "ES384", "kid": key.kid},
        {
            "iss": "aud-test",
            "sub": "aud-test",
            "aud": aud,
            "exp": now + 200,
            "iat": now,
            "jti": str(uuid.uuid4()),
        },
        key,
        algorithms=["ES384"],
    )
    response = requests.post(
        url,
        timeout=10,
        data={
            "grant_type": "client_credentials",
            "scope": WRITE_BACK_SCOPE,
            "client_assertion": assertion,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        },
    )
    assert response.status_code == 401 and response.json()["error"] == "invalid_client"


def test_a_failed_transaction_leaves_nothing_behind(tmp_path: Path, sandbox: SandboxHandle) -> None:
    token = token_for(sandbox, tmp_path, "tx-writer", "system/*.c")
    client = FhirClient(sandbox.fhir, token)
    marker = "urn:cxr-cds:test-atomic|first"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:9c0f5a52-7c89-4ad0-8c52-6b0e1b4a1f01",
                "resource": {
                    "resourceType": "Observation",
                    "status": "preliminary",
                    "code": {"text": "x"},
                    "identifier": [{"system": "urn:cxr-cds:test-atomic", "value": "first"}],
                },
                "request": {"method": "POST", "url": "Observation"},
            },
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "preliminary",
                    "code": {"text": "y"},
                },
                "request": {"method": "POST", "url": "Observation", "ifNoneExist": "bogus-param=1"},
            },
        ],
    }
    for _ in range(3):
        with pytest.raises(Exception):  # noqa: B017 - the EHR answers 4xx; which one is its call
            client.post_json("", bundle)
    found = requests.get(
        f"{sandbox.fhir}/Observation", params={"identifier": marker}, timeout=10
    ).json()
    assert found["total"] == 0


def test_feedback_export_neutralises_spreadsheet_formulas(
    service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    analyse_seeded(service, sandbox)
    card = signed_post(
        service,
        sandbox,
        PV,
        prefetch_of(sandbox.studies[0], patient="cxr-demo-1", fhir_server=sandbox.fhir),
    ).json()["cards"][0]
    item = {
        "card": card["uuid"],
        "outcome": "overridden",
        "overrideReason": {
            "reason": card["overrideReasons"][0],
            "userComment": '=HYPERLINK("https://evil.example","x")',
        },
        "outcomeTimestamp": "2026-11-27T10:00:00Z",
    }
    signed_post(service, sandbox, PV + "/feedback", {"feedback": [item]})
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cds_service.cli",
            "feedback",
            "export",
            "--db",
            str(service.settings.database),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    [row] = list(csv.DictReader(io.StringIO(run.stdout)))
    assert row["user_comment"].startswith("'=HYPERLINK")


def test_backend_client_never_sends_its_token_elsewhere(sandbox: SandboxHandle) -> None:
    client = FhirClient(sandbox.fhir, "secret")
    with pytest.raises(FhirAccessDenied):
        client.post_json("https://evil.example/fhir", {"resourceType": "Bundle"})
