"""The sandbox's SMART authorization server and FHIR access policy, driven over HTTP."""

from __future__ import annotations

import base64
import hashlib
import secrets
import socket
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests

from ehr_sandbox.auth.compartment import PatientCompartment
from ehr_sandbox.auth.smart_store import LaunchContext, SmartApp
from tests.conftest import SandboxHandle

CLIENT = "auth-server-test-app"
REDIRECT = "http://127.0.0.1:9/app/callback"  # never contacted: the tests read the redirect
SCOPE = (
    "launch offline_access patient/Patient.rs patient/ImagingStudy.rs patient/Media.rs "
    "patient/Binary.r patient/DiagnosticReport.cruds"
)


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@pytest.fixture(scope="module")
def ehr(sandbox: SandboxHandle) -> SandboxHandle:
    sandbox.sandbox.smart.register_app(
        SmartApp(
            client_id=CLIENT,
            name="Auth server test app",
            redirect_uris=(REDIRECT,),
            launch_url="http://127.0.0.1:9/app/launch",
            scope=f"launch/patient online_access patient/Patient.read {SCOPE}",
        )
    )
    return sandbox


def launch_id(ehr: SandboxHandle, patient: str = "cxr-demo-1", study: str | None = None) -> str:
    context = LaunchContext(
        user="Practitioner/sandbox-clinician",
        patient=patient,
        fhir_context=[{"reference": f"ImagingStudy/{study}"}] if study else [],
    )
    return ehr.sandbox.smart.create_launch(CLIENT, context)


def authorize(ehr: SandboxHandle, **overrides: Any) -> requests.Response:
    verifier = overrides.pop("verifier", "v" * 50)
    params: dict[str, Any] = {
        "response_type": "code",
        "client_id": CLIENT,
        "redirect_uri": REDIRECT,
        "scope": SCOPE,
        "state": secrets.token_urlsafe(16),
        "aud": ehr.fhir,
        "launch": launch_id(ehr, study="cxr-nih-00000002"),
        "code_challenge": s256(verifier),
        "code_challenge_method": "S256",
    }
    params.update(overrides)
    params = {k: v for k, v in params.items() if v is not None}
    return requests.get(
        f"{ehr.base}/auth/authorize?{urlencode(params)}", allow_redirects=False, timeout=10
    )


def redirect_params(response: requests.Response) -> dict[str, str]:
    assert response.status_code == 302, response.text
    location = response.headers["Location"]
    assert location.startswith(REDIRECT)
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def token(ehr: SandboxHandle, **form: str) -> requests.Response:
    return requests.post(f"{ehr.base}/auth/token", data=form, timeout=10)


def code_for(ehr: SandboxHandle, verifier: str = "v" * 50, **overrides: Any) -> str:
    return redirect_params(authorize(ehr, verifier=verifier, **overrides))["code"]


def exchange(ehr: SandboxHandle, code: str, verifier: str = "v" * 50) -> requests.Response:
    return token(
        ehr,
        grant_type="authorization_code",
        code=code,
        redirect_uri=REDIRECT,
        client_id=CLIENT,
        code_verifier=verifier,
    )


def test_smart_configuration_and_capability_statement(ehr: SandboxHandle) -> None:
    config = requests.get(f"{ehr.fhir}/.well-known/smart-configuration", timeout=10).json()
    assert config["authorization_endpoint"] == f"{ehr.base}/auth/authorize"
    assert config["token_endpoint"] == f"{ehr.base}/auth/token"
    assert config["code_challenge_methods_supported"] == ["S256"]
    assert {"launch-ehr", "launch-standalone", "client-public", "permission-v2"} <= set(
        config["capabilities"]
    )
    # /metadata answers FHIR JSON even to a client that sends no Accept header at all.
    host, port = ehr.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET /fhir/metadata HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0] and b"application/fhir+json" in head
    security = requests.models.complexjson.loads(body)["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    uris = {e["url"]: e["valueUri"] for e in security["extension"][0]["extension"]}
    assert uris == {
        "authorize": config["authorization_endpoint"],
        "token": config["token_endpoint"],
    }


def test_ehr_launch_token_carries_launch_context_and_refresh(ehr: SandboxHandle) -> None:
    answer = exchange(ehr, code_for(ehr))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["token_type"].lower() == "bearer" and body["expires_in"] > 0
    assert body["patient"] == "cxr-demo-1"
    assert body["fhirContext"] == [{"reference": "ImagingStudy/cxr-nih-00000002"}]
    assert body["need_patient_banner"] is True
    assert "patient/ImagingStudy.rs" in body["scope"].split()
    assert answer.headers["Cache-Control"] == "no-store"
    refreshed = token(
        ehr, grant_type="refresh_token", refresh_token=body["refresh_token"], client_id=CLIENT
    )
    assert refreshed.status_code == 200, refreshed.text
    new = refreshed.json()
    assert new["access_token"] != body["access_token"] and new["patient"] == "cxr-demo-1"
    assert new["refresh_token"] != body["refresh_token"]
    # The old refresh token was rotated out.
    again = token(
        ehr, grant_type="refresh_token", refresh_token=body["refresh_token"], client_id=CLIENT
    )
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    fhir = requests.get(
        f"{ehr.fhir}/Patient/cxr-demo-1",
        headers={"Authorization": f"Bearer {new['access_token']}"},
        timeout=10,
    )
    assert fhir.status_code == 200


def test_pkce_is_required_and_plain_is_refused(ehr: SandboxHandle) -> None:
    plain = redirect_params(authorize(ehr, code_challenge="p" * 50, code_challenge_method="plain"))
    assert plain["error"] == "invalid_request" and "S256" in plain["error_description"]
    missing = redirect_params(authorize(ehr, code_challenge=None, code_challenge_method=None))
    assert missing["error"] == "invalid_request" and "PKCE" in missing["error_description"]
    no_method = redirect_params(authorize(ehr, code_challenge_method=None))
    assert no_method["error"] == "invalid_request"


def test_wrong_code_verifier_is_refused(ehr: SandboxHandle) -> None:
    code = code_for(ehr, verifier="a" * 60)
    wrong = exchange(ehr, code, verifier="b" * 60)
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
    missing = token(
        ehr,
        grant_type="authorization_code",
        code=code_for(ehr),
        redirect_uri=REDIRECT,
        client_id=CLIENT,
    )
    assert missing.status_code == 400 and missing.json()["error"] == "invalid_request"


def test_code_is_single_use_and_a_replay_revokes_its_tokens(ehr: SandboxHandle) -> None:
    code = code_for(ehr)
    first = exchange(ehr, code)
    assert first.status_code == 200
    bearer = first.json()["access_token"]
    assert get(ehr, "Patient/cxr-demo-1", bearer).status_code == 200
    replay = exchange(ehr, code)
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"
    # The code leaked: the tokens it was exchanged for no longer work.
    assert get(ehr, "Patient/cxr-demo-1", bearer).status_code == 401
    refreshed = token(
        ehr,
        grant_type="refresh_token",
        refresh_token=first.json()["refresh_token"],
        client_id=CLIENT,
    )
    assert refreshed.status_code == 400


def test_wrong_aud_is_refused_with_a_page(ehr: SandboxHandle) -> None:
    answer = authorize(ehr, aud="http://127.0.0.1:9/fhir")
    assert answer.status_code == 400 and "Location" not in answer.headers
    assert "aud" in answer.text and "No token was issued" in answer.text


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"client_id": "unknown-app"}, "invalid_client"),
        ({"redirect_uri": "https://evil.example/cb"}, "redirect"),
        ({"launch": "no-such-launch"}, "Launch expired or unknown"),
    ],
)
def test_bad_clients_redirects_and_launches_get_a_page(
    ehr: SandboxHandle, overrides: dict[str, str], words: str
) -> None:
    answer = authorize(ehr, **overrides)
    assert answer.status_code == 400 and "Location" not in answer.headers
    assert words.lower() in answer.text.lower()


def test_token_endpoint_errors(ehr: SandboxHandle) -> None:
    unknown_grant = token(ehr, grant_type="password", username="x", password="y")
    assert unknown_grant.status_code == 400
    assert unknown_grant.json()["error"] == "unsupported_grant_type"
    bad_code = exchange(ehr, "not-a-code")
    assert bad_code.status_code == 400 and bad_code.json()["error"] == "invalid_grant"
    other_client = token(
        ehr,
        grant_type="authorization_code",
        code=code_for(ehr),
        redirect_uri=REDIRECT,
        client_id="someone-else",
        code_verifier="v" * 50,
    )
    assert other_client.status_code in (400, 401)
    assert other_client.json()["error"] == "invalid_client"
    bad_refresh = token(ehr, grant_type="refresh_token", refresh_token="nope", client_id=CLIENT)
    assert bad_refresh.status_code == 400 and bad_refresh.json()["error"] == "invalid_grant"


def user_token(ehr: SandboxHandle, scope: str = SCOPE) -> str:
    body = exchange(ehr, code_for(ehr, scope=scope)).json()
    return str(body["access_token"])


def get(ehr: SandboxHandle, path: str, access_token: str, **headers: str) -> requests.Response:
    return requests.get(
        f"{ehr.fhir}/{path}",
        headers={"Authorization": f"Bearer {access_token}", **headers},
        timeout=10,
    )


def test_patient_compartment_is_enforced(ehr: SandboxHandle) -> None:
    bearer = user_token(ehr)
    assert get(ehr, "Patient/cxr-demo-1", bearer).status_code == 200
    assert get(ehr, "Patient/cxr-demo-2", bearer).status_code == 403
    assert get(ehr, "ImagingStudy?patient=cxr-demo-1", bearer).json()["total"] == 2
    assert get(ehr, "ImagingStudy?patient=cxr-demo-2", bearer).status_code == 403
    assert get(ehr, "ImagingStudy", bearer).status_code == 403  # must name its patient
    assert get(ehr, "ImagingStudy/cxr-nema-rg1", bearer).status_code == 403  # patient 2's
    mine = get(ehr, "Binary/dicom-nih-00000002", bearer, Accept="application/dicom")
    assert mine.status_code == 200 and mine.content[128:132] == b"DICM"
    theirs = get(ehr, "Binary/dicom-nema-rg1", bearer, Accept="application/dicom")
    assert theirs.status_code == 403
    report = {
        "resourceType": "DiagnosticReport",
        "status": "preliminary",
        "code": {"text": "x"},
        "subject": {"reference": "Patient/cxr-demo-2"},
    }
    written = requests.post(
        f"{ehr.fhir}/DiagnosticReport",
        json=report,
        headers={"Authorization": f"Bearer {bearer}", "Content-Type": "application/fhir+json"},
        timeout=10,
    )
    assert written.status_code == 403


def test_scopes_are_enforced_v1_and_v2(ehr: SandboxHandle) -> None:
    narrow = user_token(ehr, scope="launch patient/ImagingStudy.rs")
    assert get(ehr, "ImagingStudy?patient=cxr-demo-1", narrow).status_code == 200
    assert get(ehr, "Patient/cxr-demo-1", narrow).status_code == 403
    search_only = user_token(ehr, scope="launch patient/ImagingStudy.s")
    assert get(ehr, "ImagingStudy?patient=cxr-demo-1", search_only).status_code == 200
    assert get(ehr, "ImagingStudy/cxr-nih-00000002", search_only).status_code == 403
    v1 = user_token(ehr, scope="launch patient/Patient.read")
    assert get(ehr, "Patient/cxr-demo-1", v1).status_code == 200
    report = {
        "resourceType": "DiagnosticReport",
        "status": "preliminary",
        "code": {"text": "x"},
        "subject": {"reference": "Patient/cxr-demo-1"},
    }
    denied = requests.post(
        f"{ehr.fhir}/DiagnosticReport",
        json=report,
        headers={"Authorization": f"Bearer {v1}", "Content-Type": "application/fhir+json"},
        timeout=10,
    )
    assert denied.status_code == 403
    assert "do not allow writing DiagnosticReport" in denied.json()["issue"][0]["diagnostics"]


def test_unregistered_scopes_are_not_granted(ehr: SandboxHandle) -> None:
    body = exchange(ehr, code_for(ehr, scope="launch patient/*.cruds user/Patient.rs")).json()
    assert body["scope"] == "launch"
    assert get(ehr, "Patient/cxr-demo-1", body["access_token"]).status_code == 403


def test_ehr_launch_page_opens_the_app_with_iss_and_launch(ehr: SandboxHandle) -> None:
    page = requests.get(f"{ehr.base}/ehr/launch", timeout=10)
    assert page.status_code == 200 and "cxr-demo-1" in page.text
    answer = requests.get(
        f"{ehr.base}/ehr/launch",
        params={"app": CLIENT, "patient": "cxr-demo-1", "study": "cxr-nih-00000002"},
        allow_redirects=False,
        timeout=10,
    )
    assert answer.status_code == 302
    location = urlsplit(answer.headers["Location"])
    assert (
        f"{location.scheme}://{location.netloc}{location.path}" == "http://127.0.0.1:9/app/launch"
    )
    query = parse_qs(location.query)
    assert query["iss"] == [ehr.fhir]
    context = ehr.sandbox.smart.launch(query["launch"][0], CLIENT)
    assert context is not None and context.patient == "cxr-demo-1"
    assert context.fhir_context == [{"reference": "ImagingStudy/cxr-nih-00000002"}]
    unknown = requests.get(
        f"{ehr.base}/ehr/launch", params={"app": CLIENT, "patient": "nobody"}, timeout=10
    )
    assert unknown.status_code == 404


def test_search_parameters_cannot_widen_a_patient_scoped_search(ehr: SandboxHandle) -> None:
    """Parameters the store does not apply (or modifiers it does not know) used to pass the
    'names its patient' check and were then ignored: every patient's records came back."""
    bearer = user_token(ehr)
    for query in (
        "Patient?patient=cxr-demo-1",
        "ImagingStudy?patient:foo=cxr-demo-1",
        "ImagingStudy?patient=cxr-demo-1&_include=ImagingStudy:subject",
        "Media?patient:missing=cxr-demo-1",
    ):
        answer = get(ehr, query, bearer)
        assert answer.status_code in (400, 403), query
        assert answer.json()["resourceType"] == "OperationOutcome", query
    assert (
        "unsupported search parameters"
        in (get(ehr, "Patient?patient=cxr-demo-1", bearer).json()["issue"][0]["diagnostics"])
    )
    mine = get(ehr, "Patient?_id=cxr-demo-1", bearer).json()
    assert [e["resource"]["id"] for e in mine["entry"]] == ["cxr-demo-1"]
    by_subject = get(ehr, "Media?subject=Patient/cxr-demo-1", bearer).json()
    assert by_subject["total"] == 2
    assert {e["resource"]["subject"]["reference"] for e in by_subject["entry"]} == {
        "Patient/cxr-demo-1"
    }


def test_answers_to_a_patient_scoped_token_stay_in_its_compartment(ehr: SandboxHandle) -> None:
    """Results are filtered whatever the query: a resource that also names another patient,
    or a history with another patient's version, is not shown."""
    store = ehr.sandbox.store
    shared = store.create(
        {
            "resourceType": "DiagnosticReport",
            "status": "final",
            "code": {"text": "family screening"},
            "subject": {"reference": "Patient/cxr-demo-1"},
            "resultsInterpreter": [{"reference": "Patient/cxr-demo-2"}],
        }
    )
    moved = store.create(
        {
            "resourceType": "DiagnosticReport",
            "status": "final",
            "code": {"text": "filed to the wrong chart first"},
            "subject": {"reference": "Patient/cxr-demo-2"},
        }
    )
    store.update({**moved, "subject": {"reference": "Patient/cxr-demo-1"}})
    try:
        bearer = user_token(ehr)
        found = get(ehr, "DiagnosticReport?patient=cxr-demo-1&_count=200", bearer).json()
        ids = {e["resource"]["id"] for e in found.get("entry", [])}
        assert shared["id"] not in ids and moved["id"] in ids
        assert found["total"] == len(ids)
        assert get(ehr, f"DiagnosticReport/{shared['id']}", bearer).status_code == 403
        assert get(ehr, f"DiagnosticReport/{moved['id']}", bearer).status_code == 200
        history = get(ehr, f"DiagnosticReport/{moved['id']}/_history", bearer)
        assert history.status_code == 403
        first = get(ehr, f"DiagnosticReport/{moved['id']}/_history/1", bearer)
        assert first.status_code == 403
    finally:
        store.delete("DiagnosticReport", shared["id"])
        store.delete("DiagnosticReport", moved["id"])


def test_refresh_asking_for_more_scope_keeps_the_refresh_token(ehr: SandboxHandle) -> None:
    body = exchange(ehr, code_for(ehr)).json()
    wider = token(
        ehr,
        grant_type="refresh_token",
        refresh_token=body["refresh_token"],
        client_id=CLIENT,
        scope="patient/Patient.rs user/*.cruds",
    )
    assert wider.status_code == 400 and wider.json()["error"] == "invalid_scope"
    narrower = token(
        ehr,
        grant_type="refresh_token",
        refresh_token=body["refresh_token"],
        client_id=CLIENT,
        scope="patient/Patient.rs",
    )
    assert narrower.status_code == 200, narrower.text
    assert narrower.json()["scope"] == "patient/Patient.rs"


def test_ehr_launch_refuses_a_study_of_another_patient(ehr: SandboxHandle) -> None:
    answer = requests.get(
        f"{ehr.base}/ehr/launch",
        params={"app": CLIENT, "patient": "cxr-demo-1", "study": "cxr-nema-rg1"},
        allow_redirects=False,
        timeout=10,
    )
    assert answer.status_code == 400 and "Location" not in answer.headers
    assert "another patient" in answer.text


def _post(ehr: SandboxHandle, path: str, bearer: str, body: Any, **headers: str) -> Any:
    return requests.post(
        f"{ehr.fhir}{path}",
        json=body,
        headers={
            "Authorization": f"Bearer {bearer}",
            "Content-Type": "application/fhir+json",
            **headers,
        },
        timeout=10,
    )


def _report(patient: str, text: str) -> dict[str, Any]:
    return {
        "resourceType": "DiagnosticReport",
        "status": "preliminary",
        "code": {"text": text},
        "subject": {"reference": f"Patient/{patient}"},
    }


def _created_id(answer: requests.Response) -> str:
    return str(answer.headers["Location"]).split("/DiagnosticReport/")[1].split("/")[0]


def test_a_conditional_create_matches_only_inside_the_tokens_compartment(
    ehr: SandboxHandle,
) -> None:
    """If-None-Exist naming another patient's report used to answer 200 with that report
    (and a transaction's ifNoneExist told its id): only the token's own records match."""
    store = ehr.sandbox.store
    theirs = store.create(_report("cxr-demo-2", "SECRET of patient 2"))
    mine = store.create(_report("cxr-demo-1", "patient 1's own report"))
    made: list[str] = []
    try:
        bearer = user_token(ehr)
        assert get(ehr, f"DiagnosticReport/{theirs['id']}", bearer).status_code == 403
        body = _report("cxr-demo-1", "conditional")
        for condition in (f"_id={theirs['id']}", "patient=cxr-demo-2"):
            answer = _post(ehr, "/DiagnosticReport", bearer, body, **{"If-None-Exist": condition})
            assert answer.status_code == 201, answer.text
            assert "SECRET" not in answer.text and theirs["id"] not in answer.text
            made.append(_created_id(answer))
            bundle = {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {
                        "fullUrl": "urn:uuid:a1",
                        "resource": body,
                        "request": {
                            "method": "POST",
                            "url": "DiagnosticReport",
                            "ifNoneExist": condition,
                        },
                    }
                ],
            }
            answer = _post(ehr, "", bearer, bundle)
            assert answer.status_code == 200, answer.text
            entry = answer.json()["entry"][0]
            assert entry["response"]["status"] == "201 Created"
            assert theirs["id"] not in answer.text
            made.append(entry["fullUrl"].rsplit("/", 1)[1])
        # A match inside the compartment is still found (idempotent filing).
        again = _post(
            ehr, "/DiagnosticReport", bearer, body, **{"If-None-Exist": f"_id={mine['id']}"}
        )
        assert again.status_code == 200 and again.json()["id"] == mine["id"]
        assert store.read("DiagnosticReport", theirs["id"]) == theirs
    finally:
        for rid in [theirs["id"], mine["id"], *made]:
            store.delete("DiagnosticReport", rid)


def test_a_transaction_cannot_rewrite_a_reference_into_another_chart(
    ehr: SandboxHandle,
) -> None:
    """A Patient entry with fullUrl `Patient/cxr-demo-1` matching patient 2 by ifNoneExist
    turned the report's (checked) subject Patient/cxr-demo-1 into Patient/cxr-demo-2."""
    scope = f"{SCOPE} patient/Patient.c"
    smart = ehr.sandbox.smart
    registered = smart.app(CLIENT)
    assert registered is not None
    smart.register_app(replace(registered, scope=f"{registered.scope} patient/Patient.c"))
    try:
        bearer = user_token(ehr, scope=scope)
    finally:
        smart.register_app(registered)
    store = ehr.sandbox.store
    before = store.search("DiagnosticReport", [("patient", "cxr-demo-2")]).total
    patients = store.search("Patient", [("_count", "200")]).total
    patient_entry = {
        "resource": {"resourceType": "Patient", "id": "cxr-demo-1"},
        "request": {"method": "POST", "url": "Patient", "ifNoneExist": "_id=cxr-demo-2"},
    }
    report_entry = {
        "fullUrl": "urn:uuid:2",
        "resource": _report("cxr-demo-1", "PLANTED"),
        "request": {"method": "POST", "url": "DiagnosticReport"},
    }
    for full_url in ("Patient/cxr-demo-1", f"{ehr.fhir}/Patient/cxr-demo-1"):
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{"fullUrl": full_url, **patient_entry}, report_entry],
        }
        answer = _post(ehr, "", bearer, bundle)
        assert answer.status_code == 403, answer.text
        assert "urn:uuid: fullUrls" in answer.json()["issue"][0]["diagnostics"]
    assert store.search("DiagnosticReport", [("patient", "cxr-demo-2")]).total == before
    assert store.search("Patient", [("_count", "200")]).total == patients


def test_a_search_form_without_content_type_is_checked_as_the_api_reads_it(
    ehr: SandboxHandle,
) -> None:
    """The FHIR API reads a POSTed _search body without a Content-Type as a form; the
    access check used to skip it, so its unknown parameters were not refused."""
    bearer = user_token(ehr)

    def search(query: str, body: bytes) -> requests.Response:
        return requests.post(
            f"{ehr.fhir}/DiagnosticReport/_search?{query}",
            data=body,
            headers={"Authorization": f"Bearer {bearer}", "Content-Type": ""},
            timeout=10,
        )

    for body in (b"nonsense=1", b"patient:foo=cxr-demo-2"):
        answer = search("patient=cxr-demo-1", body)
        assert answer.status_code == 400, answer.text
        assert "unsupported search parameters" in answer.json()["issue"][0]["diagnostics"]
    assert search("", b"patient=cxr-demo-2").status_code == 403
    mine = search("", b"patient=cxr-demo-1")
    assert mine.status_code == 200 and mine.json()["resourceType"] == "Bundle"


def _binary_of(store: Any, patient: str) -> str:
    media = store.search("Media", [("patient", patient)]).resources[0]
    return str(media["content"]["url"]).rsplit("Binary/", 1)[1]


def test_a_patient_scoped_writer_cannot_claim_or_block_a_binary(ehr: SandboxHandle) -> None:
    """Linking a Binary from a new resource makes the writer's patient one of its owners:
    another patient's Binary became nobody's, an unlinked one became the writer's."""
    store = ehr.sandbox.store
    theirs = _binary_of(store, "cxr-demo-2")
    mine = _binary_of(store, "cxr-demo-1")
    loose = store.create({"resourceType": "Binary", "contentType": "text/plain", "data": "eA=="})
    made: list[str] = []
    try:
        bearer = user_token(ehr)
        assert get(ehr, f"Binary/{loose['id']}", bearer).status_code == 403
        for binary in (theirs, loose["id"], "not-stored-yet", mine):
            report = {
                **_report("cxr-demo-1", "with an attachment"),
                "presentedForm": [{"contentType": "text/plain", "url": f"Binary/{binary}"}],
            }
            answer = _post(ehr, "/DiagnosticReport", bearer, report)
            if binary == mine:
                assert answer.status_code == 201, answer.text
                made.append(_created_id(answer))
            else:
                assert answer.status_code == 403, (binary, answer.text)
                assert "Binary outside" in answer.json()["issue"][0]["diagnostics"]
        assert get(ehr, f"Binary/{loose['id']}", bearer).status_code == 403
        assert get(ehr, f"Binary/{mine}", bearer).status_code == 200
        patient_two = PatientCompartment(store, "cxr-demo-2")
        assert patient_two.contains(store.read("Binary", theirs) or {})
    finally:
        for rid in made:
            store.delete("DiagnosticReport", rid)
        store.delete("Binary", loose["id"])
