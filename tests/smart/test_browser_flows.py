"""Standalone launch, refused launches, token refresh, iframe, filing and accessibility in
Chromium. Every page is real: sandbox EHR, CDS service and app on loopback sockets."""

from __future__ import annotations

import sqlite3
import statistics
import time
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from cds_service.inference.simulated import SimulatedBackend
from cds_service.storage.ports import StudyRef
from tests.smart.conftest import ARTIFACTS, STUDY, SmartEnv
from tests.smart.test_launch import _image_drawn


def _next_hop(page: Any, url: str, until: str) -> str:
    """Follow redirects with the browser context's own HTTP client (same cookies), one hop
    at a time, and return the first URL containing `until` without opening it. Playwright
    cannot intercept redirected navigations, so the test steps through them itself."""
    for _ in range(6):
        response = page.request.get(url, max_redirects=0)
        assert response.status in (301, 302, 303), response.text()
        url = response.headers["location"]
        if until in url:
            return url
    raise AssertionError(f"no redirect to {until}")


def _changed(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return parts._replace(query=urlencode(query)).geturl()


def test_standalone_launch_with_patient_picker(smart_env: SmartEnv, page: Any) -> None:
    page.goto(f"{smart_env.service.base}/app/standalone?iss={smart_env.sandbox.fhir}")
    page.wait_for_url("**/auth/authorize?*")
    page.get_by_label("Sign in as").select_option("Practitioner/sandbox-radiologist")
    page.get_by_label("Patient", exact=True).select_option("cxr-demo-2")
    page.get_by_role("button", name="Allow").click()
    page.wait_for_url("**/app/s/*/")
    assert "OKAFOR" in page.locator(".patient-banner").inner_text()
    rows = page.locator("table.studies tbody tr")
    assert rows.count() == 1
    assert rows.first.locator("td.status").inner_text() == "analysed"
    rows.first.get_by_role("link").click()
    page.wait_for_url("**/study/cxr-nema-rg1")
    assert _image_drawn(page)
    assert page.locator("table.findings tbody tr").count() >= 1


def test_tampered_state_and_replayed_callback_are_refused(smart_env: SmartEnv, page: Any) -> None:
    real = _next_hop(page, smart_env.ehr_launch_url(), "/app/callback")
    state = parse_qs(urlsplit(real).query)["state"][0]
    answer = page.goto(
        _changed(real, state=state[:-4] + ("AAAA" if state[-4:] != "AAAA" else "BBBB"))
    )
    assert answer.status == 400
    assert "Sign-in not accepted" in page.locator("h1").inner_text()
    assert "state" in page.locator("[role=alert]").inner_text()
    assert page.locator("#film").count() == 0
    # The untouched answer still works once ...
    page.goto(real)
    page.wait_for_url("**/study/*")
    # ... and never again: a replayed code (and state) is refused with a clear page.
    replay = page.goto(real)
    assert replay.status == 400
    assert "Sign-in not accepted" in page.locator("h1").inner_text()


def test_launch_is_refused_when_pkce_is_plain(smart_env: SmartEnv, page: Any) -> None:
    authorize = _next_hop(page, smart_env.ehr_launch_url(), "/auth/authorize")
    answer = page.goto(_changed(authorize, code_challenge_method="plain"))
    assert answer.status == 403
    assert "did not authorize" in page.locator("h1").inner_text()
    assert "S256" in page.locator("[role=alert]").inner_text()
    assert page.locator("#film").count() == 0


def test_launch_is_refused_when_the_verifier_does_not_match(smart_env: SmartEnv, page: Any) -> None:
    # A challenge the app's verifier cannot meet: the EHR refuses the code exchange.
    authorize = _next_hop(page, smart_env.ehr_launch_url(), "/auth/authorize")
    answer = page.goto(_changed(authorize, code_challenge="A" * 43))
    assert answer.status == 400
    assert "invalid_grant" in page.locator("[role=alert]").inner_text()
    assert page.locator("#film").count() == 0


def test_launch_is_refused_when_aud_is_wrong(smart_env: SmartEnv, page: Any) -> None:
    authorize = _next_hop(page, smart_env.ehr_launch_url(), "/auth/authorize")
    answer = page.goto(_changed(authorize, aud="http://127.0.0.1:1/fhir"))
    assert answer.status == 400
    assert "Authorization refused" in page.locator("h1").inner_text()
    assert "No token was issued" in page.locator("[role=alert]").inner_text()


def test_expired_access_token_is_refreshed(smart_env: SmartEnv, page: Any) -> None:
    page.goto(smart_env.ehr_launch_url())
    page.wait_for_url("**/study/*")
    database = smart_env.sandbox.sandbox.settings.database
    with sqlite3.connect(database) as conn:
        before = {r[0] for r in conn.execute("SELECT token FROM access_tokens")}
        # The EHR expires every token it gave the viewer.
        conn.execute("UPDATE access_tokens SET expires_at = 0 WHERE client_id = 'cxr-cds-viewer'")
    page.reload()
    assert "AI-generated, preliminary" in page.locator(".ai-banner").inner_text()
    assert _image_drawn(page)
    with sqlite3.connect(database) as conn:
        after = {
            r[0]
            for r in conn.execute(
                "SELECT token FROM access_tokens WHERE client_id = 'cxr-cds-viewer' "
                "AND expires_at > ?",
                (time.time(),),
            )
        }
    assert after and not (after & before)  # a new token, obtained with the refresh token


def test_app_works_inside_the_ehr_frame(smart_env: SmartEnv, page: Any) -> None:
    page.goto(smart_env.ehr_launch_url() + "&embed=1")
    frame = page.frame_locator("iframe")
    frame.locator("#film[data-loaded='true']").wait_for()
    assert "AI-generated, preliminary" in frame.locator(".ai-banner").inner_text()
    # The EHR shows the patient itself inside its frame: need_patient_banner is false.
    assert frame.locator(".patient-banner").count() == 0
    assert page.context.cookies() == [] or all(
        c["name"] == "cxr_smart_launch" for c in page.context.cookies()
    )


def test_card_app_context_opens_the_study(smart_env: SmartEnv, page: Any) -> None:
    app_context = '{"imagingStudy":"ImagingStudy/cxr-siim-0001"}'
    page.goto(smart_env.ehr_launch_url(study=None) + "&" + urlencode({"appContext": app_context}))
    page.wait_for_url("**/study/cxr-siim-0001")
    assert _image_drawn(page)


def test_file_to_chart_and_refusal_without_write_scopes(smart_env: SmartEnv, page: Any) -> None:
    page.goto(smart_env.ehr_launch_url())
    page.wait_for_url("**/study/*")
    page.get_by_role("button", name="File AI report to chart (preliminary)").click()
    page.wait_for_url("**notice=filed")
    assert "filed to the chart" in page.locator(".notice").inner_text()
    reports = smart_env.sandbox.sandbox.store.search(
        "DiagnosticReport", [("patient", "cxr-demo-1"), ("status", "preliminary")]
    )
    assert reports.total >= 1
    # A standalone session where the user withholds the write scopes: the app explains.
    page.goto(f"{smart_env.service.base}/app/standalone?iss={smart_env.sandbox.fhir}")
    page.get_by_label("Patient", exact=True).select_option("cxr-demo-2")
    page.get_by_label("patient/DiagnosticReport.cruds").uncheck()
    page.get_by_role("button", name="Allow").click()
    page.wait_for_url("**/app/s/*/")
    page.locator("table.studies tbody tr a").first.click()
    page.wait_for_url("**/study/*")
    refusal = page.locator(".refusal").inner_text()
    assert "DiagnosticReport" in refusal and "cannot be filed" in refusal
    assert page.get_by_role("button", name="File AI report to chart (preliminary)").count() == 0


def test_request_analysis_queues_a_job(smart_env: SmartEnv, page: Any) -> None:
    store, sandbox = smart_env.service.store, smart_env.sandbox
    page.goto(f"{smart_env.service.base}/app/standalone?iss={smart_env.sandbox.fhir}")
    page.get_by_label("Patient", exact=True).select_option("cxr-demo-3")
    page.get_by_role("button", name="Allow").click()
    page.wait_for_url("**/app/s/*/")
    assert "no radiographs" in page.locator("main").inner_text()
    # A new study for patient 3 arrives in the EHR, not yet analysed; its film is a DICOM
    # Media of the study (the job carries what the viewer reads).
    study = dict(sandbox.studies[0])
    study.update(
        id="cxr-new-3",
        subject={"reference": "Patient/cxr-demo-3"},
        identifier=[{"system": "urn:dicom:uid", "value": "urn:oid:1.2.826.0.1.3680043.8.498.1"}],
    )
    sandbox.sandbox.store.update(study)
    film = sandbox.sandbox.store.read("Binary", "dicom-nih-00000002")
    assert film is not None
    sandbox.sandbox.store.update({**film, "id": "dicom-new-3"})
    sandbox.sandbox.store.update(
        {
            "resourceType": "Media",
            "id": "media-new-3",
            "status": "completed",
            "partOf": [{"reference": "ImagingStudy/cxr-new-3"}],
            "subject": {"reference": "Patient/cxr-demo-3"},
            "content": {"contentType": "application/dicom", "url": "Binary/dicom-new-3"},
        }
    )
    page.reload()
    row = page.locator("table.studies tbody tr").first
    assert row.locator("td.status").inner_text() == "not analysed yet"
    row.get_by_role("link").click()
    page.get_by_role("button", name="Request analysis").click()
    page.wait_for_url("**notice=queued")
    assert page.locator("#ai-status").inner_text() == "in progress"
    ref = StudyRef(sandbox.fhir, "1.2.826.0.1.3680043.8.498.1", "cxr-demo-3")
    assert store.jobs.job_state(ref, SimulatedBackend().model) == "queued"
    job = store.jobs.claim(SimulatedBackend().model)
    assert job is not None and job.ref == ref and job.dicom and job.dicom[128:132] == b"DICM"
    store.jobs.put_back(job, "claimed by the test")


def test_controls_are_labelled_and_keyboard_usable(smart_env: SmartEnv, page: Any) -> None:
    page.goto(smart_env.ehr_launch_url())
    page.wait_for_selector("#film[data-loaded='true']")
    unlabelled = page.evaluate(
        """() => Array.from(document.querySelectorAll('button, select, canvas, a, input'))
            .filter(e => e.type !== 'hidden')
            .filter(e => {
              const label = e.getAttribute('aria-label') || e.textContent.trim() ||
                (e.id && document.querySelector(`label[for="${e.id}"]`));
              return !label;
            }).map(e => e.outerHTML)"""
    )
    assert unlabelled == []
    page.focus("#zoom-in")
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "zoom-out"
    page.focus("#window-preset")
    page.keyboard.press("ArrowDown")
    assert page.eval_on_selector("#window-preset", "e => e.value") == "lung"
    page.focus("#film")
    page.keyboard.press("ArrowLeft")
    assert _image_drawn(page)


def test_launch_to_study_view_timing(smart_env: SmartEnv, page: Any) -> None:
    """Several EHR launches, timed from the sandbox's launch URL to the drawn film."""
    timings = []
    for _ in range(5):
        started = time.monotonic()
        page.goto(smart_env.ehr_launch_url())
        page.wait_for_url(f"**/study/{STUDY}")
        page.wait_for_selector("#film[data-loaded='true']")
        page.locator("table.findings tbody tr").first.wait_for()
        timings.append(time.monotonic() - started)
    median = statistics.median(timings)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "smart-launch-timings.txt").write_text(
        "launch to study view (s): "
        + ", ".join(f"{t:.3f}" for t in timings)
        + f"\nmedian: {median:.3f}\n"
    )
    assert median < 5.0


def test_a_sign_in_answer_from_another_browser_is_refused(
    smart_env: SmartEnv, page: Any, chromium: Any
) -> None:
    """Login CSRF: someone starts a launch, stops at the callback and sends its URL to a
    victim. The victim's browser lacks the launch cookie and gets no session."""
    stolen = _next_hop(page, smart_env.ehr_launch_url(), "/app/callback")
    victim = chromium.new_context()
    try:
        answer = victim.new_page()
        response = answer.goto(stolen)
        assert response.status == 400
        assert "Sign-in not accepted" in answer.locator("h1").inner_text()
        assert "did not start this sign-in" in answer.locator("[role=alert]").inner_text()
        assert "/app/s/" not in answer.url and answer.locator("#film").count() == 0
    finally:
        victim.close()


def test_frame_without_the_launch_cookie_asks_before_opening_a_session(
    smart_env: SmartEnv, page: Any
) -> None:
    """The EHR page is another site than the app: Chromium drops the app's SameSite=Lax
    cookie inside its frame, so the app shows whom the sign-in is for and waits."""
    page.goto(smart_env.ehr_launch_url(cross_site=True) + "&embed=1")
    frame = page.frame_locator("iframe")
    heading = frame.get_by_role("heading", level=1)
    heading.wait_for()
    assert "Continue to the AI chest X-ray viewer for" in heading.inner_text()
    assert "LINDQVIST" in frame.locator(".confirm-patient").inner_text()
    assert frame.locator("#film").count() == 0
    held = {
        name: frame.locator(f"input[name={name}]").get_attribute("value")
        for name in ("confirmation", "csrf")
    }
    frame.get_by_role("button", name="Continue").click()
    frame.locator("#film[data-loaded='true']").wait_for()
    assert "AI-generated, preliminary" in frame.locator(".ai-banner").inner_text()
    assert page.context.cookies() == []  # the app's cookie never existed in this frame
    # The confirmation answers once: a replay of the same form opens nothing.
    replay = page.request.post(
        f"{smart_env.service.base}/app/confirm", form={**held, "decision": "continue"}
    )
    assert replay.status == 403 and "/app/s/" not in replay.url


def test_cancelled_confirmation_opens_no_session(smart_env: SmartEnv, page: Any) -> None:
    page.goto(smart_env.ehr_launch_url(cross_site=True) + "&embed=1")
    frame = page.frame_locator("iframe")
    frame.get_by_role("button", name="Cancel").click()
    frame.get_by_role("heading", name="Not continued").wait_for()
    assert frame.locator("#film").count() == 0
