"""Scale-out mode on real servers: PostgreSQL for every storage port, Celery on Redis for
wake-ups, two `cxr-cds worker` processes; faults on real processes (kill -9 of a worker
mid-batch, Redis restarted mid-burst, PostgreSQL restarted under hooks)."""

from __future__ import annotations

import time
from pathlib import Path

import requests

from bench.burst import run_burst
from tests import services
from tests.conftest import (
    SandboxHandle,
    analyse_seeded,
    make_service,
    patient_view_body,
    signed_post,
)

PATIENT_VIEW = "cxr-ai-patient-view"


def test_a_celery_burst_with_a_killed_worker_and_a_redis_restart_files_each_study_once(
    tmp_path: Path, postgres_dsn: str, redis_server: services.RedisServer
) -> None:
    burst = run_burst(
        tmp_path,
        24,
        kill_after=6,
        batch_size=4,
        lease_s=15.0,
        timeout_s=240.0,
        workers=2,
        database_url=postgres_dsn,
        broker=redis_server,
        restart_broker_after=12,
    )
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert burst.killed_at_reports is not None  # a worker really died mid-run
    assert burst.missing == 0, f"{burst.missing} studies never got a report\n{log[-3000:]}"
    assert burst.duplicates == 0, f"{burst.duplicates} studies got two reports"
    assert burst.reports == 24
    assert len(burst.latencies_s) == 24  # one finished job per study
    assert "Traceback" not in log


def test_hooks_answer_503_while_postgresql_restarts_and_recover_by_themselves(
    tmp_path: Path,
    sandbox: SandboxHandle,
    postgres_server: services.PostgresServer,
    postgres_dsn: str,
) -> None:
    handle, server = make_service(tmp_path, sandbox, database_url=postgres_dsn)
    try:
        analyse_seeded(handle, sandbox)
        body = patient_view_body(fhirServer=sandbox.fhir, fhirAuthorization=sandbox.authorization())
        assert signed_post(handle, sandbox, PATIENT_VIEW, body).status_code == 200
        postgres_server.stop()
        try:
            down = signed_post(handle, sandbox, PATIENT_VIEW, body)
            assert down.status_code == 503, down.text
            assert down.headers["Retry-After"].isdigit()
            assert down.json()["error"] == "storage-unavailable"
            ready = requests.get(f"{handle.base}/readyz", timeout=10)
            assert ready.status_code == 503
        finally:
            postgres_server.start()
        deadline = time.monotonic() + 20
        status = 0
        while time.monotonic() < deadline:  # no restart of the service: it reconnects
            status = signed_post(handle, sandbox, PATIENT_VIEW, body).status_code
            if status == 200:
                break
            time.sleep(0.5)
        assert status == 200
    finally:
        server.stop()
