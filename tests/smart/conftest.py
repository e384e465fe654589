"""Browser tests of the SMART app: sandbox EHR + service on loopback, Debian's Chromium."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from cds_service.web.demo import register_viewer
from tests.conftest import (
    SandboxHandle,
    ServiceHandle,
    analyse_seeded,
    make_service,
)

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost"})
STUDY = "cxr-nih-00000002"  # the demo patient's newest study
PATIENT = "cxr-demo-1"


@dataclass
class SmartEnv:
    sandbox: SandboxHandle
    service: ServiceHandle

    def ehr_launch_url(
        self, study: str | None = STUDY, patient: str = PATIENT, *, cross_site: bool = False
    ) -> str:
        """The sandbox's launch page; `cross_site` serves it from `localhost`, another site
        than the app's 127.0.0.1, so that an app frame in it gets no first-party cookies."""
        base = cross_site_base(self.sandbox.base) if cross_site else self.sandbox.base
        url = f"{base}/ehr/launch?app=cxr-cds-viewer&patient={patient}"
        return url + (f"&study={study}" if study else "")


def cross_site_base(base: str) -> str:
    return base.replace("://127.0.0.1:", "://localhost:")


@pytest.fixture(scope="module")
def smart_env(
    tmp_path_factory: pytest.TempPathFactory, sandbox: SandboxHandle
) -> Iterator[SmartEnv]:
    # The EHR's pages as another site may frame the app too (its launch cookie is dropped).
    service, server = make_service(
        tmp_path_factory.mktemp("smart-service"),
        sandbox,
        extra_fhir_servers=(f"{cross_site_base(sandbox.base)}/fhir",),
    )
    register_viewer(sandbox.sandbox, service.base)
    analyse_seeded(service, sandbox)
    yield SmartEnv(sandbox=sandbox, service=service)
    server.stop()


@dataclass
class Browser:
    page: object
    outside: list[str] = field(default_factory=list)


@pytest.fixture(scope="session")
def chromium() -> Iterator[object]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: make test installs Debian's chromium package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-sync",
                "--disable-default-apps",
                "--disable-domain-reliability",
            ],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(chromium: object) -> Iterator[object]:
    """A fresh browser context whose every request not to localhost is recorded and blocked;
    the test fails if any happened."""
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})  # type: ignore[attr-defined]
    outside: list[str] = []

    def guard(route: object) -> None:
        url = route.request.url  # type: ignore[attr-defined]
        host = urlsplit(url).hostname or ""
        if url.startswith(("data:", "blob:")) or host in LOCAL_HOSTS:
            route.continue_()  # type: ignore[attr-defined]
        else:
            outside.append(url)
            route.abort()  # type: ignore[attr-defined]

    context.route("**/*", guard)
    the_page = context.new_page()
    the_page.set_default_timeout(15_000)
    yield the_page
    context.close()
    assert outside == [], f"requests left localhost: {outside}"
