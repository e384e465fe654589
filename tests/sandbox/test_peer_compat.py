"""What the real CDS Hooks sandbox and SMART launcher need from the EHR sandbox on the wire
(../shared/peers/README.md): CORS on the FHIR API, the HSPC launch-context API
`POST {fhir}/_services/smart/Launch`, `GET [type]/` with a trailing slash (and the launcher's
base-less `/Encounter/`), and absolute URLs built from the base a request came to.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests
from flask.testing import FlaskClient
from werkzeug.serving import make_server
from werkzeug.test import TestResponse

from ehr_sandbox.app import SANDBOX_CLIENT_ID, Sandbox, SandboxSettings, create_app
from ehr_sandbox.auth.smart_store import SmartApp
from ehr_sandbox.seed import seed

ORIGIN = "https://sandbox.cds-hooks.org"
CLIENT = "peer-compat-app"
OTHER_CLIENT = "peer-compat-other-app"
LAUNCH_URL = "http://127.0.0.1:9/app/launch"  # never contacted: the tests read redirects
REDIRECT = "http://127.0.0.1:9/app/callback"
SCOPE = "launch openid patient/Patient.rs patient/ImagingStudy.rs patient/Encounter.rs"
PATIENT = "cxr-demo-1"
VERIFIER = "v" * 50
LOCAL = "http://localhost"  # the Flask test client's base


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def open_sandbox(data_dir: Path, **settings: Any) -> Sandbox:
    box = Sandbox.open(SandboxSettings(data_dir=data_dir, **settings))
    seed(box.store)
    for client_id, launch_url in ((CLIENT, LAUNCH_URL), (OTHER_CLIENT, "http://other.test/go")):
        box.smart.register_app(
            SmartApp(client_id, client_id, (REDIRECT,), launch_url, f"{SCOPE} launch/patient")
        )
    box.store.update(
        {
            "resourceType": "Encounter",
            "id": "enc-demo-1",
            "status": "finished",
            "class": {"code": "AMB"},
            "subject": {"reference": f"Patient/{PATIENT}"},
            "period": {"start": "2024-05-01T10:00:00Z"},
        }
    )
    box.store.update(
        {
            "resourceType": "Encounter",
            "id": "enc-demo-2",
            "status": "finished",
            "class": {"code": "AMB"},
            "subject": {"reference": "Patient/cxr-demo-2"},
            "period": {"start": "2024-06-01T10:00:00Z"},
        }
    )
    return box


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Sandbox]:
    """A sandbox whose URLs follow each request (its own address set for Backend Services)."""
    sandbox = open_sandbox(tmp_path, address="http://127.0.0.1:8081")
    yield sandbox
    sandbox.close()


@pytest.fixture
def client(box: Sandbox) -> FlaskClient:
    return create_app(sandbox=box).test_client()


def preflight(client: FlaskClient, path: str, method: str = "GET", **headers: str) -> TestResponse:
    return client.options(
        path,
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization,content-type",
            **headers,
        },
    )


def listed(value: str | None) -> set[str]:
    return {item.strip().lower() for item in (value or "").split(",") if item.strip()}


def assert_cors(response: TestResponse) -> None:
    assert response.headers.get("Access-Control-Allow-Origin") in ("*", ORIGIN)
    if response.headers["Access-Control-Allow-Origin"] == ORIGIN:
        assert "origin" in listed(response.headers.get("Vary"))
    # A `*` answer is only readable by requests without credentials: none is invited.
    assert response.headers.get("Access-Control-Allow-Credentials") is None
    exposed = listed(response.headers.get("Access-Control-Expose-Headers"))
    assert {"location", "etag", "content-location", "last-modified"} <= exposed


# ------------------------------------------------------------------------------------- CORS


@pytest.mark.parametrize(
    ("path", "method"),
    [
        ("/fhir/metadata", "GET"),
        ("/fhir/.well-known/smart-configuration", "GET"),
        ("/fhir/Patient", "POST"),
        ("/fhir/Patient/_search", "POST"),
        (f"/fhir/Patient/{PATIENT}", "PUT"),
        ("/fhir/DiagnosticReport/x/_history/1", "GET"),
        ("/fhir/_services/smart/Launch", "POST"),
        ("/fhir", "POST"),
        ("/auth/token", "POST"),
    ],
)
def test_preflight_is_answered_without_a_token(client: FlaskClient, path: str, method: str) -> None:
    answer = preflight(client, path, method)
    assert answer.status_code == 204 and answer.data == b""
    assert_cors(answer)
    assert {"get", "post", "put", "delete", "patch", "options"} <= listed(
        answer.headers.get("Access-Control-Allow-Methods")
    )
    allowed = listed(answer.headers.get("Access-Control-Allow-Headers"))
    assert {
        "authorization",
        "content-type",
        "accept",
        "if-none-exist",
        "if-match",
        "prefer",
    } <= allowed
    assert int(answer.headers["Access-Control-Max-Age"]) > 0


def test_preflight_passes_a_closed_sandbox_too(tmp_path: Path) -> None:
    closed = open_sandbox(tmp_path, address="http://127.0.0.1:8081", open_access=False)
    try:
        client = create_app(sandbox=closed).test_client()
        assert client.get("/fhir/Patient").status_code == 401  # closed: reads need a token
        answer = preflight(client, "/fhir/Patient")
        assert answer.status_code == 204
        assert_cors(answer)
    finally:
        closed.close()


def test_preflight_from_a_public_page_may_reach_the_loopback_sandbox(client: FlaskClient) -> None:
    # Chromium's Private Network Access preflight (https page -> loopback server).
    answer = preflight(
        client, "/fhir/metadata", **{"Access-Control-Request-Private-Network": "true"}
    )
    assert answer.status_code == 204
    assert answer.headers.get("Access-Control-Allow-Private-Network") == "true"
    assert (
        preflight(client, "/fhir/metadata").headers.get("Access-Control-Allow-Private-Network")
        is None
    )


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/fhir/metadata", 200),
        ("GET", "/fhir/.well-known/smart-configuration", 200),
        ("GET", f"/fhir/Patient/{PATIENT}", 200),
        ("GET", "/fhir/Patient/no-such-patient", 404),
        ("GET", "/fhir/NoSuchEndpoint/x/y/z", 404),
        ("POST", "/fhir/Patient", 401),  # writes need a token, and the page must read why
        ("GET", "/fhir/Subscription", 401),
        ("POST", "/fhir/_services/smart/Launch", 400),
    ],
)
def test_answers_and_errors_carry_cors_headers(
    client: FlaskClient, method: str, path: str, status: int
) -> None:
    answer = client.open(path, method=method, headers={"Origin": ORIGIN})
    assert answer.status_code == status
    assert_cors(answer)
    if status >= 400:
        assert answer.get_json(force=True)["resourceType"] == "OperationOutcome"


def test_created_resource_exposes_location_and_etag(box: Sandbox, client: FlaskClient) -> None:
    token = box.tokens.issue(SANDBOX_CLIENT_ID, "user/Patient.cruds").token
    made = client.post(
        "/fhir/Patient",
        data=json.dumps({"resourceType": "Patient"}),
        headers={
            "Origin": ORIGIN,
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/fhir+json",
        },
    )
    assert made.status_code == 201
    assert made.headers["Location"] and made.headers["ETag"]
    assert_cors(made)


def test_pages_outside_the_api_get_no_cors(client: FlaskClient) -> None:
    # The sign-in page and the EHR launch page are navigated to, never fetched by scripts.
    assert client.get("/ehr/launch").headers.get("Access-Control-Allow-Origin") is None
    answer = client.options("/ehr/launch", headers={"Origin": ORIGIN})
    assert answer.headers.get("Access-Control-Allow-Origin") is None


# ---------------------------------------------------------------- launch-context API


def post_launch(client: FlaskClient, body: Any, **headers: str) -> TestResponse:
    return client.post(
        "/fhir/_services/smart/Launch",
        data=json.dumps(body),
        headers={"Origin": ORIGIN, "Content-Type": "application/json", **headers},
    )


def cds_sandbox_launch(client: FlaskClient, **parameters: Any) -> TestResponse:
    """What the CDS Hooks sandbox sends for a card's SMART link (launch-context-retrieval.js)."""
    params = {"patient": PATIENT, "smart_messaging_origin": ORIGIN, **parameters}
    return post_launch(client, {"launchUrl": LAUNCH_URL, "parameters": params})


def authorize(client: FlaskClient, launch: str, client_id: str = CLIENT) -> TestResponse:
    query = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": REDIRECT,
        "scope": SCOPE,
        "state": secrets.token_urlsafe(16),
        "aud": f"{LOCAL}/fhir",  # the card link's iss: the FHIR base the sandbox was given
        "launch": launch,
        "code_challenge": s256(VERIFIER),
        "code_challenge_method": "S256",
    }
    return client.get(f"/auth/authorize?{urlencode(query)}")


def token_for(client: FlaskClient, launch: str) -> dict[str, Any]:
    redirected = authorize(client, launch)
    assert redirected.status_code == 302, redirected.get_data(as_text=True)
    location = redirected.headers["Location"]
    assert location.startswith(REDIRECT)
    code = parse_qs(urlsplit(location).query)["code"][0]
    answer = client.post(
        "/auth/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": CLIENT,
            "code_verifier": VERIFIER,
        },
    )
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return dict(answer.get_json())


def test_card_link_launch_id_opens_the_app_on_the_patient(client: FlaskClient) -> None:
    app_context = json.dumps({"imagingStudy": "ImagingStudy/cxr-nih-00000002"})
    answer = cds_sandbox_launch(client, appContext=app_context, encounter="enc-demo-1")
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert_cors(answer)
    body = answer.get_json()
    assert set(body) == {"launch_id"} and isinstance(body["launch_id"], str)
    assert len(body["launch_id"]) >= 22  # unguessable
    assert answer.headers["Cache-Control"] == "no-store"
    token = token_for(client, body["launch_id"])
    assert token["patient"] == PATIENT
    assert token["encounter"] == "enc-demo-1"
    assert token["appContext"] == app_context
    assert "patient/ImagingStudy.rs" in token["scope"].split()
    # The token reads the patient's chart.
    chart = client.get(
        f"/fhir/Patient/{PATIENT}", headers={"Authorization": f"Bearer {token['access_token']}"}
    )
    assert chart.status_code == 200


def test_launch_url_matches_without_its_query_string(client: FlaskClient) -> None:
    answer = post_launch(
        client, {"launchUrl": f"{LAUNCH_URL}/?from=card", "parameters": {"patient": PATIENT}}
    )
    assert answer.status_code == 200
    assert token_for(client, answer.get_json()["launch_id"])["patient"] == PATIENT


def test_launch_patient_may_be_a_reference(client: FlaskClient) -> None:
    answer = cds_sandbox_launch(client, patient=f"Patient/{PATIENT}")
    assert answer.status_code == 200
    assert token_for(client, answer.get_json()["launch_id"])["patient"] == PATIENT


def test_launch_id_works_only_for_the_app_at_that_launch_url(client: FlaskClient) -> None:
    launch = cds_sandbox_launch(client).get_json()["launch_id"]
    refused = authorize(client, launch, client_id=OTHER_CLIENT)
    assert refused.status_code == 400 and "Launch expired or unknown" in refused.get_data(
        as_text=True
    )
    forged = authorize(client, "not-a-launch-id")
    assert forged.status_code == 400


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (["not", "an", "object"], 400),
        ({"parameters": {"patient": PATIENT}}, 400),  # no launchUrl
        ({"launchUrl": LAUNCH_URL}, 400),  # no patient
        ({"launchUrl": LAUNCH_URL, "parameters": {"patient": "nobody"}}, 404),
        ({"launchUrl": "http://unknown.test/launch", "parameters": {"patient": PATIENT}}, 404),
        (  # another patient's encounter
            {
                "launchUrl": LAUNCH_URL,
                "parameters": {"patient": PATIENT, "encounter": "enc-demo-2"},
            },
            404,
        ),
        ({"launchUrl": LAUNCH_URL, "parameters": "patient=x"}, 400),
    ],
)
def test_launch_refusals_are_operation_outcomes(
    client: FlaskClient, body: Any, status: int
) -> None:
    answer = post_launch(client, body)
    assert answer.status_code == status
    assert answer.get_json(force=True)["resourceType"] == "OperationOutcome"
    assert "launch_id" not in answer.get_data(as_text=True)
    assert_cors(answer)


def test_launch_with_tokens(box: Sandbox, client: FlaskClient) -> None:
    bad = cds_sandbox_launch_with(client, "Bearer not-a-token")
    assert bad.status_code == 401
    assert_cors(bad)
    own = box.tokens.issue(SANDBOX_CLIENT_ID, "patient/Patient.rs", PATIENT).token
    assert cds_sandbox_launch_with(client, f"Bearer {own}").status_code == 200
    other = box.tokens.issue(SANDBOX_CLIENT_ID, "patient/Patient.rs", "cxr-demo-2").token
    assert cds_sandbox_launch_with(client, f"Bearer {other}").status_code == 403


def cds_sandbox_launch_with(client: FlaskClient, authorization: str) -> TestResponse:
    body = {"launchUrl": LAUNCH_URL, "parameters": {"patient": PATIENT}}
    return post_launch(client, body, Authorization=authorization)


def test_closed_sandbox_launch_needs_a_token(tmp_path: Path) -> None:
    closed = open_sandbox(tmp_path, address="http://127.0.0.1:8081", open_access=False)
    try:
        client = create_app(sandbox=closed).test_client()
        assert cds_sandbox_launch(client).status_code == 401
        token = closed.tokens.issue(SANDBOX_CLIENT_ID, "user/Patient.rs").token
        assert cds_sandbox_launch_with(client, f"Bearer {token}").status_code == 200
    finally:
        closed.close()


# ------------------------------------------------------------------- trailing slash


def comparable(bundle: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in bundle.items() if k not in ("id", "meta")}


def test_type_search_with_a_trailing_slash_is_the_same_search(client: FlaskClient) -> None:
    query = f"_count=1&_sort:desc=date&patient={PATIENT}"
    plain = client.get(f"/fhir/Encounter?{query}")
    slashed = client.get(f"/fhir/Encounter/?{query}")
    assert plain.status_code == slashed.status_code == 200
    assert comparable(slashed.get_json(force=True)) == comparable(plain.get_json(force=True))
    bundle = slashed.get_json(force=True)
    assert [e["resource"]["id"] for e in bundle["entry"]] == ["enc-demo-1"]
    everyone = client.get("/fhir/Patient/").get_json(force=True)
    assert everyone["resourceType"] == "Bundle" and everyone["total"] >= 3


def test_the_launchers_base_less_encounter_query_reaches_the_fhir_api(
    client: FlaskClient,
) -> None:
    # new URL("/Encounter/?_count=1&_sort:desc=date", "http://127.0.0.1:8081/fhir") drops /fhir
    answer = client.get(f"/Encounter/?_count=1&_sort:desc=date&patient={PATIENT}")
    assert answer.status_code == 307
    assert answer.headers["Location"] == (
        f"/fhir/Encounter/?_count=1&_sort:desc=date&patient={PATIENT}"
    )
    followed = client.get(
        f"/Encounter/?_count=1&_sort:desc=date&patient={PATIENT}", follow_redirects=True
    )
    assert followed.get_json(force=True)["entry"][0]["resource"]["id"] == "enc-demo-1"
    assert client.get("/favicon.ico").status_code == 404  # only resource-type names move


# ----------------------------------------------------------------- request-based URLs


def test_urls_follow_the_host_the_request_came_to(box: Sandbox, client: FlaskClient) -> None:
    base = "http://launcher-upstream.test:9999"
    host = {"Host": "launcher-upstream.test:9999"}
    bundle = client.get(f"/fhir/Patient?_id={PATIENT}", headers=host).get_json(force=True)
    assert bundle["entry"][0]["fullUrl"] == f"{base}/fhir/Patient/{PATIENT}"
    assert all(link["url"].startswith(f"{base}/fhir/Patient?") for link in bundle["link"])
    token = box.tokens.issue(SANDBOX_CLIENT_ID, "user/Patient.cruds").token
    made = client.post(
        "/fhir/Patient",
        data=json.dumps({"resourceType": "Patient"}),
        headers={**host, "Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert made.headers["Location"].startswith(f"{base}/fhir/Patient/")
    cap = client.get("/fhir/metadata", headers=host).get_json(force=True)
    assert cap["implementation"]["url"] == f"{base}/fhir"
    oauth = {
        e["url"]: e["valueUri"] for e in cap["rest"][0]["security"]["extension"][0]["extension"]
    }
    config = client.get("/fhir/.well-known/smart-configuration", headers=host).get_json()
    assert oauth["authorize"] == config["authorization_endpoint"] == f"{base}/auth/authorize"
    assert oauth["token"] == config["token_endpoint"] == f"{base}/auth/token"
    launched = client.get(f"/ehr/launch?app={CLIENT}&patient={PATIENT}", headers=host)
    iss = parse_qs(urlsplit(launched.headers["Location"]).query)["iss"][0]
    assert iss == f"{base}/fhir"
    # Another host:port, other URLs: nothing is remembered from the first request.
    other = client.get(f"/fhir/Patient?_id={PATIENT}", headers={"Host": "127.0.0.1:8081"})
    assert other.get_json(force=True)["entry"][0]["fullUrl"].startswith("http://127.0.0.1:8081/")


def test_a_configured_base_url_wins_over_host(tmp_path: Path) -> None:
    fixed = open_sandbox(tmp_path, base_url="https://ehr.example")
    try:
        client = create_app(sandbox=fixed).test_client()
        host = {"Host": "launcher-upstream.test:9999"}
        bundle = client.get(f"/fhir/Patient?_id={PATIENT}", headers=host).get_json(force=True)
        assert bundle["entry"][0]["fullUrl"] == f"https://ehr.example/fhir/Patient/{PATIENT}"
        config = client.get("/fhir/.well-known/smart-configuration", headers=host).get_json()
        assert config["token_endpoint"] == "https://ehr.example/auth/token"
        cap = client.get("/fhir/metadata", headers=host).get_json(force=True)
        assert cap["implementation"]["url"] == "https://ehr.example/fhir"
    finally:
        fixed.close()


def test_backend_services_audience_never_comes_from_host(tmp_path: Path) -> None:
    # Without an own address the token endpoint cannot check an assertion's aud at all...
    anywhere = open_sandbox(tmp_path / "a")
    try:
        answer = (
            create_app(sandbox=anywhere)
            .test_client()
            .post("/auth/token", data={"grant_type": "client_credentials"})
        )
        assert answer.status_code == 503
    finally:
        anywhere.close()
    # ... with one (and URLs that follow the request), it checks the request normally.
    addressed = open_sandbox(tmp_path / "b", address="http://127.0.0.1:8081")
    try:
        answer = (
            create_app(sandbox=addressed)
            .test_client()
            .post("/auth/token", data={"grant_type": "client_credentials"})
        )
        assert answer.status_code in (400, 401)
        assert answer.get_json()["error"] in ("invalid_request", "invalid_client")
    finally:
        addressed.close()


def test_over_a_real_socket_a_proxied_request_gets_its_own_host(tmp_path: Path) -> None:
    """The launcher forwards with fetch(upstream URL): the Host names the upstream as it was
    given, e.g. localhost:PORT while the sandbox listens on 127.0.0.1:PORT."""
    sandbox = open_sandbox(tmp_path, address="http://127.0.0.1:8081")
    server = make_server("127.0.0.1", 0, create_app(sandbox=sandbox), threaded=True)
    port = server.server_port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for spelling in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
            answer = requests.get(
                f"http://127.0.0.1:{port}/fhir/Patient/",
                params={"_id": PATIENT},
                headers={"Host": urlsplit(spelling).netloc, "Origin": ORIGIN},
                timeout=10,
            )
            assert answer.status_code == 200
            assert answer.headers["Access-Control-Allow-Origin"] in ("*", ORIGIN)
            assert answer.json()["entry"][0]["fullUrl"] == f"{spelling}/fhir/Patient/{PATIENT}"
        preflight_answer = requests.options(
            f"http://127.0.0.1:{port}/fhir/Patient/_search",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
            timeout=10,
        )
        assert preflight_answer.status_code == 204
    finally:
        server.shutdown()
        server.server_close()
        sandbox.close()
