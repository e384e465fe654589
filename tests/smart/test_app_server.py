"""The SMART app's pages over plain HTTP: sessions, CSRF, CSP, issuers, compartment."""

from __future__ import annotations

import re
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from cds_service.web.demo import register_viewer
from tests.conftest import SandboxHandle, make_service
from tests.smart.conftest import SmartEnv


def launched(smart_env: SmartEnv) -> requests.Response:
    """A full EHR launch with requests following every redirect; lands on the study view."""
    answer = requests.get(smart_env.ehr_launch_url(), timeout=20)
    assert answer.status_code == 200 and "/app/s/" in answer.url
    return answer


def session_base(answer: requests.Response) -> str:
    return answer.url.split("/study/", 1)[0]


def test_study_view_headers_and_content(smart_env: SmartEnv) -> None:
    answer = launched(smart_env)
    csp = answer.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert f"frame-ancestors 'self' {smart_env.sandbox.base}" in csp
    assert answer.headers["Referrer-Policy"] == "no-referrer"
    assert answer.headers["Cache-Control"] == "no-store"
    assert "<script>" not in answer.text and "style=" not in answer.text
    assert re.search(r"<script src=\"/app/static/viewer\.js\"></script>", answer.text)
    assert "access_token" not in answer.text and "refresh" not in answer.text.lower()
    image = requests.get(answer.url + "/image.png", timeout=20)
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


def test_unknown_session_and_bad_ids(smart_env: SmartEnv) -> None:
    gone = requests.get(f"{smart_env.service.base}/app/s/not-a-session/", timeout=10)
    assert gone.status_code == 404 and "Session not found" in gone.text
    base = session_base(launched(smart_env))
    for bad in ("%2E%2E", "a%2Fb", "x" * 65, "a%20b"):
        answer = requests.get(f"{base}/study/{bad}", timeout=10)
        assert answer.status_code == 404, bad


def test_forms_need_the_csrf_token(smart_env: SmartEnv) -> None:
    answer = launched(smart_env)
    forged = requests.post(answer.url + "/file", data={"csrf": "guess"}, timeout=10)
    assert forged.status_code == 403 and "Form not accepted" in forged.text
    missing = requests.post(answer.url + "/analyse", timeout=10)
    assert missing.status_code == 403


def test_another_patients_study_is_not_shown(smart_env: SmartEnv) -> None:
    base = session_base(launched(smart_env))  # a session for cxr-demo-1
    answer = requests.get(f"{base}/study/cxr-nema-rg1", timeout=10)  # cxr-demo-2's study
    assert answer.status_code == 502
    assert "AI report" not in answer.text and "OKAFOR" not in answer.text
    image = requests.get(f"{base}/study/cxr-nema-rg1/image.png", timeout=10)
    assert image.status_code == 502 and not image.content.startswith(b"\x89PNG")


def test_only_configured_ehrs_are_contacted(smart_env: SmartEnv) -> None:
    for iss in ("http://127.0.0.1:1/fhir", "https://evil.example/fhir", ""):
        answer = requests.get(
            f"{smart_env.service.base}/app/launch",
            params={"iss": iss, "launch": "x"},
            allow_redirects=False,
            timeout=10,
        )
        assert answer.status_code == 400 and "Unknown EHR" in answer.text


def test_state_has_at_least_122_bits(smart_env: SmartEnv) -> None:
    answer = requests.get(
        f"{smart_env.service.base}/app/standalone?iss={smart_env.sandbox.fhir}",
        allow_redirects=False,
        timeout=10,
    )
    assert answer.status_code == 302
    state = re.search(r"[?&]state=([^&]+)", answer.headers["Location"])
    assert state is not None and len(state.group(1)) * 6 >= 122
    assert "code_challenge_method=S256" in answer.headers["Location"]
    assert (
        "aud=" + requests.utils.quote(smart_env.sandbox.fhir, safe="") in answer.headers["Location"]
    )


def test_concurrent_requests_share_one_token_refresh(smart_env: SmartEnv) -> None:
    answer = launched(smart_env)
    with sqlite3.connect(smart_env.sandbox.sandbox.settings.database) as conn:
        conn.execute("UPDATE access_tokens SET expires_at = 0 WHERE client_id = 'cxr-cds-viewer'")
    urls = [answer.url, answer.url + "/image.png"] * 3
    with ThreadPoolExecutor(max_workers=6) as pool:
        statuses = list(pool.map(lambda u: requests.get(u, timeout=30).status_code, urls))
    # The refresh token rotates on use: without one shared refresh some requests would fail.
    assert statuses == [200] * 6


def test_two_workers_refreshing_one_session_share_the_refresh(smart_env: SmartEnv) -> None:
    """Two app instances (as two gunicorn workers) over the same session file refresh the same
    expired session at once: the refresh token rotates, so only a shared refresh keeps both."""
    from cds_service.inference.simulated import SimulatedBackend
    from smart_app.web import SmartApp

    sid = launched(smart_env).url.split("/app/s/", 1)[1].split("/", 1)[0]
    service = smart_env.service
    workers = [
        SmartApp(service.settings, service.store, SimulatedBackend().model) for _ in range(2)
    ]
    expired = workers[0].sessions.session(sid)
    assert expired is not None
    barrier = threading.Barrier(2)

    def refresh(worker: SmartApp) -> str:
        barrier.wait()
        return worker.refreshed(expired).access_token

    with ThreadPoolExecutor(max_workers=2) as pool:
        tokens = list(pool.map(refresh, workers))
    assert tokens[0] == tokens[1] != expired.access_token


def test_an_ehr_that_only_launches_the_app_is_accepted_under_its_prefix(
    tmp_path: Path, sandbox: SandboxHandle
) -> None:
    """The SMART launcher is not a CDS client: CXR_CDS_APP_FHIR_SERVERS lets it launch the app
    (its iss carries launch settings in the path, so a prefix is configured)."""
    prefix = f"{sandbox.base}/"
    service, server = make_service(
        tmp_path, sandbox, trusted_issuers=(), app_fhir_servers=(prefix,)
    )
    registered = sandbox.sandbox.smart.app("cxr-cds-viewer")
    try:
        register_viewer(sandbox.sandbox, service.base)
        accepted = requests.get(
            f"{service.base}/app/launch",
            params={"iss": sandbox.fhir, "launch": "x"},
            allow_redirects=False,
            timeout=10,
        )
        assert accepted.status_code in (302, 303), accepted.text
        assert accepted.headers["Location"].startswith(f"{sandbox.base}/auth/authorize")
        for iss in ("http://127.0.0.1:1/fhir", f"{sandbox.base}/../evil/fhir"):
            refused = requests.get(f"{service.base}/app/launch", params={"iss": iss}, timeout=10)
            assert refused.status_code == 400 and "Unknown EHR" in refused.text
    finally:
        server.stop()
        if registered is not None:  # the module's other tests launch the shared service
            sandbox.sandbox.smart.register_app(registered)


def stolen_callback(smart_env: SmartEnv) -> str:
    """A callback URL from a launch made by someone else (their cookies stay with them)."""
    attacker = requests.Session()
    url = smart_env.ehr_launch_url()
    for _ in range(6):
        answer = attacker.get(url, allow_redirects=False, timeout=10)
        url = answer.headers["Location"]
        if "/app/callback" in url:
            return url
    raise AssertionError("no redirect to the callback")


def sessions_count(smart_env: SmartEnv) -> int:
    database = Path(smart_env.service.settings.database)
    path = database.with_name(f"{database.stem}-smart-app.sqlite3")
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM smart_sessions").fetchone()[0])


def test_callback_without_the_launch_cookie_opens_no_session(smart_env: SmartEnv) -> None:
    before = sessions_count(smart_env)
    for headers in ({}, {"Sec-Fetch-Dest": "document"}):
        answer = requests.get(
            stolen_callback(smart_env), headers=headers, allow_redirects=False, timeout=10
        )
        assert answer.status_code == 400, answer.text
        assert "did not start this sign-in" in answer.text
    assert sessions_count(smart_env) == before


def test_framed_callback_without_cookie_needs_a_confirmation_post(smart_env: SmartEnv) -> None:
    before = sessions_count(smart_env)
    asked = requests.get(
        stolen_callback(smart_env),
        headers={"Sec-Fetch-Dest": "iframe"},
        allow_redirects=False,
        timeout=10,
    )
    assert asked.status_code == 200 and "Continue to the AI chest X-ray viewer" in asked.text
    assert "Lindqvist".upper() in asked.text and sessions_count(smart_env) == before
    assert "frame-ancestors" in asked.headers["Content-Security-Policy"]
    held = dict(re.findall(r'name="(confirmation|csrf)" value="([^"]+)"', asked.text))
    assert set(held) == {"confirmation", "csrf"}
    confirm = f"{smart_env.service.base}/app/confirm"
    own_page = {"Origin": smart_env.service.base}
    forged = requests.post(
        confirm,
        data={**held, "csrf": "guess", "decision": "continue"},
        headers=own_page,
        timeout=10,
    )
    assert forged.status_code == 403 and sessions_count(smart_env) == before
    # The forged answer used the confirmation up: the real form no longer opens a session.
    late = requests.post(
        confirm, data={**held, "decision": "continue"}, headers=own_page, timeout=10
    )
    assert late.status_code == 403 and sessions_count(smart_env) == before
    odd = requests.post(
        confirm, data={"confirmation": "é", "csrf": "é"}, headers=own_page, timeout=10
    )
    assert odd.status_code == 403


def _held_confirmation(smart_env: SmartEnv) -> dict[str, str]:
    asked = requests.get(
        stolen_callback(smart_env),
        headers={"Sec-Fetch-Dest": "iframe"},
        allow_redirects=False,
        timeout=10,
    )
    return dict(re.findall(r'name="(confirmation|csrf)" value="([^"]+)"', asked.text))


def test_a_confirmation_posted_by_another_site_plants_no_session(smart_env: SmartEnv) -> None:
    """Session planting: an attacker fetches a confirmation page of their own sign-in and
    makes the victim's browser submit it from another site."""
    before = sessions_count(smart_env)
    confirm = f"{smart_env.service.base}/app/confirm"
    cross_site = (
        {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
        {"Origin": smart_env.service.base, "Sec-Fetch-Site": "same-site"},
        {"Origin": "null"},
        {},
    )
    for headers in cross_site:
        held = _held_confirmation(smart_env)
        answer = requests.post(
            confirm,
            data={**held, "decision": "continue"},
            headers={**headers, "Sec-Fetch-Dest": "document"},
            allow_redirects=False,
            timeout=10,
        )
        assert answer.status_code == 403, headers
        assert "not sent from the app&#39;s own page" in answer.text
        assert sessions_count(smart_env) == before
    # The same form sent from the app's own page opens the session.
    own_page = (
        {"Origin": smart_env.service.base},
        {"Origin": "null", "Sec-Fetch-Site": "same-origin"},  # Chromium under no-referrer
    )
    for headers in own_page:
        held = _held_confirmation(smart_env)
        answer = requests.post(
            confirm,
            data={**held, "decision": "continue"},
            headers=headers,
            allow_redirects=False,
            timeout=10,
        )
        assert answer.status_code == 303 and "/app/s/" in answer.headers["Location"]
    assert sessions_count(smart_env) == before + 2


def test_standalone_without_iss_explains_what_to_pass(smart_env: SmartEnv) -> None:
    answer = requests.get(
        f"{smart_env.service.base}/app/standalone", allow_redirects=False, timeout=10
    )
    assert answer.status_code == 200
    assert "?iss=" in answer.text and "CXR_CDS_APP_FHIR_SERVERS" in answer.text
    # Each configured EHR is offered as a sign-in link.
    assert f'href="/app/standalone?iss={smart_env.sandbox.fhir}"' in answer.text
