"""The real CDS Hooks sandbox and SMART launcher against `cxr-cds demo`, in Chromium (issue 15):
a. Patient View shows the findings cards; b. PAMA Imaging: chest CT cards, head CT none;
c. a card's SMART link opens the app at its study with the AI report, an override reaches
the service's feedback; d. the launcher's Provider EHR Launch (default settings) and its
standalone launch open the app, whose study view shows the film and the AI report."""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Callable
from typing import Any

from tests.peers.conftest import Browser, Peers

PV = "cxr-ai-patient-view"
ORDER_SELECT = "cxr-ai-order-select"
APP_LINK = "Open the AI chest X-ray viewer"


def _is_hook_call(service_id: str, needle: str = "") -> Callable[[Any], bool]:
    def matches(response: Any) -> bool:
        request = response.request
        return (
            request.method == "POST"
            and response.url.endswith(f"/cds-services/{service_id}")
            and needle in (request.post_data or "")
        )

    return matches


def _hook_answer(
    page: Any, service_id: str, act: Callable[[], None], again: Callable[[], None], needle: str = ""
) -> dict[str, Any]:
    """The service's answer to the hook the sandbox fires after `act`. The sandbox fires a
    hook when its context changes; its first page load sometimes loads the services after
    that moment (a race in the sandbox), so `again` changes the context once more."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        with page.expect_response(_is_hook_call(service_id, needle), timeout=15_000) as info:
            act()
        response = info.value
    except PlaywrightTimeout:
        with page.expect_response(_is_hook_call(service_id, needle), timeout=15_000) as info:
            again()
        response = info.value
    assert response.status == 200, response.text()
    answer: dict[str, Any] = response.json()
    return answer


def _open_patient_view(browser: Browser, peers: Peers) -> dict[str, Any]:
    page = browser.page

    def toggle() -> None:
        page.get_by_role("button", name="Rx View").click()
        page.get_by_role("button", name="Patient View").click()

    return _hook_answer(page, PV, lambda: page.goto(peers.cds_sandbox_url()), toggle)


def _card(page: Any, text: str) -> Any:
    return page.locator(".MuiCard-root", has_text=text).first


def _film_drawn(page: Any) -> bool:
    page.wait_for_selector("#film[data-loaded='true']")
    return bool(
        page.evaluate(
            """() => {
              const c = document.getElementById('film');
              const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
              for (let i = 0; i < d.length; i += 4 * 97) { if (d[i] > 16) return true; }
              return false;
            }"""
        )
    )


def test_a_patient_view_shows_the_findings_cards(browser: Browser, peers: Peers) -> None:
    answer = _open_patient_view(browser, peers)
    summaries = [card["summary"] for card in answer["cards"]]
    assert any("AI flags cardiomegaly" in s for s in summaries), summaries
    page = browser.page
    card = _card(page, "AI flags cardiomegaly")
    card.wait_for()
    assert "AI-generated, preliminary, not reviewed" in card.inner_text()
    assert "Enlarged cardiac silhouette" in card.inner_text()  # the evidence sentence
    assert _card(page, "no major finding detected by the model").count() == 1
    browser.shot("a-patient-view")


def test_b_pama_chest_ct_shows_cards_head_ct_none(browser: Browser, peers: Peers) -> None:
    page = browser.page
    _open_patient_view(browser, peers)
    page.get_by_role("button", name="PAMA Imaging").click()
    page.get_by_role("heading", name="PAMA Imaging").wait_for()

    def order(code: str, display: str) -> Callable[[], None]:
        def pick() -> None:
            search = page.locator("input[id^='react-select']").first
            search.fill(code)
            page.get_by_text(display, exact=True).click()

        return pick

    def nothing() -> None:
        pass

    chest = "Computed tomography, thorax; without contrast material"
    answer = _hook_answer(page, ORDER_SELECT, order("71250", chest), nothing, needle="71250")
    assert answer["cards"], "a chest CT order shows the findings on prior chest radiographs"
    assert all(c["summary"].startswith(("SIMULATED: Prior", "Prior")) for c in answer["cards"])
    _card(page, "AI flags cardiomegaly").wait_for()
    browser.shot("b-pama-chest-ct-71250")

    page.get_by_title("Remove").first.click()
    head = "Computed tomography, head or brain; without contrast material"
    answer = _hook_answer(page, ORDER_SELECT, order("70450", head), nothing, needle="70450")
    assert answer == {"cards": []}
    page.get_by_text("No recommendations to display").wait_for()
    browser.shot("b-pama-head-ct-70450")


def test_c_smart_link_opens_the_study_and_an_override_reaches_feedback(
    browser: Browser, peers: Peers
) -> None:
    page = browser.page
    answer = _open_patient_view(browser, peers)
    flagged = next(c for c in answer["cards"] if "AI flags cardiomegaly" in c["summary"])
    study = json.loads(flagged["links"][0]["appContext"])["imagingStudy"].split("/", 1)[1]
    card = _card(page, "AI flags cardiomegaly")
    link = card.get_by_role("button", name=APP_LINK)
    # Enabled once the EHR sandbox answered POST {fhir}/_services/smart/Launch.
    deadline = time.monotonic() + 15
    while not link.is_enabled() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert link.is_enabled(), card.inner_text()
    with browser.context.expect_page() as opened:
        link.click()
    app = opened.value
    app.wait_for_url(re.compile(rf".*/app/s/[^/]+/study/{re.escape(study)}$"), timeout=30_000)
    assert _film_drawn(app)
    assert "Enlarged cardiac silhouette" in app.locator("#report-text").inner_text()
    assert "cardiomegaly" in app.locator("table.findings").inner_text().lower()
    browser.shot("c-smart-link-study", app)
    app.close()

    # Override the card with a reason: the sandbox posts feedback with the code alone.
    card.get_by_label("select dismiss reason").click()
    page.get_by_role("menuitem", name="Override: Disagree with AI finding").click()
    deadline = time.monotonic() + 15
    rows: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        rows = [
            row
            for row in csv.DictReader(io.StringIO(peers.feedback_csv()))
            if row["card_uuid"] == flagged["uuid"]
        ]
        if rows:
            break
        time.sleep(0.5)
    assert rows, "the override did not reach the service's feedback"
    assert rows[0]["outcome"] == "overridden"
    assert rows[0]["override_reason_code"] == "disagree-with-ai"
    assert rows[0]["override_reason_display"] == "Disagree with AI finding"
    assert rows[0]["finding"] == "Cardiomegaly"
    browser.shot("c-after-override")


def _through_the_launcher(page: Any, patient: str) -> None:
    """Click through the launcher's screens (login, patient, encounter, authorization), as
    they come, until the app's session page."""
    deadline = time.monotonic() + 60
    while "/app/s/" not in page.url:
        assert time.monotonic() < deadline, f"stuck at {page.url}"
        page.wait_for_load_state()
        if page.get_by_text(patient, exact=True).count():
            page.get_by_text(patient, exact=True).first.click()
        elif page.get_by_role("button", name="Launch without encounter").count():
            page.get_by_role("button", name="Launch without encounter").click()
        elif page.locator("#approve").count():
            page.locator("#approve").click()
        elif page.get_by_role("button", name="Login").count():
            users = page.locator("select")
            if users.count():
                users.first.select_option(index=1)
            page.get_by_role("button", name="Login").click()
        else:
            time.sleep(0.3)
            continue
        time.sleep(0.5)


def _study_with_ai_report(app: Any, browser: Browser, name: str) -> None:
    """From the study list: the CR study, analysed on request with the film the clinician's
    token reads (the launcher's EHR is no CDS client), then its film and AI report."""
    app.locator("table.studies tbody tr", has_text="CR").get_by_role("link").click()
    app.wait_for_url("**/study/*")
    assert _film_drawn(app)
    if app.get_by_role("button", name="Request analysis").count():
        app.get_by_role("button", name="Request analysis").click()
        app.wait_for_url("**notice=*")
    deadline = time.monotonic() + 60
    while not app.locator("#report-text").count():
        assert time.monotonic() < deadline, app.locator("main").inner_text()
        time.sleep(1)
        app.reload()
    assert "Enlarged cardiac silhouette" in app.locator("#report-text").inner_text()
    assert _film_drawn(app)
    browser.shot(name, app)


def test_d_launcher_provider_ehr_launch_with_default_settings(
    browser: Browser, peers: Peers
) -> None:
    page = browser.page
    page.goto(f"{peers.launcher}/")
    page.locator("#launch-url").fill(f"{peers.service}/app/launch")
    browser.shot("d-launcher-settings")
    with browser.context.expect_page() as opened:
        page.locator("a, button").filter(has_text=re.compile(r"^\s*Launch\s*$")).first.click()
    app = opened.value
    app.set_default_timeout(20_000)
    _through_the_launcher(app, "Ada Lindqvist")
    app.wait_for_url("**/app/s/*/")
    assert "LINDQVIST" in app.locator(".patient-banner").inner_text()
    assert app.locator("table.studies tbody tr").count() == 2
    browser.shot("d-launcher-study-list", app)
    _study_with_ai_report(app, browser, "d-launcher-study")
    # Filing through the launcher, which forwards no token upstream: refused, and said so.
    app.get_by_role("button", name="File AI report to chart (preliminary)").click()
    refusal = app.locator("main").inner_text()
    assert "The EHR refused to file the report" in refusal and "HTTP 401" in refusal
    browser.shot("d-launcher-filing-refused", app)


def test_d_launcher_standalone_launch(browser: Browser, peers: Peers) -> None:
    page = browser.page
    page.goto(f"{peers.service}/app/standalone")
    assert "CXR_CDS_APP_FHIR_SERVERS" in page.locator("main").inner_text()
    browser.shot("d-app-standalone-without-iss")
    page.goto(f"{peers.launcher}/")
    page.locator("#launch_type").select_option("provider-standalone")
    iss = page.locator("#launch-url").input_value()
    assert iss.startswith(f"{peers.launcher}/v/r4/")
    page.goto(f"{peers.service}/app/standalone?iss={iss}")
    _through_the_launcher(page, "Ada Lindqvist")
    page.wait_for_url("**/app/s/*/")
    assert "LINDQVIST" in page.locator(".patient-banner").inner_text()
    browser.shot("d-standalone-study-list")
    _study_with_ai_report(page, browser, "d-standalone-study")
