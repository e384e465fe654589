"""Arrival triggers against the real EHR sandbox: the REST API, the Subscription notification
receiver, the polling watcher and the CLI, all ending in one idempotent enqueue."""

from __future__ import annotations

import copy
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from cds_service.config import SERVICE_SCOPE, EhrClient
from cds_service.fhir.backend_services import BackendServicesClients
from cds_service.imaging.study import study_images_for
from cds_service.inference.pipeline import ImagePipelineBackend
from cds_service.inference.simulated import SimulatedBackend, SimulatedReportWriter
from cds_service.jobs.arrivals import (
    NOTIFICATIONS_PATH,
    SUBSCRIPTION_SCOPE,
    Arrivals,
    study_id_in,
    subscribe,
)
from cds_service.jobs.cli import watch
from cds_service.jobs.worker import drain
from ehr_sandbox.app import Sandbox, SandboxSettings
from ehr_sandbox.app import create_app as create_sandbox_app
from ehr_sandbox.cds_client import SigningKey
from ehr_sandbox.notifier import DeliverySettings
from ehr_sandbox.seed import seed
from tests.conftest import (
    SandboxHandle,
    ServerThread,
    ServiceHandle,
    claims_for,
    free_port,
    make_service,
    sign,
    two_issuer_service,
)

MODEL = SimulatedBackend.model
CLIENT_ID = "cxr-cds-arrivals"
TOKEN = "notify-" + "x" * 40


@pytest.fixture(scope="module")
def ehr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxHandle]:
    """A sandbox of this module's own: these tests add studies to it."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    box = Sandbox.open(
        SandboxSettings(
            data_dir=tmp_path_factory.mktemp("arrivals-ehr"),
            base_url=base,
            delivery=DeliverySettings(attempts=2, retry_delay_s=0.05, timeout_s=5.0),
        )
    )
    studies = seed(box.store)
    server = ServerThread(create_sandbox_app(sandbox=box), port)
    yield SandboxHandle(base=base, sandbox=box, studies=studies)
    server.stop()


def registration(ehr: SandboxHandle, tmp_path: Path, token: str | None = TOKEN) -> EhrClient:
    key = SigningKey.load_or_create(tmp_path / "backend.jwk.json")
    ehr.sandbox.backend.register(
        CLIENT_ID, key.public_jwks(), f"{SERVICE_SCOPE} {SUBSCRIPTION_SCOPE}"
    )
    return EhrClient(
        fhir_base=ehr.fhir,
        token_url=f"{ehr.base}/auth/token",
        client_id=CLIENT_ID,
        key_file=tmp_path / "backend.jwk.json",
        notification_token=token,
    )


@dataclass
class Service:
    handle: ServiceHandle
    ehr: SandboxHandle
    arrivals: Arrivals
    client: EhrClient

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = f"{self.handle.base}{path}"
        token = sign(self.ehr.sandbox.key.key, claims_for(self.ehr.base, url))
        headers = {"Authorization": f"Bearer {token}"}
        return requests.request(method, url, headers=headers, timeout=10, **kwargs)

    def notify(self, body: Any = None, token: str = TOKEN, **kwargs: Any) -> requests.Response:
        return requests.post(
            f"{self.handle.base}{NOTIFICATIONS_PATH}",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
            **kwargs,
        )


@pytest.fixture
def service(tmp_path: Path, ehr: SandboxHandle) -> Iterator[Service]:
    client = registration(ehr, tmp_path)
    handle, server = make_service(tmp_path, ehr, ehr_clients=(client,))
    yield Service(
        handle, ehr, Arrivals(handle.store, MODEL, BackendServicesClients((client,))), client
    )
    server.stop()


def new_study(ehr: SandboxHandle, **changes: Any) -> dict[str, Any]:
    """A fresh chest film in the EHR: a copy of a seeded study with a new UID and id."""
    study = copy.deepcopy(ehr.studies[0])
    study.pop("id", None)
    study.pop("meta", None)
    uid = f"2.25.{uuid.uuid4().int}"
    study["identifier"] = [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}]
    study.update(changes)
    return ehr.sandbox.store.create(study)


def test_rest_api_queues_once_and_reports_the_result(service: Service) -> None:
    study = new_study(service.ehr)
    body = {"fhirServer": service.ehr.fhir, "imagingStudy": f"ImagingStudy/{study['id']}"}
    first = service.api("POST", "/api/analyses", json=body)
    assert first.status_code == 201, first.text
    analysis = first.json()
    assert analysis["status"] == "queued" and analysis["model"]["id"] == MODEL.model_id
    again = service.api("POST", "/api/analyses", json=body)
    assert again.status_code == 200 and again.json()["id"] == analysis["id"]
    assert service.handle.store.jobs.queue_depth(MODEL) == 1  # one job, however often it is asked

    drain(service.handle.store, SimulatedBackend())
    done = service.api("GET", f"/api/analyses/{analysis['id']}").json()
    assert done["status"] == "done"
    assert done["result"]["status"] == "completed"
    assert done["result"]["simulated"] is True
    assert "AI-generated, preliminary" in done["result"]["notice"]
    # Asked again after the analysis: the same analysis, not a second one.
    assert service.api("POST", "/api/analyses", json=body).json()["id"] == analysis["id"]
    assert service.handle.store.jobs.queue_depth(MODEL) == 0


@pytest.mark.parametrize(
    ("reference", "status", "says"),
    [
        ("ImagingStudy/does-not-exist", 404, "no such ImagingStudy"),
        ("Patient/cxr-demo-1", 400, "not an ImagingStudy"),
        ("http://elsewhere.example/fhir/ImagingStudy/1", 400, "not an ImagingStudy"),
        ("ImagingStudy/../../admin", 400, "not an ImagingStudy"),
    ],
)
def test_rest_api_refuses_bad_references_clearly(
    service: Service, reference: str, status: int, says: str
) -> None:
    body = {"fhirServer": service.ehr.fhir, "imagingStudy": reference}
    response = service.api("POST", "/api/analyses", json=body)
    assert response.status_code == status
    assert says in response.json()["error_description"]
    assert service.handle.store.jobs.queue_depth(MODEL) == 0


def test_rest_api_needs_a_jwt_and_a_listed_fhir_server(tmp_path: Path, ehr: SandboxHandle) -> None:
    client = registration(ehr, tmp_path)
    handle, server, key, other = two_issuer_service(
        tmp_path, ehr, "https://other.example", ehr_clients=(client,)
    )
    try:
        study = new_study(ehr)
        body = {"fhirServer": ehr.fhir, "imagingStudy": f"ImagingStudy/{study['id']}"}
        url = f"{handle.base}/api/analyses"
        assert requests.post(url, json=body, timeout=10).status_code == 401
        token = sign(key, claims_for(other.iss, url))
        denied = requests.post(
            url, json=body, timeout=10, headers={"Authorization": f"Bearer {token}"}
        )
        assert denied.status_code == 403 and "may not name" in denied.json()["error_description"]
        assert handle.store.jobs.queue_depth(MODEL) == 0
        # An analysis of the sandbox's data source is not found by another caller.
        mine = sign(ehr.sandbox.key.key, claims_for(ehr.base, url))
        created = requests.post(
            url, json=body, timeout=10, headers={"Authorization": f"Bearer {mine}"}
        ).json()
        read_url = f"{url}/{created['id']}"
        token = sign(key, claims_for(other.iss, read_url))
        hidden = requests.get(read_url, timeout=10, headers={"Authorization": f"Bearer {token}"})
        assert hidden.status_code == 404
    finally:
        server.stop()


def test_without_access_the_api_names_the_setting(tmp_path: Path, ehr: SandboxHandle) -> None:
    handle, server = make_service(tmp_path, ehr)  # no CXR_CDS_EHR_CLIENTS
    try:
        url = f"{handle.base}/api/analyses"
        token = sign(ehr.sandbox.key.key, claims_for(ehr.base, url))
        body = {"fhirServer": ehr.fhir, "imagingStudy": f"ImagingStudy/{ehr.studies[0]['id']}"}
        response = requests.post(
            url, json=body, timeout=10, headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 409
        assert "register it in CXR_CDS_EHR_CLIENTS" in response.json()["error_description"]
    finally:
        server.stop()


def test_openapi_document_describes_the_api(service: Service) -> None:
    document = requests.get(f"{service.handle.base}/api/openapi.json", timeout=10).json()
    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) == {"/api/analyses", "/api/analyses/{id}"}
    assert "201" in document["paths"]["/api/analyses"]["post"]["responses"]


def test_id_only_notification_queues_the_named_study(service: Service) -> None:
    study = new_study(service.ehr)
    bundle = {
        "resourceType": "Bundle",
        "type": "history",
        "entry": [
            {"resource": {"resourceType": "Parameters", "parameter": []}},
            {
                "fullUrl": f"{service.ehr.fhir}/ImagingStudy/{study['id']}",
                "request": {"method": "POST", "url": "ImagingStudy"},
            },
        ],
    }
    response = service.notify(bundle)
    assert response.status_code == 200 and response.json() == {"studies": 1, "queued": 1}
    assert service.notify(bundle).json() == {"studies": 1, "queued": 0}  # idempotent
    job = service.handle.store.jobs.claim(MODEL)
    assert job is not None and job.fhir_server == service.ehr.fhir
    assert job.study_resource["id"] == study["id"]  # read from the EHR, not from the body


def test_full_resource_notification_reads_the_study_again(service: Service) -> None:
    study = new_study(service.ehr)
    forged = {**study, "subject": {"reference": "Patient/someone-else"}}
    response = requests.put(
        f"{service.handle.base}{NOTIFICATIONS_PATH}/ImagingStudy/{study['id']}",
        json=forged,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    assert response.status_code == 200 and response.json()["queued"] == 1
    job = service.handle.store.jobs.claim(MODEL)
    assert job is not None and job.ref.patient_id == "cxr-demo-1"


def test_notifications_need_the_subscription_token(service: Service) -> None:
    assert service.notify(None, token="x" * 48).status_code == 401
    assert (
        requests.post(f"{service.handle.base}{NOTIFICATIONS_PATH}", timeout=10).status_code == 401
    )
    bad = requests.post(
        f"{service.handle.base}{NOTIFICATIONS_PATH}",
        data=b"{not json",
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"},
        timeout=10,
    )
    assert bad.status_code == 400 and "error_description" in bad.json()
    assert service.handle.store.jobs.queue_depth(MODEL) == 0


def test_empty_notification_and_watcher_queue_what_changed_since_the_cursor(
    service: Service,
) -> None:
    store = service.handle.store
    arrivals = service.arrivals
    stop = threading.Event()
    assert watch(arrivals, service.ehr.fhir, interval_s=0.01, stop=stop, once=True) == 0
    first = store.jobs.queue_depth(MODEL)
    assert first >= 1  # the seeded chest films (and this module's earlier studies)
    cursor = store.cursors.watch_cursor(service.ehr.fhir)
    assert cursor is not None
    assert watch(arrivals, service.ehr.fhir, interval_s=0.01, stop=stop, once=True) == 0
    assert store.jobs.queue_depth(MODEL) == first  # nothing queued twice

    new_study(service.ehr)
    new_study(service.ehr, status="cancelled")  # not a usable film: never queued
    response = service.notify(None)  # an empty notification: "something changed"
    assert response.status_code == 200
    assert response.json()["queued"] == 1  # the new chest film, not the cancelled study
    assert store.jobs.queue_depth(MODEL) == first + 1
    later = store.cursors.watch_cursor(service.ehr.fhir)
    assert later is not None and later >= cursor


def test_study_references_stay_on_their_fhir_server() -> None:
    base = "http://ehr.example/fhir"
    assert study_id_in(base, "ImagingStudy/abc-1") == "abc-1"
    assert study_id_in(base, "http://EHR.example:80/fhir/ImagingStudy/abc-1") == "abc-1"
    assert study_id_in(base, "ImagingStudy/abc-1/_history/2") == "abc-1"
    assert study_id_in(base, "https://evil.example/fhir/ImagingStudy/abc-1") is None
    assert study_id_in(base, "ImagingStudy/a%2Fb") is None
    assert study_id_in(base, "ImagingStudy/") is None


@pytest.mark.parametrize("payload", ["id-only", "empty", "full-resource"])
def test_a_study_created_in_the_ehr_arrives_through_its_subscription(
    service: Service, payload: str
) -> None:
    """`cxr-cds subscribe` creates the Subscription with the service's Backend Services
    registration; the EHR's notification queues a new film once, and the worker files it."""
    endpoint = service.handle.base + NOTIFICATIONS_PATH
    created = subscribe(service.arrivals, service.client, endpoint, payload=payload)
    notifier = service.ehr.sandbox.notifier
    try:
        assert created["status"] == "active"
        study = new_study(service.ehr)
        assert notifier.flush(10)
        job = service.handle.store.jobs.claim(MODEL)
        assert job is not None and job.study_resource["id"] == study["id"]
        assert job.fhir_server == service.ehr.fhir
        service.handle.store.jobs.put_back(job, "test")
        # An update of the same study notifies again; it is not queued twice.
        service.ehr.sandbox.store.update({**study, "description": "CHEST PA (re-sent)"})
        assert notifier.flush(10)
        assert service.handle.store.jobs.queue_depth(MODEL) == 1
    finally:
        service.ehr.sandbox.store.delete("Subscription", created["id"])


def test_a_subscription_with_the_wrong_token_shows_the_error_in_the_ehr(
    service: Service,
) -> None:
    endpoint = service.handle.base + NOTIFICATIONS_PATH
    wrong = EhrClient(**{**service.client.__dict__, "notification_token": "w" * 40})
    created = subscribe(service.arrivals, wrong, endpoint)
    notifier = service.ehr.sandbox.notifier
    try:
        new_study(service.ehr)
        assert notifier.flush(10)
        stored = service.ehr.sandbox.store.read("Subscription", created["id"])
        assert stored is not None and stored["status"] == "error"
        assert "401" in stored["error"]
        assert service.handle.store.jobs.queue_depth(MODEL) == 0
    finally:
        service.ehr.sandbox.store.delete("Subscription", created["id"])


def test_a_film_added_to_the_running_sandbox_is_analysed_and_filed(service: Service) -> None:
    """`cxr-cds sandbox-film`: Binary, then ImagingStudy + Media in one transaction, over
    HTTP; the Subscription queues the study and a worker files its report."""
    from cds_service.inference.registry import device_info
    from cds_service.jobs.filing import ReportFiler
    from ehr_sandbox.films import DEFAULT_FILM, add_film

    endpoint = service.handle.base + NOTIFICATIONS_PATH
    created = subscribe(service.arrivals, service.client, endpoint)
    try:
        data_dir = service.ehr.sandbox.settings.data_dir
        reference = add_film(service.ehr.base, data_dir, "cxr-demo-2", DEFAULT_FILM)
        assert service.ehr.sandbox.notifier.flush(10)
        job = service.handle.store.jobs.claim(MODEL)
        assert job is not None and f"ImagingStudy/{job.study_resource['id']}" == reference
        service.handle.store.jobs.put_back(job, "test")
        backend = ImagePipelineBackend(
            SimulatedReportWriter(),
            study_images_for(BackendServicesClients(service.handle.settings.ehr_clients)),
        )
        filer = ReportFiler(
            BackendServicesClients((service.client,)), device_info(service.handle.settings, MODEL)
        )
        assert drain(service.handle.store, backend, filer) == 1
        stored = service.handle.store.results.get_result(job.ref, MODEL)
        assert stored is not None and stored.result.status == "completed"
        assert stored.filed_location and "/DiagnosticReport/" in stored.filed_location
    finally:
        service.ehr.sandbox.store.delete("Subscription", created["id"])


def test_one_process_reads_fetches_and_files_with_one_token_per_ehr(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The composition root gives reading an arrival, fetching its images and filing its
    report one Backend Services client per EHR: one signed assertion, one token request."""
    from cds_service.composition import Composition
    from cds_service.fhir.backend_services import BackendServicesClient
    from ehr_sandbox.films import DEFAULT_FILM, add_film

    signed: list[str] = []
    original = BackendServicesClient.assertion

    def counting(self: BackendServicesClient) -> str:
        signed.append(self.ehr.client_id)
        return original(self)

    monkeypatch.setattr(BackendServicesClient, "assertion", counting)
    parts = Composition(service.handle.settings, storage=service.handle.store)
    data_dir = service.ehr.sandbox.settings.data_dir
    reference = add_film(service.ehr.base, data_dir, "cxr-demo-2", DEFAULT_FILM)
    arrival = parts.arrivals.study(service.ehr.fhir, reference)  # read with a system token
    assert arrival.outcome == "queued" and arrival.ref is not None
    backend = parts.backend()
    assert drain(parts.storage, backend, parts.report_filer(backend.model)) == 1
    stored = parts.storage.results.get_result(arrival.ref, backend.model)
    assert stored is not None and stored.result.status == "completed"
    assert stored.filed_location and "/DiagnosticReport/" in stored.filed_location
    assert signed == [CLIENT_ID]  # read, image fetch and filing shared one token


def test_a_subscription_stopped_on_refused_notifications_resumes_and_catches_up(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """An EHR stops a Subscription after refused notifications (here: a wrong token at the
    time) and nothing restarts it; at start the service resumes it with its token now, and
    queues the films that arrived while it was stopped."""
    from cds_service.cli import resume_arrivals
    from cds_service.jobs.arrivals import resume_subscriptions

    endpoint = service.handle.base + NOTIFICATIONS_PATH
    wrong = EhrClient(**{**service.client.__dict__, "notification_token": "w" * 40})
    created = subscribe(service.arrivals, wrong, endpoint)
    sandbox = service.ehr.sandbox
    try:
        refused = new_study(service.ehr)
        assert sandbox.notifier.flush(10)
        assert sandbox.store.read("Subscription", created["id"])["status"] == "error"
        missed = new_study(service.ehr)  # no notification at all: the Subscription is stopped
        assert sandbox.notifier.flush(10)
        assert service.handle.store.jobs.queue_depth(MODEL) == 0
        assert "notification refused (401)" in caplog.text  # the service said so

        done = resume_subscriptions(service.arrivals, service.client, endpoint)
        assert done.resumed == [f"Subscription/{created['id']}"] and done.active == 0
        assert done.caught_up is not None
        assert {a.outcome for a in done.caught_up.arrivals} >= {"queued"}
        queued = {
            job.study_resource["id"] for job in service.handle.store.jobs.claim_batch(MODEL, 10)
        }
        assert {refused["id"], missed["id"]} <= queued
        assert sandbox.store.read("Subscription", created["id"])["status"] == "active"
        # Notifications flow again, with the token configured now.
        later = new_study(service.ehr)
        assert sandbox.notifier.flush(10)
        [job] = service.handle.store.jobs.claim_batch(MODEL, 10)
        assert job.study_resource["id"] == later["id"]
        # Started again with the Subscription running: nothing to resume, nothing said.
        caplog.clear()
        settings = service.handle.settings
        resume_arrivals(settings)
        assert "asked to resume" not in caplog.text and "no Subscription" not in caplog.text
    finally:
        sandbox.store.delete("Subscription", created["id"])


def test_a_full_queue_answers_503_with_retry_after_and_queues_nothing(service: Service) -> None:
    service.handle.store.jobs.max_queue = 1  # type: ignore[attr-defined]  # the adapter's limit
    first = new_study(service.ehr)
    body = {"fhirServer": service.ehr.fhir, "imagingStudy": f"ImagingStudy/{first['id']}"}
    assert service.api("POST", "/api/analyses", json=body).status_code == 201
    second = new_study(service.ehr)
    body["imagingStudy"] = f"ImagingStudy/{second['id']}"
    full = service.api("POST", "/api/analyses", json=body)
    assert full.status_code == 503 and "queue is full" in full.json()["error_description"]
    assert full.headers["Retry-After"].isdigit()
    assert service.handle.store.jobs.queue_depth(MODEL) == 1
