"""EHR and standalone launch of the SMART app in Chromium, up to what a clinician sees."""

from __future__ import annotations

import time
from typing import Any

from tests.smart.conftest import ARTIFACTS, SmartEnv


def _image_drawn(page: Any) -> bool:
    page.wait_for_selector("#film[data-loaded='true']")
    # Some pixel of the canvas is neither black nor transparent: the film is drawn.
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


def test_ehr_launch_reaches_the_study_view(smart_env: SmartEnv, page: Any) -> None:
    started = time.monotonic()
    page.goto(smart_env.ehr_launch_url())
    page.wait_for_url("**/app/s/*/study/cxr-nih-00000002")
    assert _image_drawn(page)
    elapsed = time.monotonic() - started
    banner = page.locator(".ai-banner")
    assert "AI-generated, preliminary, not reviewed" in banner.inner_text()
    assert "SIMULATED" in banner.inner_text()
    assert page.locator("#model-id").inner_text()
    assert page.locator("#model-version").inner_text()
    assert "LINDQVIST" in page.locator(".patient-banner").inner_text()
    assert page.locator("#ai-status").inner_text() == "analysed"
    rows = page.locator("table.findings tbody tr")
    assert rows.count() >= 1
    for i in range(rows.count()):
        cells = rows.nth(i).locator("td")
        assert cells.nth(1).inner_text() in ("present", "absent", "uncertain")
        assert cells.nth(2).inner_text() and cells.nth(2).inner_text() != "(no sentence)"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "smart-study-view.png"), full_page=True)
    assert elapsed < 5.0, f"launch to study view took {elapsed:.2f} s"
