"""Hook latency benchmark: the service under gunicorn, the sandbox, precomputed results.

Starts `cxr-cds sandbox` and `cxr-cds serve` as separate processes on loopback, stores
results for every seeded study, then drives, in the same run:
  - GET /cds-services (discovery): the baseline, no auth, no data;
  - patient-view with prefetch (what an EHR that honours prefetch sends);
  - patient-view without prefetch (the service searches the sandbox via fhirAuthorization);
at 1 and 8 concurrent clients. Prints p50/p95/p99 latency, requests/s and errors.

    .venv/bin/python bench/hooks.py [--requests 400] [--workers 2] [--busy-worker JOBS]

With --busy-worker, an inference worker drains JOBS queued analyses (simulated backend, real
DICOM fetched from the sandbox and decoded) on the same machine during the measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cds_service.composition import open_storage  # noqa: E402
from cds_service.config import Settings  # noqa: E402
from cds_service.fhir import imaging_study  # noqa: E402
from cds_service.inference.simulated import SimulatedBackend  # noqa: E402
from cds_service.storage.ports import Storage, StudyRef  # noqa: E402
from ehr_sandbox.access_tokens import TokenStore  # noqa: E402
from ehr_sandbox.app import Sandbox, SandboxSettings  # noqa: E402
from ehr_sandbox.cds_client import CdsHooksClient, SigningKey, hook_context  # noqa: E402

PATIENT = "cxr-demo-1"
SERVICE_ID = "cxr-ai-patient-view"
# The busy worker reads studies and images only (it files nothing).
IMAGE_SCOPE = "system/ImagingStudy.rs system/Endpoint.rs system/Media.rs system/Binary.rs"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class Connection:
    """A keep-alive HTTP/1.1 connection on http.client: a load generator light on CPU, so
    that on a 2-core machine most of the CPU goes to the service being measured."""

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self._conn = http.client.HTTPConnection(self._host, self._port, timeout=10)

    def request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> int:
        try:
            self._conn.request(method, path, body=body, headers=headers)
            response = self._conn.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            self._conn.close()
            self._conn = http.client.HTTPConnection(self._host, self._port, timeout=10)
            return 599


def run_load(
    make_request: Callable[[Connection], int], base: str, total: int, clients: int
) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    per_client = total // clients

    def worker() -> None:
        nonlocal errors
        connection = Connection(base)
        for _ in range(per_client):
            start = time.perf_counter()
            ok = make_request(connection) == 200
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed * 1000)
                errors += 0 if ok else 1

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    return {
        "n": len(latencies),
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "p99": percentile(latencies, 99),
        "mean": statistics.fmean(latencies),
        "rps": len(latencies) / wall,
        "errors": errors,
    }


def start_busy_worker(
    work: Path, sandbox_base: str, env: dict[str, str], store: Storage, jobs: int
) -> subprocess.Popen[bytes]:
    """A `cxr-cds worker` with ``jobs`` analyses queued: copies of the seeded studies under
    new Study UIDs, each fetched from the sandbox and decoded as a real job would be."""
    sandbox = Sandbox.open(SandboxSettings(data_dir=work / "sandbox", base_url=sandbox_base))
    key = SigningKey.load_or_create(work / "worker.jwk.json")
    sandbox.backend.register("bench-worker", key.public_jwks(), IMAGE_SCOPE)
    sandbox.close()
    clients = work / "ehr-clients.json"
    clients.write_text(
        json.dumps(
            [
                {
                    "fhir_base": f"{sandbox_base}/fhir",
                    "token_url": f"{sandbox_base}/auth/token",
                    "client_id": "bench-worker",
                    "jwk_file": str(work / "worker.jwk.json"),
                    "scope": IMAGE_SCOPE,
                }
            ]
        )
    )
    studies = requests.get(f"{sandbox_base}/fhir/ImagingStudy", timeout=10).json()["entry"]
    model = SimulatedBackend.model
    for number in range(jobs):
        study = studies[number % len(studies)]["resource"]
        ref = StudyRef(f"{sandbox_base}/fhir", f"2.25.{number + 1}", "busy")
        store.jobs.enqueue(ref, model, study, f"{sandbox_base}/fhir")
    worker_env = {**env, "CXR_CDS_EHR_CLIENTS": str(clients), "CXR_CDS_MODEL_BATCH_SIZE": "8"}
    return subprocess.Popen(
        [sys.executable, "-m", "cds_service.cli", "worker"],
        env=worker_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400, help="requests per scenario")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    parser.add_argument(
        "--busy-worker",
        type=int,
        default=0,
        metavar="JOBS",
        help="run an inference worker draining JOBS queued analyses during the measurement",
    )
    parser.add_argument(
        "--queue",
        choices=("embedded", "celery"),
        default="embedded",
        help="celery: PostgreSQL + Celery on Redis (both started here on loopback)",
    )
    parser.add_argument("--clients", default="1,8", help="concurrent clients, comma-separated")
    args = parser.parse_args()
    concurrency = [int(c) for c in args.clients.split(",")]

    servers = contextlib.ExitStack()
    scale_env: dict[str, str] = {}
    if args.queue == "celery":
        from tests import services  # the same real servers the tests start

        postgres = servers.enter_context(services.postgres_server())
        redis = servers.enter_context(services.redis_server())
        scale_env = {
            "CXR_CDS_DATABASE_URL": postgres.create_database("hooks"),
            "CXR_CDS_QUEUE": "celery",
            "CXR_CDS_REDIS_URL": redis.url,
        }

    work = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
    sandbox_port, service_port = free_port(), free_port()
    sandbox_base = f"http://127.0.0.1:{sandbox_port}"
    service_base = f"http://127.0.0.1:{service_port}"
    cli = [sys.executable, "-m", "cds_service.cli"]
    procs = []
    try:
        procs.append(
            subprocess.Popen(
                [*cli, "sandbox", "--port", str(sandbox_port), "--data-dir", str(work / "sandbox")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=ROOT,
            )
        )
        wait_http(f"{sandbox_base}/fhir/metadata")
        key = SigningKey.load_or_create(work / "sandbox" / "cds-client-key.jwk.json")
        issuers = work / "issuers.json"
        issuers.write_text(
            json.dumps(
                [
                    {
                        "iss": sandbox_base,
                        "jwks": key.public_jwks(),
                        "fhir_servers": [f"{sandbox_base}/fhir"],
                    }
                ]
            )
        )
        env = {
            **os.environ,
            "CXR_CDS_MODE": "demo",
            "CXR_CDS_PUBLIC_URL": service_base,
            "CXR_CDS_TRUSTED_ISSUERS": str(issuers),
            "CXR_CDS_DB": str(work / "cds.sqlite3"),
            **scale_env,
        }
        # Precompute results for every seeded study (what the worker would have done).
        store = open_storage(Settings.from_env(env))
        backend = SimulatedBackend()
        bundle = requests.get(
            f"{sandbox_base}/fhir/ImagingStudy", params={"_count": "100"}, timeout=10
        ).json()
        for entry in bundle.get("entry", []):
            study = entry["resource"]
            uid = imaging_study.study_uid(study)
            if uid:
                ref = StudyRef(f"{sandbox_base}/fhir", uid, imaging_study.subject_patient_id(study))
                store.results.put_result(ref, backend.analyse(uid, study))
        procs.append(
            subprocess.Popen(
                [
                    *cli,
                    "serve",
                    "--port",
                    str(service_port),
                    "--workers",
                    str(args.workers),
                    "--no-worker",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=ROOT,
            )
        )
        wait_http(f"{service_base}/cds-services")
        if args.busy_worker:
            procs.append(start_busy_worker(work, sandbox_base, env, store, args.busy_worker))
            busy_store = store

        token = (
            TokenStore(work / "sandbox" / "ehr.sqlite3")
            .issue("bench", "patient/ImagingStudy.rs", PATIENT, lifetime_s=3600)
            .token
        )
        authorization = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": 3600,
            "scope": "patient/ImagingStudy.rs",
            "subject": "bench",
        }
        client = CdsHooksClient(sandbox_base, key)
        service = next(s for s in client.discover(service_base) if s["id"] == SERVICE_ID)
        context = hook_context("patient-view", PATIENT, "Practitioner/example")
        with_prefetch = client.build_request(
            service, context, f"{sandbox_base}/fhir", authorization
        )
        without_prefetch = {k: v for k, v in with_prefetch.items() if k != "prefetch"}
        url = f"{service_base}/cds-services/{SERVICE_ID}"
        check = client.call(service_base, SERVICE_ID, with_prefetch)
        assert check.status == 200 and check.response["cards"], check.response

        path = urlsplit(url).path

        def hook(body: dict[str, Any]) -> Callable[[Connection], int]:
            # Tokens and bodies are made ahead of time so client-side work is not measured.
            ahead = [
                (
                    key.sign(sandbox_base, url),
                    json.dumps({**body, "hookInstance": str(uuid.uuid4())}).encode(),
                )
                for _ in range(max(args.requests, 128) + 16)
            ]
            iterator = iter(ahead)
            lock = threading.Lock()

            def send(connection: Connection) -> int:
                with lock:
                    jwt, payload = next(iterator)
                headers = {"Authorization": f"Bearer {jwt}", "Content-Type": "application/json"}
                return connection.request("POST", path, payload, headers)

            return send

        def discovery(connection: Connection) -> int:
            return connection.request("GET", "/cds-services", None, {})

        scenarios = [
            ("discovery (baseline)", lambda: discovery),
            ("patient-view, prefetch sent", lambda: hook(with_prefetch)),
            ("patient-view, service fetches FHIR", lambda: hook(without_prefetch)),
        ]
        print(
            f"# hooks benchmark {time.strftime('%Y-%m-%d %H:%M:%S')}, "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"gunicorn workers={args.workers} threads=4, {args.requests} requests/scenario, "
            f"queue {args.queue}"
        )
        print(
            "| scenario | clients | p50 ms | p95 ms | p99 ms | req/s | errors "
            "| p95 / discovery p95 |"
        )
        print("|---|---|---|---|---|---|---|---|")
        baseline: dict[int, float] = {}
        for clients in concurrency:
            for name, factory in scenarios:
                send = factory()
                run_load(send, service_base, max(16, 2 * clients), clients)  # warm-up
                send = factory()
                stats = run_load(send, service_base, args.requests, clients)
                if name.startswith("discovery"):
                    baseline[clients] = stats["p95"]
                ratio = stats["p95"] / baseline[clients]
                print(
                    f"| {name} | {clients} | {stats['p50']:.1f} | {stats['p95']:.1f} | "
                    f"{stats['p99']:.1f} | {stats['rps']:.0f} | {int(stats['errors'])} | "
                    f"{ratio:.1f}x |"
                )
        if args.busy_worker:
            left = busy_store.jobs.queue_depth(backend.model)
            print(
                f"\nbusy worker: {args.busy_worker - left} of {args.busy_worker} analyses done "
                "during the measurement (simulated backend: real DICOM fetched and decoded)"
            )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
        servers.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
