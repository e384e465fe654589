"""The real peers (the CDS Hooks sandbox and the SMART launcher, built from ../shared/peers by
`make peers-check`), started on loopback with `cxr-cds demo`, driven in Debian's Chromium.

Plain `make test` skips these tests: they run only when `scripts/peers-check.sh` sets
CXR_CDS_PEERS_CHECK=1 and names the built peers (CXR_CDS_PEERS_CDS_SANDBOX: the CDS Hooks
sandbox's folder, served from its `build/`; CXR_CDS_PEERS_LAUNCHER: the SMART launcher's)."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
LOCAL_HOSTS = {"localhost", "127.0.0.1"}
# What the peers themselves fetch from the internet (blocked): the CDS Hooks sandbox's default
# CDS services and the launcher's icon font. Anything else leaving loopback fails the test.
PEERS_OWN_OUTSIDE_HOSTS = {"sandbox-services.cds-hooks.org", "cdnjs.cloudflare.com"}
ARTIFACTS = ROOT / "test-artifacts" / "peers"
ENABLED = os.environ.get("CXR_CDS_PEERS_CHECK") == "1"
SKIP_REASON = (
    "peer checks run only from `make peers-check` (scripts/peers-check.sh builds the CDS Hooks "
    "sandbox and the SMART launcher from ../shared/peers or PEERS_DIR, then sets "
    "CXR_CDS_PEERS_CHECK=1)"
)


@pytest.fixture(autouse=True, scope="session")
def _only_from_peers_check() -> None:
    if not ENABLED:
        pytest.skip(SKIP_REASON)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {process.returncode}")
        try:
            requests.get(url, timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.25)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")


def wait_for_line(log: Path, text: str, timeout_s: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(encoding="utf-8", errors="replace"):
            return
        if process.poll() is not None:
            break
        time.sleep(0.25)
    tail = log.read_text(encoding="utf-8", errors="replace")[-3000:] if log.exists() else ""
    raise RuntimeError(f"{text!r} not printed within {timeout_s:.0f} s:\n{tail}")


def start(command: list[str], log: Path, cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A process in its own session (so its children, e.g. npm's node, stop with it)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@dataclass
class Peers:
    service: str  # the CDS service and its SMART app (cxr-cds demo)
    sandbox: str  # the EHR sandbox (cxr-cds demo)
    cds_sandbox: str  # the CDS Hooks sandbox (its built SPA, served statically)
    launcher: str  # the SMART launcher (npm start)
    data_dir: Path

    @property
    def fhir(self) -> str:
        return f"{self.sandbox}/fhir"

    def cds_sandbox_url(self, patient: str = "cxr-demo-1") -> str:
        return (
            f"{self.cds_sandbox}/?fhirServiceUrl={self.fhir}&patientId={patient}"
            f"&serviceDiscoveryURL={self.service}/cds-services"
        )

    def feedback_csv(self) -> str:
        run = subprocess.run(
            [sys.executable, "-m", "cds_service.cli", "feedback", "export", "--format", "csv"]
            + ["--db", str(self.data_dir / "cds.sqlite3")],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert run.returncode == 0, run.stderr
        return run.stdout


@pytest.fixture(scope="session")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    cds_dir = Path(os.environ["CXR_CDS_PEERS_CDS_SANDBOX"])
    launcher_dir = Path(os.environ["CXR_CDS_PEERS_LAUNCHER"])
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    work = tmp_path_factory.mktemp("peers")
    service_port, sandbox_port, launcher_port = free_port(), free_port(), free_port()
    launcher = f"http://127.0.0.1:{launcher_port}"
    env = {
        **os.environ,
        # What README's "Try it with the public sandboxes" says: the demo trusts the public
        # CDS Hooks sandbox (pointed at the demo's EHR sandbox) and lets the launcher start
        # the app.
        "CXR_CDS_TRUST_PUBLIC_SANDBOX": "1",
        "CXR_CDS_APP_FHIR_SERVERS": f"{launcher}/v/r4/",
    }
    demo_log = ARTIFACTS / "demo.log"
    demo = start(
        [str(ROOT / ".venv/bin/cxr-cds"), "demo", "--port", str(service_port)]
        + ["--sandbox-port", str(sandbox_port), "--data-dir", str(work / "demo")],
        demo_log,
        ROOT,
        env,
    )
    processes = [demo]
    static: ThreadingHTTPServer | None = None
    try:
        wait_for_line(demo_log, "Servers keep running", 180, demo)
        sandbox = f"http://127.0.0.1:{sandbox_port}"
        launcher_env = {
            **os.environ,
            "NODE_ENV": "production",
            "PORT": str(launcher_port),
            "HOST": "127.0.0.1",
            "FHIR_SERVER_R4": f"{sandbox}/fhir",
            "FHIR_SERVER_R3": "",
            "FHIR_SERVER_R2": "",
        }
        node = start(["npm", "start"], ARTIFACTS / "launcher.log", launcher_dir, launcher_env)
        processes.append(node)
        handler = functools.partial(_QuietHandler, directory=str(cds_dir / "build"))
        static = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=static.serve_forever, name="cds-sandbox", daemon=True).start()
        wait_http(f"{launcher}/", 120, node)
        yield Peers(
            service=f"http://127.0.0.1:{service_port}",
            sandbox=sandbox,
            cds_sandbox=f"http://127.0.0.1:{static.server_address[1]}",
            launcher=launcher,
            data_dir=work / "demo",
        )
    finally:
        if static is not None:
            static.shutdown()
        for process in reversed(processes):
            stop(process)


@dataclass
class Browser:
    context: Any
    page: Any
    outside: list[str] = field(default_factory=list)

    def shot(self, name: str, page: Any = None) -> None:
        (page or self.page).screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: make test installs Debian's chromium package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,  # never a downloaded browser
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
def browser(chromium: Any, request: pytest.FixtureRequest) -> Iterator[Browser]:
    """A fresh context whose every request not to localhost / 127.0.0.1 is blocked (and
    recorded: the peers' own calls to the internet, e.g. the CDS Hooks sandbox's default
    services and the launcher's web font, are expected to be among them)."""
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    outside: list[str] = []

    def guard(route: Any) -> None:
        url = route.request.url
        host = urlsplit(url).hostname or ""
        if url.startswith(("data:", "blob:")) or host in LOCAL_HOSTS:
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    context.route("**/*", guard)
    page = context.new_page()
    page.set_default_timeout(20_000)
    yield Browser(context=context, page=page, outside=outside)
    context.close()
    # What the peers tried to reach outside loopback (all blocked), for the record.
    name = request.node.name
    (ARTIFACTS / f"blocked-{name}.txt").write_text("".join(f"{u}\n" for u in outside))
    unexpected = [u for u in outside if urlsplit(u).hostname not in PEERS_OWN_OUTSIDE_HOSTS]
    assert unexpected == [], f"requests left localhost: {unexpected}"
