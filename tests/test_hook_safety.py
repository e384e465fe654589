"""Safety of the hook path against hostile or sloppy input (found in an independent review)."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import requests

from cds_service.fhir.prefetch import PREFETCH_KEY
from cds_service.inference.simulated import SimulatedBackend
from cds_service.jobs.worker import drain
from cds_service.storage.ports import StudyRef
from cds_service.storage.sqlite import open_sqlite_storage
from tests.conftest import (
    SandboxHandle,
    ServiceHandle,
    analyse_seeded,
    claims_for,
    make_service,
    patient_view_body,
    sign,
    signed_post,
    start_stub,
    two_issuer_service,
)

PV = "cxr-ai-patient-view"
DCM = "http://dicom.nema.org/resources/ontology/DCM"


def call(service: ServiceHandle, sandbox: SandboxHandle, body: Any) -> requests.Response:
    return signed_post(service, sandbox, PV, body)


def bundle(*studies: dict[str, Any], next_url: str | None = None) -> dict[str, Any]:
    value: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": s} for s in studies],
    }
    if next_url:
        value["link"] = [{"relation": "next", "url": next_url}]
    return value


def study(
    uid: str, patient: str = "cxr-demo-3", body_site: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    series: dict[str, Any] = {"uid": f"{uid}.1", "modality": {"system": DCM, "code": "DX"}}
    if body_site:
        series["bodySite"] = body_site
    return {
        "resourceType": "ImagingStudy",
        "id": f"s-{uid.replace('.', '-')}",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
        "status": "available",
        "subject": {"reference": f"Patient/{patient}"},
        "started": "2026-11-26T08:00:00Z",
        "series": [series],
        **extra,
    }


def test_films_of_other_body_parts_are_not_treated_as_chest(
    service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    knee = study(
        "2.25.1",
        body_site={"system": "http://snomed.info/sct", "code": "72696002", "display": "Knee"},
    )
    spine = study("2.25.2", description="XR thoracic spine 2 views")
    chest = study("2.25.3", body_site={"system": "http://snomed.info/sct", "code": "51185008"})
    unknown = study("2.25.4")
    body = patient_view_body(
        "cxr-demo-3", prefetch={PREFETCH_KEY: bundle(knee, spine, chest, unknown)}
    )
    cards = call(service, sandbox, body).json()["cards"]
    summaries = [c["summary"] for c in cards]
    assert len(cards) == 2
    assert any(s.startswith("SIMULATED: Chest radiograph (DX)") for s in summaries)
    assert any(s.startswith("SIMULATED: Radiograph (DX)") for s in summaries)  # no body info
    queued = {json.loads(c["links"][0]["appContext"])["studyInstanceUid"] for c in cards}
    assert queued == {"2.25.3", "2.25.4"}


def test_unfollowable_paging_is_flagged_not_hidden(
    service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    """A prefetched first page whose next page cannot be read: say the list is incomplete."""
    analyse_seeded(service, sandbox)
    first = requests.get(
        f"{sandbox.fhir}/ImagingStudy",
        params={"patient": "cxr-demo-1", "_count": "1", "_sort": "-started"},
        timeout=10,
    ).json()
    body = patient_view_body(prefetch={PREFETCH_KEY: first})  # no fhirAuthorization
    cards = call(service, sandbox, body).json()["cards"]
    assert cards[-1]["summary"].startswith("SIMULATED: Not all of the patient's imaging studies")
    assert cards[-1]["indicator"] == "info"
    assert len({c["links"][0].get("appContext") for c in cards[:-1]}) == 1


def test_results_never_cross_data_sources(tmp_path: Path, sandbox: SandboxHandle) -> None:
    """Issuer B sending issuer A's Study UID for its own patient gets no A result."""
    handle, server, other_key, other = two_issuer_service(
        tmp_path, sandbox, "https://other-ehr.example"
    )
    try:
        analyse_seeded(handle, sandbox)
        copied = {**sandbox.studies[0], "subject": {"reference": "Patient/b-123"}}
        body = patient_view_body("b-123", prefetch={PREFETCH_KEY: bundle(copied)})
        token = sign(other_key, claims_for(other.iss, handle.url(PV)))
        response = requests.post(
            handle.url(PV), json=body, timeout=10, headers={"Authorization": f"Bearer {token}"}
        )
        [card] = response.json()["cards"]
        assert "AI analysis waiting" in card["summary"]  # queued for B; A's findings not shown
        assert "> " not in card["detail"]
    finally:
        server.stop()


def test_stored_result_for_another_patient_is_not_shown(
    service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    """Within one data source, a study UID analysed for patient X is not shown for patient Y."""
    analyse_seeded(service, sandbox)
    copied = {**sandbox.studies[0], "subject": {"reference": "Patient/cxr-demo-3"}}
    body = patient_view_body(
        "cxr-demo-3", fhirServer=sandbox.fhir, prefetch={PREFETCH_KEY: bundle(copied)}
    )
    [card] = call(service, sandbox, body).json()["cards"]
    assert "conflicts with another patient record" in card["summary"]


def test_jobs_keep_only_a_vetted_fhir_server(
    service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    metadata = "http://169.254.169.254/latest/meta-data"
    body = patient_view_body(
        "cxr-demo-3",
        fhirServer=metadata,
        fhirAuthorization=sandbox.authorization("cxr-demo-3"),
        prefetch={PREFETCH_KEY: bundle(study("2.25.9"))},
    )
    assert call(service, sandbox, body).status_code == 200
    job = service.store.jobs.claim(SimulatedBackend.model)
    assert job is not None
    assert job.fhir_server is None
    assert job.ref == StudyRef(sandbox.base, "2.25.9", "cxr-demo-3")


MALFORMED_BODIES: list[dict[str, Any]] = [
    patient_view_body(prefetch={PREFETCH_KEY: bundle(study("2.25.5", subject="Patient/x"))}),
    patient_view_body(prefetch={PREFETCH_KEY: bundle(study("2.25.5", identifier=5))}),
    patient_view_body(prefetch={PREFETCH_KEY: bundle(study("2.25.5", modality=7, series=7))}),
    patient_view_body(prefetch={PREFETCH_KEY: bundle(study("2.25.5", id={"x": 1}))}),
    patient_view_body(prefetch={PREFETCH_KEY: {"resourceType": "Bundle", "entry": 3, "link": "x"}}),
    patient_view_body(prefetch={PREFETCH_KEY: {"resourceType": "Bundle", "entry": [None, 1]}}),
    patient_view_body(prefetch=[1, 2]),
    patient_view_body(fhirServer=["x"], fhirAuthorization="token", prefetch={PREFETCH_KEY: None}),
    {
        "hook": "patient-view",
        "hookInstance": "i",
        "context": {"userId": "u", "patientId": "cxr-demo-1", "draftOrders": {"entry": 1}},
        "prefetch": {PREFETCH_KEY: None},
    },
]


@pytest.mark.parametrize("body", MALFORMED_BODIES)
def test_wrong_types_anywhere_never_give_500(
    body: dict[str, Any], service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    response = call(service, sandbox, body)
    assert response.status_code in (200, 400, 412), response.text
    assert "cards" in response.json() or "error_description" in response.json()


def test_wrong_types_in_order_hooks_and_feedback(
    service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    order_body = {
        "hook": "order-select",
        "hookInstance": "i",
        "context": {
            "userId": "u",
            "patientId": "p",
            "selections": "x",
            "draftOrders": {
                "resourceType": "Bundle",
                "entry": [{"resource": {"code": {"coding": 1}}}],
            },
        },
    }
    url = service.url("cxr-ai-order-select")
    token = sign(sandbox.sandbox.key.key, claims_for(sandbox.base, url))
    response = requests.post(
        url, json=order_body, timeout=10, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200 and response.json() == {"cards": []}
    feedback_url = service.url(PV) + "/feedback"
    for outcome in ([], {}, None):
        token = sign(sandbox.sandbox.key.key, claims_for(sandbox.base, feedback_url))
        item = {"card": "c", "outcome": outcome, "outcomeTimestamp": "2026-01-01T00:00:00Z"}
        response = requests.post(
            feedback_url,
            json={"feedback": [item]},
            timeout=10,
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status_code == 400


def test_deeply_nested_json_is_a_400(service: ServiceHandle, sandbox: SandboxHandle) -> None:
    token = sign(sandbox.sandbox.key.key, claims_for(sandbox.base, service.url(PV)))
    raw = '{"hook": ' + "[" * 100_000 + "]" * 100_000 + "}"
    response = requests.post(
        service.url(PV),
        data=raw,
        timeout=30,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400


class RejectingSort(BaseHTTPRequestHandler):
    """A FHIR server that answers 400 to _sort (as some do), and serves plain searches."""

    queries: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        RejectingSort.queries.append(self.path)
        if "_sort" in self.path:
            body = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "not-supported"}],
            }
            status = 400
        else:
            body = bundle(study("2.25.7", patient="cxr-demo-3", description="CXR PA"))
            status = 200
        self.send_response(status)
        self.send_header("Content-Type", "application/fhir+json")
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def log_message(self, *args: Any) -> None:
        pass


def test_servers_that_refuse_sort_are_asked_again_plainly(
    tmp_path: Path, sandbox: SandboxHandle
) -> None:
    stub, stub_base = start_stub(RejectingSort)
    stub_url = f"{stub_base}/fhir"
    handle, server = make_service(tmp_path, sandbox, extra_fhir_servers=(stub_url,))
    RejectingSort.queries = []
    try:
        auth = {
            "access_token": "t",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/ImagingStudy.rs",
            "subject": "ehr",
        }
        body = patient_view_body("cxr-demo-3", fhirServer=stub_url, fhirAuthorization=auth)
        response = call(handle, sandbox, body)
        assert response.status_code == 200
        [card] = response.json()["cards"]
        assert "Chest radiograph" in card["summary"]
        assert len(RejectingSort.queries) == 2
        assert "started=ge" in RejectingSort.queries[0]
        assert "_sort" not in RejectingSort.queries[1]
    finally:
        server.stop()
        stub.shutdown()


def test_queue_depth_counts_only_the_current_model_version(tmp_path: Path) -> None:
    from cds_service.results import ModelInfo
    from cds_service.storage.ports import QueueFull

    store = open_sqlite_storage(tmp_path / "q.sqlite3", max_queue=1)
    old, new = ModelInfo("m", "v1"), ModelInfo("m", "v2")
    store.jobs.enqueue(StudyRef("t", "1", "p"), old, {}, None)
    store.jobs.enqueue(StudyRef("t", "2", "p"), new, {}, None)  # not blocked by v1's leftovers
    with pytest.raises(QueueFull):
        store.jobs.enqueue(StudyRef("t", "3", "p"), new, {}, None)
    assert drain(store, SimulatedBackend()) == 0  # simulated model claims neither
