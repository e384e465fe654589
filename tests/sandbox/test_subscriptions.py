"""FHIR R4 rest-hook Subscriptions in the sandbox, over HTTP, with real local receivers."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from joserfc import jwt
from joserfc.jwk import ECKey
from werkzeug.serving import make_server

from ehr_sandbox.app import Sandbox, SandboxSettings, create_app
from ehr_sandbox.backend_auth import ASSERTION_TYPE
from ehr_sandbox.fhir.subscription import PAYLOAD_CONTENT_URL
from ehr_sandbox.notifier import DeliverySettings
from ehr_sandbox.seed import seed
from tests.conftest import free_port

FHIR_JSON = "application/fhir+json"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
SECRET = "s3cret-" + uuid.uuid4().hex
HEADERS = (f"Authorization: Bearer {SECRET}", "X-Subscriber: cxr-analysis")
SCOPE = "system/*.cruds"
# Short retry delays so that a failing endpoint is given up on within a test.
FAST = DeliverySettings(attempts=3, retry_delay_s=0.01, timeout_s=1.0)
POLL_S = 0.02  # servers notice shutdown() this quickly (the default half second adds up)


def serve(server: Any) -> Callable[[], None]:
    """Serve in a daemon thread; returns the function that stops the server."""
    threading.Thread(target=server.serve_forever, args=(POLL_S,), daemon=True).start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return stop


# ------------------------------------------------------------------ a subscriber's endpoint


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """An HTTP endpoint on loopback that records what it is sent and answers ``statuses``
    first (then 200); with ``hold`` set it answers only once the event is set."""

    def __init__(self, statuses: tuple[int, ...] = (), hold: threading.Event | None = None):
        self.received: list[Received] = []
        self.statuses = list(statuses)
        self.hold = hold
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver.record(self)

            do_PUT = do_POST

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self.stop = serve(server)

    def record(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        headers = {name.lower(): value for name, value in handler.headers.items()}
        with self._changed:
            self.received.append(Received(handler.command, handler.path, headers, body))
            status = self.statuses.pop(0) if self.statuses else 200
            self._changed.notify_all()
        if self.hold is not None:
            self.hold.wait(5)
        handler.send_response(status)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def wait_for(self, count: int, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: len(self.received) >= count, timeout)


@pytest.fixture
def receiver_factory() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def make(statuses: tuple[int, ...] = (), hold: threading.Event | None = None) -> Receiver:
        started.append(Receiver(statuses, hold))
        return started[-1]

    yield make
    for receiver in started:
        if receiver.hold is not None:
            receiver.hold.set()
        receiver.stop()


@pytest.fixture
def receiver(receiver_factory: Callable[..., Receiver]) -> Receiver:
    return receiver_factory()


# ------------------------------------------------------------------ the sandbox, over HTTP


@dataclass
class Ehr:
    base: str
    box: Sandbox
    token: str

    @property
    def fhir(self) -> str:
        return f"{self.base}/fhir"

    def auth(self, token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}", "Content-Type": FHIR_JSON}

    def post(self, path: str, body: Any, token: str | None = None) -> requests.Response:
        return requests.post(
            f"{self.fhir}/{path}", data=json.dumps(body), headers=self.auth(token), timeout=10
        )

    def put(self, resource: dict[str, Any]) -> requests.Response:
        url = f"{self.fhir}/{resource['resourceType']}/{resource['id']}"
        return requests.put(url, data=json.dumps(resource), headers=self.auth(None), timeout=10)

    def get(self, path: str, token: str | None = None) -> requests.Response:
        return requests.get(f"{self.fhir}/{path}", headers=self.auth(token), timeout=10)

    def create(self, resource: dict[str, Any]) -> dict[str, Any]:
        response = self.post(resource["resourceType"], resource)
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created

    def subscribe(self, endpoint: str, **options: Any) -> dict[str, Any]:
        created = self.create(subscription(endpoint, **options))
        assert created["status"] == "active"  # requested, and accepted at once
        return created

    def read(self, rtype: str, rid: str) -> dict[str, Any]:
        response = self.get(f"{rtype}/{rid}")
        assert response.status_code == 200, response.text
        found: dict[str, Any] = response.json()
        return found

    def flush(self) -> None:
        assert self.box.notifier.flush(5), "deliveries still running after 5 s"


@pytest.fixture
def ehr(tmp_path: Path) -> Iterator[Ehr]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    box = Sandbox.open(SandboxSettings(data_dir=tmp_path, base_url=base, delivery=FAST))
    stop = serve(make_server("127.0.0.1", port, create_app(sandbox=box), threaded=True))
    token = box.tokens.issue("cxr-subscriber", SCOPE).token
    yield Ehr(base, box, token)
    stop()
    box.close()


def subscription(
    endpoint: str,
    criteria: str = "ImagingStudy?modality=DX",
    payload: str | None = None,
    content: str | None = None,
    headers: tuple[str, ...] = HEADERS,
) -> dict[str, Any]:
    channel: dict[str, Any] = {"type": "rest-hook", "endpoint": endpoint, "header": list(headers)}
    if payload is not None:
        channel["payload"] = payload
    if content is not None:
        channel["_payload"] = {"extension": [{"url": PAYLOAD_CONTENT_URL, "valueCode": content}]}
    return {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "Analyse new chest films",
        "criteria": criteria,
        "channel": channel,
    }


def study(modality: str = "DX", patient: str = "p1") -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "status": "available",
        "subject": {"reference": f"Patient/{patient}"},
        "modality": [{"system": DCM, "code": modality}],
    }


def delivery_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("subscription-")]


def assert_outcome(response: requests.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    diagnostics = body["issue"][0]["diagnostics"]
    for word in words:
        assert word in diagnostics


# ------------------------------------------------------------------ payloads


def test_empty_notification_is_a_bodyless_post_with_the_headers(
    ehr: Ehr, receiver: Receiver
) -> None:
    ehr.subscribe(f"{receiver.url}/hooks/cxr")
    ehr.create(study())
    ehr.flush()
    assert len(receiver.received) == 1
    sent = receiver.received[0]
    assert (sent.method, sent.path, sent.body) == ("POST", "/hooks/cxr", b"")
    assert sent.headers["authorization"] == f"Bearer {SECRET}"
    assert sent.headers["x-subscriber"] == "cxr-analysis"
    assert "content-type" not in sent.headers
    # Nothing left running once the queue is empty.
    assert delivery_threads() == []


def test_id_only_notification_is_a_history_bundle_naming_the_study(
    ehr: Ehr, receiver: Receiver
) -> None:
    sub = ehr.subscribe(receiver.url, payload=FHIR_JSON, content="id-only")
    created = ehr.create(study())
    updated = ehr.put({**created, "description": "XR CHEST PA"})
    assert updated.status_code == 200
    ehr.flush()
    assert [r.method for r in receiver.received] == ["POST", "POST"]
    first, second = (r.json() for r in receiver.received)
    assert receiver.received[0].headers["content-type"] == FHIR_JSON
    assert receiver.received[0].headers["authorization"] == f"Bearer {SECRET}"
    for number, bundle in enumerate((first, second), start=1):
        assert bundle["resourceType"] == "Bundle" and bundle["type"] == "history"
        status = bundle["entry"][0]["resource"]
        assert status["resourceType"] == "Parameters"
        params = {p["name"]: p for p in status["parameter"]}
        assert params["subscription"]["valueReference"]["reference"] == (
            f"{ehr.fhir}/Subscription/{sub['id']}"
        )
        assert params["status"]["valueCode"] == "active"
        assert params["type"]["valueCode"] == "event-notification"
        assert params["events-since-subscription-start"]["valueString"] == str(number)
        focus = bundle["entry"][1]
        assert focus["fullUrl"] == f"{ehr.fhir}/ImagingStudy/{created['id']}"
        assert "resource" not in focus
    assert first["entry"][1]["request"] == {"method": "POST", "url": "ImagingStudy"}
    assert second["entry"][1]["request"] == {
        "method": "PUT",
        "url": f"ImagingStudy/{created['id']}",
    }


def test_full_resource_notification_puts_the_resource_under_the_endpoint(
    ehr: Ehr, receiver: Receiver
) -> None:
    ehr.subscribe(f"{receiver.url}/fhir/", payload=FHIR_JSON)
    created = ehr.create(study())
    assert ehr.put({**created, "description": "XR CHEST"}).status_code == 200
    ehr.flush()
    assert [(r.method, r.path) for r in receiver.received] == [
        ("PUT", f"/fhir/ImagingStudy/{created['id']}"),
        ("PUT", f"/fhir/ImagingStudy/{created['id']}"),
    ]
    versions = [r.json()["meta"]["versionId"] for r in receiver.received]
    assert versions == ["1", "2"]
    assert receiver.received[1].json()["description"] == "XR CHEST"
    assert receiver.received[0].headers["content-type"] == FHIR_JSON
    assert receiver.received[0].headers["authorization"] == f"Bearer {SECRET}"


def test_notifications_of_one_subscription_arrive_in_order(ehr: Ehr, receiver: Receiver) -> None:
    ehr.subscribe(receiver.url, payload=FHIR_JSON, content="id-only")
    ids = [ehr.create(study())["id"] for _ in range(5)]
    ehr.flush()
    bundles = [r.json() for r in receiver.received]
    assert [b["entry"][1]["fullUrl"].rsplit("/", 1)[1] for b in bundles] == ids
    numbers = [
        next(
            p["valueString"]
            for p in b["entry"][0]["resource"]["parameter"]
            if p["name"] == "events-since-subscription-start"
        )
        for b in bundles
    ]
    assert numbers == ["1", "2", "3", "4", "5"]


# ------------------------------------------------------------------ what matches


def test_only_matching_writes_notify(ehr: Ehr, receiver: Receiver) -> None:
    ehr.subscribe(receiver.url, criteria="ImagingStudy?modality=DX", payload=FHIR_JSON)
    ehr.create(study("CT"))
    ehr.create({"resourceType": "Patient", "name": [{"family": "Okafor"}]})
    ehr.flush()
    assert receiver.received == []
    dx = ehr.create(study("DX"))
    ehr.flush()
    assert [r.path for r in receiver.received] == [f"/ImagingStudy/{dx['id']}"]


def test_criteria_use_the_search_parameters(ehr: Ehr, receiver: Receiver) -> None:
    ehr.subscribe(receiver.url, criteria="ImagingStudy?modality=DX&patient=p2", payload=FHIR_JSON)
    ehr.create(study("DX", patient="p1"))
    mine = ehr.create(study("DX", patient="p2"))
    ehr.flush()
    assert [r.path for r in receiver.received] == [f"/ImagingStudy/{mine['id']}"]


def test_a_transaction_creating_two_studies_notifies_twice(ehr: Ehr, receiver: Receiver) -> None:
    ehr.subscribe(receiver.url, payload=FHIR_JSON, content="id-only")
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": study(),
                "request": {"method": "POST", "url": "ImagingStudy"},
            }
            for _ in range(2)
        ],
    }
    answer = ehr.post("", bundle)
    assert answer.status_code == 200, answer.text
    locations = {e["fullUrl"] for e in answer.json()["entry"]}
    ehr.flush()
    assert len(receiver.received) == 2
    assert {r.json()["entry"][1]["fullUrl"] for r in receiver.received} == locations


def test_a_rolled_back_transaction_notifies_nothing(ehr: Ehr, receiver: Receiver) -> None:
    ehr.subscribe(receiver.url)
    first = f"urn:uuid:{uuid.uuid4()}"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": first,
                "resource": study(),
                "request": {"method": "POST", "url": "ImagingStudy"},
            },
            {
                # Stored after the study (it points at it), and refused: no contentType.
                "resource": {"resourceType": "Binary", "securityContext": {"reference": first}},
                "request": {"method": "POST", "url": "Binary"},
            },
        ],
    }
    assert ehr.post("", bundle).status_code == 400
    ehr.flush()
    assert receiver.received == []
    assert ehr.box.store.count("ImagingStudy") == 0
    ehr.create(study())
    ehr.flush()
    assert len(receiver.received) == 1


def test_seeding_through_the_store_notifies(ehr: Ehr, receiver: Receiver) -> None:
    ehr.subscribe(receiver.url, criteria="ImagingStudy", payload=FHIR_JSON, content="id-only")
    studies = seed(ehr.box.store)
    ehr.flush()
    full_urls = {r.json()["entry"][1]["fullUrl"] for r in receiver.received}
    assert full_urls == {f"{ehr.fhir}/ImagingStudy/{s['id']}" for s in studies}
    assert len(receiver.received) == len(studies) == 3


# ------------------------------------------------------------------ failures and stopping


def test_a_failing_endpoint_is_retried_then_the_subscription_is_in_error(
    ehr: Ehr, receiver_factory: Callable[..., Receiver]
) -> None:
    receiver = receiver_factory(statuses=(503, 503, 503))
    sub = ehr.subscribe(receiver.url)
    failed = ehr.create(study())
    ehr.flush()
    assert len(receiver.received) == 3  # every attempt reached the endpoint
    stored = ehr.read("Subscription", sub["id"])
    assert stored["status"] == "error"
    assert "HTTP 503" in stored["error"] and f"ImagingStudy/{failed['id']}" in stored["error"]
    assert "3 attempts" in stored["error"] and SECRET not in stored["error"]
    # In error nothing more is sent ...
    ehr.create(study())
    ehr.flush()
    assert len(receiver.received) == 3
    # ... until its owner asks for it again; the next delivery works and clears the error.
    answer = ehr.put({**stored, "status": "requested"})
    assert answer.status_code == 200 and answer.json()["status"] == "active"
    ehr.create(study())
    ehr.flush()
    assert len(receiver.received) == 4
    healed = ehr.read("Subscription", sub["id"])
    assert healed["status"] == "active" and "error" not in healed


def test_an_unreachable_endpoint_ends_in_error_with_the_reason(ehr: Ehr) -> None:
    sub = ehr.subscribe(f"http://127.0.0.1:{free_port()}/hook")
    ehr.create(study())
    ehr.flush()
    stored = ehr.read("Subscription", sub["id"])
    assert stored["status"] == "error"
    assert "could not connect" in stored["error"] and SECRET not in stored["error"]


def test_off_and_deleted_subscriptions_stop_notifying(
    ehr: Ehr, receiver_factory: Callable[..., Receiver]
) -> None:
    turned_off, deleted, live = (receiver_factory() for _ in range(3))
    off_sub = ehr.subscribe(turned_off.url)
    gone_sub = ehr.subscribe(deleted.url)
    ehr.subscribe(live.url)
    assert ehr.put({**off_sub, "status": "off"}).json()["status"] == "off"
    gone = requests.delete(
        f"{ehr.fhir}/Subscription/{gone_sub['id']}", headers=ehr.auth(None), timeout=10
    )
    assert gone.status_code == 204
    ehr.create(study())
    ehr.flush()
    assert (len(turned_off.received), len(deleted.received), len(live.received)) == (0, 0, 1)


def test_a_slow_endpoint_does_not_hold_back_other_subscriptions(
    ehr: Ehr, receiver_factory: Callable[..., Receiver]
) -> None:
    release = threading.Event()
    slow = receiver_factory(hold=release)
    fast = receiver_factory()
    ehr.subscribe(slow.url)
    ehr.subscribe(fast.url)
    started = time.monotonic()
    ehr.create(study())
    assert time.monotonic() - started < 0.9  # the write did not wait for the slow endpoint
    assert slow.wait_for(1, timeout=2)
    assert fast.wait_for(1, timeout=0.9)  # while the slow one is still being answered
    release.set()
    ehr.flush()


def test_close_stops_the_delivery_threads(ehr: Ehr, receiver: Receiver) -> None:
    ehr.subscribe(receiver.url)
    ehr.create(study())
    ehr.box.close()
    assert delivery_threads() == []
    received = len(receiver.received)
    ehr.box.store.create(study())  # a write after close() is not announced
    time.sleep(0.05)
    assert len(receiver.received) == received and delivery_threads() == []


# ------------------------------------------------------------------ the Subscription resource


def rest_hook(**channel: Any) -> dict[str, Any]:
    return {"channel": {"type": "rest-hook", "endpoint": "http://x.test/hook", **channel}}


# What is changed in a good Subscription, and words the OperationOutcome must hold.
REFUSED: dict[str, tuple[dict[str, Any], list[str]]] = {
    "websocket channel": (rest_hook(type="websocket"), ["websocket", "rest-hook"]),
    "unknown status": ({"status": "paused"}, ["status", "requested"]),
    "type without search parameters": (
        {"criteria": "Appointment?status=booked"},
        ["Appointment", "ImagingStudy"],
    ),
    "subscription on subscriptions": ({"criteria": "Subscription?status=active"}, ["Subscription"]),
    "unknown parameter": ({"criteria": "ImagingStudy?colour=blue"}, ["colour"]),
    "paging parameter": ({"criteria": "ImagingStudy?modality=DX&_count=1"}, ["_count"]),
    "absolute criteria": ({"criteria": "http://ehr.test/fhir/ImagingStudy"}, ["relative"]),
    "ftp endpoint": (rest_hook(endpoint="ftp://x.test/in"), ["http(s)"]),
    "header without a name": (rest_hook(header=["Bearer x"]), ["header[0]"]),
    "header smuggling a line": (rest_hook(header=["X-A: a\nX-B: b"]), ["header[0]"]),
    "header the server sets": (rest_hook(header=["Host: other.test"]), ["Host"]),
    "xml payload": (rest_hook(payload="text/xml"), [FHIR_JSON]),
    "unknown payload content": (
        rest_hook(
            payload=FHIR_JSON,
            _payload={"extension": [{"url": PAYLOAD_CONTENT_URL, "valueCode": "everything"}]},
        ),
        ["everything", "id-only"],
    ),
}


@pytest.mark.parametrize(("change", "words"), REFUSED.values(), ids=REFUSED.keys())
def test_unacceptable_subscriptions_are_refused(
    ehr: Ehr, change: dict[str, Any], words: list[str]
) -> None:
    resource = {**subscription("http://127.0.0.1:9/hook"), **change}
    assert_outcome(ehr.post("Subscription", resource), 400, *words)


def test_an_update_is_checked_too(ehr: Ehr, receiver: Receiver) -> None:
    sub = ehr.subscribe(receiver.url)
    changed = {**sub, "channel": {**sub["channel"], "type": "email"}}
    assert_outcome(ehr.put(changed), 400, "email", "rest-hook")
    assert ehr.read("Subscription", sub["id"])["channel"]["type"] == "rest-hook"


def test_subscriptions_are_searchable_by_status_and_criteria(ehr: Ehr, receiver: Receiver) -> None:
    dx = ehr.subscribe(receiver.url, criteria="ImagingStudy?modality=DX")
    off = ehr.subscribe(receiver.url, criteria="DiagnosticReport")
    ehr.put({**off, "status": "off"})

    def ids(query: str) -> set[str]:
        response = ehr.get(f"Subscription?{query}")
        assert response.status_code == 200, response.text
        return {e["resource"]["id"] for e in response.json().get("entry", [])}

    assert ids("status=active") == {dx["id"]}
    assert ids("criteria=ImagingStudy") == {dx["id"]}
    assert ids("status=off&criteria=DiagnosticReport") == {off["id"]}
    assert ids("type=rest-hook") == {dx["id"], off["id"]}


def test_metadata_lists_subscription_with_the_rest_hook_channel(ehr: Ehr) -> None:
    cap = requests.get(f"{ehr.fhir}/metadata", timeout=10).json()
    by_type = {r["type"]: r for r in cap["rest"][0]["resource"]}
    entry = by_type["Subscription"]
    assert "rest-hook" in entry["documentation"]
    assert {"create", "read", "update", "delete", "search-type"} <= {
        i["code"] for i in entry["interaction"]
    }
    assert {"status", "criteria", "type", "url"} <= {p["name"] for p in entry["searchParam"]}


# ------------------------------------------------------------------ who may subscribe


def test_subscriptions_need_a_token_and_a_user_or_system_scope(
    ehr: Ehr, receiver: Receiver
) -> None:
    sub = ehr.subscribe(receiver.url)
    # Open access serves anonymous reads, but not of Subscriptions (their headers hold secrets).
    assert requests.get(f"{ehr.fhir}/ImagingStudy", timeout=10).status_code == 200
    for path in ("Subscription", f"Subscription/{sub['id']}", f"Subscription/{sub['id']}/_history"):
        assert requests.get(f"{ehr.fhir}/{path}", timeout=10).status_code == 401
    anonymous_search = requests.post(f"{ehr.fhir}/Subscription/_search", timeout=10)
    assert anonymous_search.status_code == 401
    # A patient's token cannot watch everybody's records.
    patient = ehr.box.tokens.issue("patient-app", "patient/*.cruds", "p1").token
    refused = ehr.post("Subscription", subscription(receiver.url), token=patient)
    assert_outcome(refused, 403, "user/ or system/")
    assert ehr.get(f"Subscription/{sub['id']}", token=patient).status_code == 403
    # Nor can a token without a Subscription scope.
    reader = ehr.box.tokens.issue("reader", "system/ImagingStudy.rs").token
    assert ehr.post("Subscription", subscription(receiver.url), token=reader).status_code == 403


def test_a_backend_services_client_subscribes_with_a_system_scope(
    ehr: Ehr, receiver: Receiver
) -> None:
    key = ECKey.generate_key("P-384", auto_kid=True)
    public = {**key.as_dict(private=False), "kid": key.kid}
    ehr.box.backend.register("cxr-analysis", {"keys": [public]}, "system/Subscription.crus")
    token_url = f"{ehr.base}/auth/token"
    now = int(time.time())
    claims = {
        "iss": "cxr-analysis",
        "sub": "cxr-analysis",
        "aud": token_url,
        "exp": now + 240,
        "iat": now,
        "jti": str(uuid.uuid4()),
    }
    header = {"alg": "ES384", "kid": key.kid, "typ": "JWT"}
    assertion = jwt.encode(header, claims, key, algorithms=["ES384"])
    answer = requests.post(
        token_url,
        data={
            "grant_type": "client_credentials",
            "scope": "system/Subscription.crus",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        },
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    token = answer.json()["access_token"]
    created = ehr.post("Subscription", subscription(receiver.url), token=token)
    assert created.status_code == 201, created.text
    assert ehr.get(f"Subscription/{created.json()['id']}", token=token).status_code == 200
    # The scope covers Subscriptions only: no deleting them, no writing studies.
    gone = requests.delete(
        f"{ehr.fhir}/Subscription/{created.json()['id']}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert gone.status_code == 403
    assert ehr.post("ImagingStudy", study(), token=token).status_code == 403
    ehr.create(study())
    ehr.flush()
    assert len(receiver.received) == 1
