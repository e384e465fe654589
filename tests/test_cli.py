"""The `cxr-cds` command as a user runs it: demo end to end, and hook against a running service."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SandboxHandle, ServiceHandle, free_port

CLI = [sys.executable, "-m", "cds_service.cli"]


def test_demo_prints_simulated_cards_and_urls(tmp_path: Path) -> None:
    service_port, sandbox_port = free_port(), free_port()
    run = subprocess.run(
        [
            *CLI,
            "demo",
            "--once",
            "--port",
            str(service_port),
            "--sandbox-port",
            str(sandbox_port),
            "--data-dir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        # The demo reads the same CXR_CDS_* settings as `serve`.
        env={**os.environ, "CXR_CDS_MODEL_BATCH_SIZE": "2"},
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "batches of up to 2" in run.stderr
    # The studies reached the queue through the sandbox's Subscription, not by hand.
    assert "subscribed to new chest films" in out
    queued = re.findall(r"subscription notification: \d+ studies, (\d+) queued", run.stderr)
    assert sum(int(n) for n in queued) == 3
    assert "AI reports filed to the sandbox EHR (preliminary, AI-labelled): 3" in out
    assert "NO MODEL CONFIGURED" in out and "SIMULATED backend" in out
    assert "-> HTTP 200" in out
    card_lines = [line for line in out.splitlines() if line.strip().startswith("[")]
    assert card_lines and all("SIMULATED:" in line for line in card_lines)
    assert f"http://127.0.0.1:{service_port}/cds-services" in out
    assert f"http://127.0.0.1:{sandbox_port}/fhir" in out
    # PHI stays out of INFO logs: the access log with patient ids is not printed.
    assert "patient=cxr-demo-1" not in run.stderr


def test_hook_command_against_a_running_service(
    service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    key_file = sandbox.sandbox.settings.signing_key_file
    base = [
        *CLI,
        "hook",
        "--service",
        service.base,
        "--patient",
        "cxr-demo-2",
        "--fhir",
        sandbox.fhir,
        "--key",
        str(key_file),
        "--sandbox-dir",
        str(sandbox.sandbox.settings.data_dir),
        "--json",
    ]
    run = subprocess.run(
        [*base, "--hook", "patient-view"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    [result] = json.loads(run.stdout)
    assert result["status"] == 200
    # The service has no Backend Services registration: its card says the job waits for one.
    assert "AI analysis waiting" in result["response"]["cards"][0]["summary"]

    order = subprocess.run(
        [*base, "--hook", "order-sign", "--order-code", "71046"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    [signed] = json.loads(order.stdout)
    assert signed["status"] == 200 and signed["response"]["cards"]

    other = subprocess.run(
        [
            *base,
            "--hook",
            "order-select",
            "--order-code",
            "73030",
            "--order-text",
            "Shoulder X-ray",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(other.stdout)[0]["response"] == {"cards": []}


def test_hook_command_reports_unreachable_service(tmp_path: Path) -> None:
    run = subprocess.run(
        [
            *CLI,
            "hook",
            "--service",
            f"http://127.0.0.1:{free_port()}",
            "--hook",
            "patient-view",
            "--patient",
            "p",
            "--key",
            str(tmp_path / "k.json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "discovery" in run.stderr and "Traceback" not in run.stderr


def test_serve_refuses_unsafe_production_settings(tmp_path: Path) -> None:
    run = subprocess.run(
        [*CLI, "serve", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "CXR_CDS_DB": str(tmp_path / "x.sqlite3")},
    )
    assert run.returncode == 2
    assert "configuration error" in run.stderr and "CXR_CDS_PUBLIC_URL" in run.stderr


def worker_children(parent: int) -> list[int]:
    """Pids of `cxr-cds worker` processes whose parent is `parent` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and b"cds_service.cli" in cmdline and b"worker" in cmdline:
            found.append(int(entry.name))
    return found


def wait_for_worker(parent: int, exclude: int | None, timeout: float = 20.0) -> int:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [pid for pid in worker_children(parent) if pid != exclude]
        if pids:
            return pids[0]
        time.sleep(0.2)
    raise AssertionError("no inference worker process appeared")


def test_serve_runs_gunicorn_and_answers_discovery(tmp_path: Path) -> None:
    """`cxr-cds serve` as deployed: gunicorn workers plus a supervised inference worker."""
    import os
    import signal
    import time

    import requests

    port = free_port()
    env = {
        **os.environ,
        "CXR_CDS_MODE": "development",
        "CXR_CDS_AUTH": "off",
        "CXR_CDS_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "CXR_CDS_DB": str(tmp_path / "cds.sqlite3"),
    }
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        body = None
        while time.monotonic() < deadline and body is None:
            try:
                body = requests.get(f"http://127.0.0.1:{port}/cds-services", timeout=1).json()
            except requests.RequestException:
                time.sleep(0.2)
        assert body is not None and len(body["services"]) == 3
        health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()
        assert health["simulated"] is True
        # The inference worker is a child process; killed, it is started again.
        first = wait_for_worker(proc.pid, exclude=None)
        os.kill(first, signal.SIGKILL)
        second = wait_for_worker(proc.pid, exclude=first)
        assert second != first
        # The exit is on record for /readyz (shown while no worker runs).
        with sqlite3.connect(tmp_path / "cds.sqlite3") as conn:
            [(recorded,)] = conn.execute(
                "SELECT last_error FROM workers WHERE name LIKE 'exit:%'"
            ).fetchall()
        assert recorded.startswith("inference worker exited with -9")
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=20)
    assert "AUTHENTICATION IS OFF" in output
    assert "SIMULATED backend" in output
    assert re.search(r"inference worker exited with -9 \(.*\); restarting in 2 s", output)


def test_demo_on_a_busy_port_says_so(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = subprocess.run(
            [
                *CLI,
                "demo",
                "--once",
                "--port",
                str(free_port()),
                "--sandbox-port",
                str(port),
                "--data-dir",
                str(tmp_path / "demo"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    # Werkzeug names the busy port and exits 1; no traceback.
    assert run.returncode == 1
    assert f"Port {port} is in use" in run.stderr and "Traceback" not in run.stderr


def test_findings_command_labels_a_report_from_stdin() -> None:
    report = "FINDINGS: No pneumothorax or effusion. Cannot exclude early pneumonia.\n"
    run = subprocess.run(
        [*CLI, "findings", "--json"], input=report, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    labels = json.loads(run.stdout)
    assert len(labels) == 14
    assert labels["Pneumothorax"]["label"] == "negative"
    assert labels["Pleural Effusion"]["label"] == "negative"
    assert labels["Pneumonia"] == {
        "label": "uncertain",
        "sentence": "Cannot exclude early pneumonia.",
    }
    plain = subprocess.run(
        [*CLI, "findings"], input=report, capture_output=True, text=True, timeout=60
    )
    assert "Pneumonia" in plain.stdout and "Fracture" not in plain.stdout
    empty = subprocess.run([*CLI, "findings"], input="", capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2 and "standard input" in empty.stderr


def _serve_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    port = free_port()
    return {
        "PATH": "/usr/bin:/bin",
        "CXR_CDS_MODE": "development",
        "CXR_CDS_AUTH": "off",
        "CXR_CDS_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "CXR_CDS_DB": str(tmp_path / "cds.sqlite3"),
        **extra,
    }


def test_serve_with_a_missing_model_folder_is_one_configuration_error(tmp_path: Path) -> None:
    for command in ("serve", "worker"):
        run = subprocess.run(
            [*CLI, command, *(["--port", str(free_port())] if command == "serve" else [])],
            capture_output=True,
            text=True,
            timeout=60,
            env=_serve_env(
                tmp_path, CXR_CDS_BACKEND="tiny", CXR_CDS_MODEL_DIR=str(tmp_path / "missing")
            ),
        )
        assert run.returncode == 2, run.stderr
        assert "configuration error" in run.stderr and "CXR_CDS_MODEL_DIR" in run.stderr
        assert "Traceback" not in run.stderr


def test_serve_on_cuda_without_cuda_is_one_configuration_error(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    (tmp_path / "model").mkdir()
    run = subprocess.run(
        [*CLI, "serve", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        env=_serve_env(
            tmp_path,
            CXR_CDS_BACKEND="tiny",
            CXR_CDS_MODEL_DIR=str(tmp_path / "model"),
            CXR_CDS_MODEL_DEVICE="cuda",
        ),
    )
    assert run.returncode == 2, run.stderr
    assert "configuration error" in run.stderr and "no usable CUDA device" in run.stderr
    assert "Traceback" not in run.stderr


def test_supervisor_does_not_restart_a_worker_stopped_by_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from cds_service.jobs import supervisor as supervisor_module

    starts = tmp_path / "starts"
    script = f"open({str(starts)!r}, 'a').write('x'); raise SystemExit(2)"
    monkeypatch.setattr(supervisor_module, "WORKER_COMMAND", (sys.executable, "-c", script))
    watcher = supervisor_module.WorkerSupervisor(restart_delay_s=0.05)
    watcher.start()
    watcher._thread.join(10)
    assert not watcher._thread.is_alive()
    assert starts.read_text() == "x"  # started once, never again
    watcher.stop()


def test_supervisor_backs_off_and_reports_why_the_worker_died(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import time

    from cds_service.jobs import supervisor as supervisor_module

    starts = tmp_path / "starts"
    script = (
        f"import time; open({str(starts)!r}, 'a').write(f'{{time.monotonic()}}\\n'); "
        "raise RuntimeError('the GPU fell off the bus')"
    )
    monkeypatch.setattr(supervisor_module, "WORKER_COMMAND", (sys.executable, "-c", script))
    exits: list[str] = []
    watcher = supervisor_module.WorkerSupervisor(restart_delay_s=0.2, on_exit=exits.append)
    watcher.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(exits) < 4:
        time.sleep(0.05)
    watcher.stop()
    assert len(exits) >= 4
    assert all("RuntimeError: the GPU fell off the bus" in e for e in exits)
    assert "restarting in 0 s" in exits[0] and "restarting in 2 s" in exits[3]  # 0.2 .. 1.6
    times = [float(t) for t in starts.read_text().split()]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps[2] > gaps[0] * 2  # the delay doubles while it keeps dying young


def test_supervisor_does_not_restart_a_worker_asked_to_stop(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A shutdown sends SIGTERM to the whole process group: the worker is not started again."""
    from cds_service.jobs import supervisor as supervisor_module

    starts = tmp_path / "starts"
    script = (
        f"import os, signal; open({str(starts)!r}, 'a').write('x'); "
        "os.kill(os.getpid(), signal.SIGTERM)"
    )
    monkeypatch.setattr(supervisor_module, "WORKER_COMMAND", (sys.executable, "-c", script))
    watcher = supervisor_module.WorkerSupervisor(restart_delay_s=0.05)
    watcher.start()
    watcher._thread.join(10)
    assert not watcher._thread.is_alive()
    assert starts.read_text() == "x"
    watcher.stop()
