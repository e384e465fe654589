"""CDS Hooks 2.0 behaviour of the service, driven over real sockets by the sandbox's CDS client.

Requirement IDs in test docstrings refer to the CDS Hooks 2.0 service requirements
(../shared/standards/cds-hooks-2.0-service-requirements.csv; see docs/conformance.md).
"""

from __future__ import annotations

import copy
import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import requests

from cds_service.fhir import imaging_study
from cds_service.fhir.prefetch import PREFETCH_KEY
from cds_service.findings.observations import Observation
from cds_service.inference.simulated import SimulatedBackend
from cds_service.jobs.worker import drain
from cds_service.results import AnalysisResult, Finding
from cds_service.storage.ports import StudyRef
from ehr_sandbox.cds_client import draft_imaging_order, hook_context
from tests.conftest import (
    SandboxHandle,
    ServiceHandle,
    analyse_seeded,
    claims_for,
    make_service,
    patient_view_body,
    sign,
    start_stub,
)
from tests.conftest import (
    signed_post as call,
)

PV = "cxr-ai-patient-view"
OS = "cxr-ai-order-select"
OSIGN = "cxr-ai-order-sign"
ALLOWED_INDICATORS = {"info", "warning", "critical"}


def assert_no_null_or_empty(value: Any, path: str = "$") -> None:
    """Req 3: no null, "", [] or {} anywhere (the top-level cards array excepted)."""
    if isinstance(value, dict):
        assert value, f"empty object at {path}"
        for key, item in value.items():
            assert_no_null_or_empty(item, f"{path}.{key}")
    elif isinstance(value, list):
        assert value, f"empty array at {path}"
        for index, item in enumerate(value):
            assert_no_null_or_empty(item, f"{path}[{index}]")
    else:
        assert value is not None and value != "", f"null or empty string at {path}"


def assert_valid_cards(response: dict[str, Any]) -> list[dict[str, Any]]:
    """Reqs 74, 80-147: the structure of every card we send."""
    assert set(response) <= {"cards", "systemActions"}
    cards = response["cards"]
    assert isinstance(cards, list)
    for card in cards:
        assert_no_null_or_empty(card)
        assert isinstance(card["uuid"], str)
        assert isinstance(card["summary"], str) and len(card["summary"]) < 140
        assert card["indicator"] in ALLOWED_INDICATORS
        assert isinstance(card["source"]["label"], str)
        assert "normal" not in card["summary"].lower()
        topic = card["source"].get("topic")
        if topic:
            assert isinstance(topic["system"], str) and isinstance(topic["code"], str)
        assert "suggestions" not in card or card.get("selectionBehavior") in {"at-most-one", "any"}
        for suggestion in card.get("suggestions", []):
            assert isinstance(suggestion["label"], str) and isinstance(suggestion["uuid"], str)
            assert isinstance(suggestion.get("isRecommended", False), bool)
            for action in suggestion["actions"]:
                assert action["type"] in {"create", "update", "delete"}
                assert isinstance(action["description"], str)
                if action["type"] == "create":
                    assert isinstance(action["resource"]["resourceType"], str)
                    assert "id" not in action["resource"]
        for reason in card.get("overrideReasons", []):
            assert reason["system"] and reason["code"] and reason["display"]
        for link in card.get("links", []):
            assert isinstance(link["label"], str)
            assert link["url"].startswith(("http://", "https://"))
            assert link["type"] in {"absolute", "smart"}
            if link["type"] == "absolute":
                assert "appContext" not in link
            if "appContext" in link:
                assert isinstance(link["appContext"], str)
    return list(cards)


# -- discovery --------------------------------------------------------------------------------
def test_discovery_lists_one_service_per_hook(service: ServiceHandle) -> None:
    """Reqs 4-13, 29, 36, 55-59."""
    response = requests.get(f"{service.base}/cds-services", timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert_no_null_or_empty(body)
    hooks = sorted(s["hook"] for s in body["services"])
    assert hooks == ["order-select", "order-sign", "patient-view"]
    for entry in body["services"]:
        assert entry["id"] and entry["title"] and entry["description"]
        template = entry["prefetch"][PREFETCH_KEY]
        assert "{{context.patientId}}" in template
        assert "draftOrders" not in template and "selections" not in template


def test_cors_preflight_needs_no_jwt(service: ServiceHandle) -> None:
    """Req 208: CORS on every endpoint; preflight without Authorization."""
    for path in ("/cds-services", f"/cds-services/{PV}", f"/cds-services/{PV}/feedback"):
        response = requests.options(
            service.base + path,
            headers={
                "Origin": "https://sandbox.cds-hooks.org",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
            timeout=10,
        )
        assert response.status_code in (200, 204)
        assert response.headers["Access-Control-Allow-Origin"] == "https://sandbox.cds-hooks.org"
        allowed = response.headers["Access-Control-Allow-Headers"].lower()
        assert "authorization" in allowed and "content-type" in allowed
    discovery = requests.get(
        service.base + "/cds-services", headers={"Origin": "https://x.org"}, timeout=10
    )
    assert discovery.headers["Access-Control-Allow-Origin"] == "https://x.org"


# -- patient-view ----------------------------------------------------------------------------
def test_patient_view_with_client_prefetch_gives_finding_cards(
    service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    """The sandbox client computes prefetch from discovery; results exist: finding cards."""
    analyse_seeded(service, sandbox)
    context = hook_context("patient-view", "cxr-demo-1", "Practitioner/example")
    calls = service.client.fire(
        service.base, "patient-view", context, sandbox.fhir, sandbox.authorization()
    )
    assert len(calls) == 1
    assert PREFETCH_KEY in calls[0].request["prefetch"]
    assert calls[0].status == 200
    cards = assert_valid_cards(calls[0].response)
    # cxr-demo-1 has two recent studies; each produces at least one card.
    studies = {json.loads(c["links"][0]["appContext"])["imagingStudy"] for c in cards}
    assert studies == {"ImagingStudy/cxr-nih-00000002", "ImagingStudy/cxr-siim-0001"}
    for card in cards:
        assert card["summary"].startswith("SIMULATED")
        assert "SIMULATED" in card["source"]["label"]
        assert "SIMULATED" in card["detail"]
        assert card["links"][0]["url"] == service.base + "/app/launch"


def test_cards_follow_the_stored_findings(service: ServiceHandle, sandbox: SandboxHandle) -> None:
    """Critical for pneumothorax, warning for others, and never 'normal'."""
    study = sandbox.studies[0]
    uid = imaging_study.study_uid(study)
    assert uid
    model = SimulatedBackend.model
    service.store.results.put_result(
        StudyRef(sandbox.base, uid, "cxr-demo-1"),
        AnalysisResult(
            study_uid=uid,
            model=model,
            status="completed",
            report_text="x",
            findings=(
                Finding(Observation.PNEUMOTHORAX, "present", "Right pneumothorax."),
                Finding(Observation.PLEURAL_EFFUSION, "present", "Small effusion."),
                Finding(Observation.CARDIOMEGALY, "absent", "Heart size is normal."),
            ),
        ),
    )
    body = patient_view_body(
        prefetch={
            PREFETCH_KEY: {
                "resourceType": "Bundle",
                "type": "searchset",
                "entry": [{"resource": study}],
            }
        }
    )
    cards = assert_valid_cards(call(service, sandbox, PV, body).json())
    assert [c["indicator"] for c in cards] == ["critical", "warning"]
    assert "pneumothorax" in cards[0]["summary"] and "effusion" in cards[1]["summary"]
    assert "> Right pneumothorax." in cards[0]["detail"]

    service.store.results.put_result(
        StudyRef(sandbox.base, uid, "cxr-demo-1"),
        AnalysisResult(
            study_uid=uid,
            model=model,
            status="completed",
            report_text="x",
            findings=(Finding(Observation.PNEUMOTHORAX, "absent", "No pneumothorax."),),
        ),
    )
    cards = assert_valid_cards(call(service, sandbox, PV, body).json())
    assert len(cards) == 1 and cards[0]["indicator"] == "info"
    assert "no major finding detected by the model" in cards[0]["summary"]


def test_missing_result_enqueues_and_says_in_progress(
    service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    body = patient_view_body(
        "cxr-demo-2", fhirServer=sandbox.fhir, fhirAuthorization=sandbox.authorization("cxr-demo-2")
    )
    cards = assert_valid_cards(call(service, sandbox, PV, body).json())
    # This service has no Backend Services registration: the card says at once that the job
    # waits for one, and which setting gives it (not a bare "in progress").
    assert len(cards) == 1 and "AI analysis waiting" in cards[0]["summary"]
    assert "CXR_CDS_EHR_CLIENTS" in cards[0]["detail"]
    assert service.store.jobs.queue_depth(SimulatedBackend.model) == 1
    # A second hook does not queue the same study twice.
    call(service, sandbox, PV, body)
    assert service.store.jobs.queue_depth(SimulatedBackend.model) == 1
    assert drain(service.store, SimulatedBackend()) == 1
    cards = assert_valid_cards(call(service, sandbox, PV, body).json())
    assert "in progress" not in cards[0]["summary"]


def test_fetches_with_fhir_authorization_when_prefetch_missing(
    service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    """Req 34, 60, 61: no prefetch key -> the service searches the FHIR server itself."""
    analyse_seeded(service, sandbox)
    body = patient_view_body(fhirServer=sandbox.fhir, fhirAuthorization=sandbox.authorization())
    cards = assert_valid_cards(call(service, sandbox, PV, body).json())
    assert len({c["links"][0]["appContext"] for c in cards}) == 2


def test_null_prefetch_means_nothing_found(service: ServiceHandle, sandbox: SandboxHandle) -> None:
    body = patient_view_body(prefetch={PREFETCH_KEY: None})
    response = call(service, sandbox, PV, body)
    assert response.status_code == 200 and response.json() == {"cards": []}


def test_operation_outcome_prefetch_falls_back_to_fetch(
    service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    """Req 52: an OperationOutcome in prefetch is an error: fetch instead, or 412."""
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "timeout"}],
    }
    with_access = patient_view_body(
        prefetch={PREFETCH_KEY: outcome},
        fhirServer=sandbox.fhir,
        fhirAuthorization=sandbox.authorization(),
    )
    response = call(service, sandbox, PV, with_access)
    assert response.status_code == 200 and response.json()["cards"]
    without_access = patient_view_body(prefetch={PREFETCH_KEY: outcome})
    assert call(service, sandbox, PV, without_access).status_code == 412


def test_412_when_data_can_be_neither_prefetched_nor_fetched(
    service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    """Req 54."""
    response = call(service, sandbox, PV, patient_view_body())
    assert response.status_code == 412
    assert PREFETCH_KEY in response.json()["error_description"]


def test_unreachable_fhir_server_gives_412_not_500(tmp_path: Path, sandbox: SandboxHandle) -> None:
    dead = "http://127.0.0.1:9/fhir"
    handle, server = make_service(tmp_path, sandbox, extra_fhir_servers=(dead,))
    try:
        body = patient_view_body(fhirServer=dead, fhirAuthorization=sandbox.authorization())
        assert call(handle, sandbox, PV, body).status_code == 412
        no_card, server2 = make_service(
            tmp_path / "b", sandbox, extra_fhir_servers=(dead,), on_missing_data="no-card"
        )
        response = call(no_card, sandbox, PV, body)
        server2.stop()
        assert response.status_code == 200 and response.json() == {"cards": []}
    finally:
        server.stop()


def test_paginated_prefetch_is_followed(service: ServiceHandle, sandbox: SandboxHandle) -> None:
    """A prefetched first page with a next link: the service reads the next page itself."""
    analyse_seeded(service, sandbox)
    first = requests.get(
        f"{sandbox.fhir}/ImagingStudy",
        params={"patient": "cxr-demo-1", "_count": "1", "_sort": "-started"},
        timeout=10,
    ).json()
    assert any(link["relation"] == "next" for link in first["link"])
    body = patient_view_body(
        prefetch={PREFETCH_KEY: first},
        fhirServer=sandbox.fhir,
        fhirAuthorization=sandbox.authorization(),
    )
    cards = assert_valid_cards(call(service, sandbox, PV, body).json())
    assert len({c["links"][0]["appContext"] for c in cards}) == 2


def test_prefetched_studies_of_another_patient_are_ignored(
    service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    analyse_seeded(service, sandbox)
    other = next(s for s in sandbox.studies if s["subject"]["reference"] == "Patient/cxr-demo-2")
    body = patient_view_body(
        prefetch={
            PREFETCH_KEY: {
                "resourceType": "Bundle",
                "type": "searchset",
                "entry": [{"resource": other}],
            }
        }
    )
    assert call(service, sandbox, PV, body).json() == {"cards": []}


class RecordingFhir(BaseHTTPRequestHandler):
    """A FHIR server stub that records each request's Authorization header and pages once."""

    seen: list[tuple[str, str | None, str | None]] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        RecordingFhir.seen.append(
            (self.path, self.headers.get("Authorization"), self.headers.get("Cookie"))
        )
        base = f"http://127.0.0.1:{self.server.server_address[1]}/fhir"
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
        if "page=2" not in self.path:
            bundle["link"] = [{"relation": "next", "url": f"{base}/ImagingStudy?page=2"}]
        body = json.dumps(bundle).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Set-Cookie", "session=caller-a; Path=/")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_disallowed_fhir_server_gets_no_outbound_request(
    service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    """SSRF guard: a fhirServer not allowed for the issuer is never contacted."""
    trap, trap_base = start_stub(RecordingFhir)
    RecordingFhir.seen = []
    try:
        trap_url = f"{trap_base}/fhir"
        page = {
            "resourceType": "Bundle",
            "type": "searchset",
            "link": [{"relation": "next", "url": f"{trap_url}/ImagingStudy?page=2"}],
        }
        for body in (
            patient_view_body(fhirServer=trap_url, fhirAuthorization=sandbox.authorization()),
            patient_view_body(
                fhirServer=trap_url,
                fhirAuthorization=sandbox.authorization(),
                prefetch={PREFETCH_KEY: page},
            ),
            # Allowed server, but a next link pointing elsewhere is not followed either.
            patient_view_body(
                fhirServer=sandbox.fhir,
                fhirAuthorization=sandbox.authorization(),
                prefetch={PREFETCH_KEY: page},
            ),
        ):
            call(service, sandbox, PV, body)
        assert RecordingFhir.seen == []
    finally:
        trap.shutdown()


# -- order hooks -----------------------------------------------------------------------------
@pytest.mark.parametrize("hook,service_id", [("order-select", OS), ("order-sign", OSIGN)])
def test_chest_radiograph_order_gets_prior_findings(
    hook: str, service_id: str, service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    analyse_seeded(service, sandbox)
    order = draft_imaging_order(
        "cxr-demo-1",
        "71046",
        "http://www.ama-assn.org/go/cpt",
        "Radiologic examination, chest; 2 views",
    )
    context = hook_context(hook, "cxr-demo-1", "Practitioner/example", order)
    calls = service.client.fire(service.base, hook, context, sandbox.fhir, sandbox.authorization())
    cards = assert_valid_cards(calls[0].response)
    assert cards and all(c["summary"].startswith("SIMULATED: Prior ") for c in cards)


def test_non_chest_order_gets_no_cards(service: ServiceHandle, sandbox: SandboxHandle) -> None:
    order = draft_imaging_order(
        "cxr-demo-1", "73030", "http://www.ama-assn.org/go/cpt", "Radiologic examination, shoulder"
    )
    context = hook_context("order-select", "cxr-demo-1", "Practitioner/example", order)
    body = {"hook": "order-select", "hookInstance": "6f1e", "context": context}
    response = call(service, sandbox, OS, body)
    assert response.status_code == 200 and response.json() == {"cards": []}


def test_loose_draft_orders_bundle_without_type(
    service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    analyse_seeded(service, sandbox)
    order = {
        "resourceType": "ServiceRequest",
        "id": "o1",
        "status": "draft",
        "intent": "order",
        "code": {"text": "CXR PA and lateral"},
    }
    context = {
        "userId": "Practitioner/COREPRACTITIONER1",
        "patientId": "cxr-demo-1",
        "selections": ["ServiceRequest/o1"],
        "draftOrders": {"resourceType": "Bundle", "entry": [{"resource": order}]},
    }
    body = {
        "hook": "order-select",
        "hookInstance": "x1",
        "context": context,
        "fhirServer": sandbox.fhir,
        "fhirAuthorization": sandbox.authorization(),
    }
    assert assert_valid_cards(call(service, sandbox, OS, body).json())


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw,expected",
    [
        (b"{not json", 400),
        (b"[]", 400),
        (b'{"hook": "patient-view"}', 400),
        (
            b'{"hook": "order-sign", "hookInstance": "a", '
            b'"context": {"patientId": "p", "userId": "u"}}',
            400,
        ),
        (b'{"hook": "patient-view", "hookInstance": "a", "context": {"userId": "u"}}', 400),
    ],
)
def test_malformed_requests_get_clear_400(
    raw: bytes, expected: int, service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    token = sign(sandbox.sandbox.key.key, claims_for(sandbox.base, service.url(PV)))
    response = requests.post(
        service.url(PV),
        data=raw,
        timeout=10,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert response.status_code == expected
    assert response.json()["error_description"]
    assert "Traceback" not in response.text


def test_unknown_service_is_404(service: ServiceHandle, sandbox: SandboxHandle) -> None:
    response = call(service, sandbox, "no-such-service", patient_view_body())
    assert response.status_code == 404


def test_oversized_body_is_413(service: ServiceHandle, sandbox: SandboxHandle) -> None:
    big = patient_view_body(prefetch={"junk": "x" * (6 * 1024 * 1024)})
    assert call(service, sandbox, PV, big).status_code == 413


# -- feedback ---------------------------------------------------------------------------------
def test_feedback_is_stored_once(service: ServiceHandle, sandbox: SandboxHandle) -> None:
    """Req 148: feedback endpoint; the same feedback sent twice is stored once."""
    item = {
        "card": "9f6b5a36-0d2e-4ad4-a0b1-2cde0c7a3b10",
        "outcome": "overridden",
        "overrideReason": {
            "reason": {"code": "not-relevant", "system": "http://x.org", "display": "Not relevant"}
        },
        "outcomeTimestamp": "2026-11-27T10:00:00Z",
    }
    url_id = PV + "/feedback"
    first = call(service, sandbox, url_id, {"feedback": [item]})
    second = call(service, sandbox, url_id, {"feedback": [copy.deepcopy(item)]})
    assert first.status_code == 200 and first.json() == {"stored": 1, "duplicates": 0}
    assert second.json() == {"stored": 0, "duplicates": 1}
    assert service.store.feedback.feedback_count(PV) == 1
    bad = call(service, sandbox, url_id, {"feedback": [{"card": "x", "outcome": "maybe"}]})
    assert bad.status_code == 400


def test_every_fhir_call_carries_the_hook_access_token(
    tmp_path: Path, sandbox: SandboxHandle
) -> None:
    """Req 61: the fhirAuthorization token on every FHIR call, next pages included; no cookies."""
    stub, stub_base = start_stub(RecordingFhir)
    stub_url = f"{stub_base}/fhir"
    handle, server = make_service(tmp_path, sandbox, extra_fhir_servers=(stub_url,))
    RecordingFhir.seen = []
    try:
        for token in ("token-one", "token-two"):
            auth = {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": 300,
                "scope": "patient/ImagingStudy.rs",
                "subject": "ehr",
            }
            body = patient_view_body(fhirServer=stub_url, fhirAuthorization=auth)
            assert call(handle, sandbox, PV, body).status_code == 200
        assert len(RecordingFhir.seen) == 4  # search + next page, twice
        assert [auth for _, auth, _ in RecordingFhir.seen] == [
            "Bearer token-one",
            "Bearer token-one",
            "Bearer token-two",
            "Bearer token-two",
        ]
        assert [cookie for _, _, cookie in RecordingFhir.seen] == [None] * 4
        assert RecordingFhir.seen[0][0].startswith("/fhir/ImagingStudy?patient=cxr-demo-1")
    finally:
        server.stop()
        stub.shutdown()


# FHIR search parameters CDS Hooks 2.0 recommends prefetch queries stick to (Req 58).
RECOMMENDED_SEARCH = {
    "patient",
    "subject",
    "_id",
    "code",
    "date",
    "status",
    "modality",
    "_count",
    "_sort",
    "category",
    "encounter",
}


def test_prefetch_template_uses_the_recommended_subset() -> None:
    """Req 55-59: tokens {{context.x}} on primitive fields; simple search parameters only."""
    from urllib.parse import parse_qsl, urlsplit

    from cds_service.fhir.prefetch import PREFETCH_QUERY

    parts = urlsplit(PREFETCH_QUERY)
    assert parts.path == "ImagingStudy"
    params = dict(parse_qsl(parts.query))
    assert set(params) <= RECOMMENDED_SEARCH
    assert params["patient"] == "{{context.patientId}}"
