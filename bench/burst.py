"""Burst benchmark: N chest films created in the EHR sandbox at once, each analysed and filed
exactly once through the real path, with one `kill -9` of the worker mid-batch.

The EHR sandbox (with its R4 Subscription delivery) and the CDS service (notification
receiver) run in this process on real sockets; the inference worker is a separate
`cxr-cds worker` process (simulated backend: real DICOM fetched and decoded, canned report),
as under `cxr-cds serve`. The service subscribes with `subscribe()`, then N ImagingStudies
(each with its DICOM Media) are created in a burst. After --kill-after reports are filed the
worker is killed with SIGKILL and started again; its unfinished batch comes back when the
lease lapses. At the end every study must have exactly one AI DiagnosticReport in the EHR.
Prints arrival-to-filed latency (p50/p95), throughput and the check.

    .venv/bin/python bench/burst.py [--studies 1000] [--kill-after 300] [--batch-size 8]
        [--lease 15]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from werkzeug.serving import make_server  # noqa: E402

from cds_service.composition import Composition  # noqa: E402
from cds_service.config import SERVICE_SCOPE, EhrClient, Settings, TrustedIssuer  # noqa: E402
from cds_service.inference.simulated import SimulatedBackend  # noqa: E402
from cds_service.jobs.arrivals import (  # noqa: E402
    NOTIFICATIONS_PATH,
    SUBSCRIPTION_SCOPE,
    Arrivals,
    subscribe,
)
from cds_service.web.app import create_app  # noqa: E402
from ehr_sandbox.app import Sandbox, SandboxSettings  # noqa: E402
from ehr_sandbox.app import create_app as create_sandbox_app  # noqa: E402
from ehr_sandbox.cds_client import SigningKey  # noqa: E402
from ehr_sandbox.seed import seed  # noqa: E402

TEMPLATE = "cxr-siim-0001"  # the smallest seeded film (127 kB JPEG baseline CR, frontal)
STUDIES_PER_PATIENT = 10
CLIENT_ID = "cxr-cds-burst"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(app: Any) -> tuple[Any, str]:
    port = _free_port()
    server = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{port}"


@dataclass
class Burst:
    studies: int
    reports: int  # AI DiagnosticReports in the EHR
    duplicates: int  # studies with more than one report
    missing: int  # studies with none
    killed_at_reports: int | None
    seconds: float
    latencies_s: list[float]

    @property
    def exactly_once(self) -> bool:
        return self.reports == self.studies and self.duplicates == 0 and self.missing == 0


def _ai_reports(sandbox: Sandbox) -> Counter[str]:
    """Preliminary DiagnosticReports per ImagingStudy reference."""
    per_study: Counter[str] = Counter()
    offset = 0
    while True:
        page = sandbox.store.search(
            "DiagnosticReport",
            [("status", "preliminary"), ("_count", "200"), ("_offset", str(offset))],
        )
        for report in page.resources:
            for ref in report.get("imagingStudy", []):
                per_study[str(ref.get("reference"))] += 1
        if not page.has_next:
            return per_study
        offset += 200


class Restartable(Protocol):
    """A server the burst may restart mid-run (the Redis broker in Celery mode)."""

    url: str

    def restart(self) -> None: ...


def _worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "cds_service.cli", "worker"],
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )


def run_burst(
    workdir: Path,
    studies: int,
    *,
    kill_after: int | None,
    batch_size: int = 8,
    lease_s: float = 15.0,
    timeout_s: float = 900.0,
    workers: int = 1,
    database_url: str | None = None,
    broker: Restartable | None = None,
    restart_broker_after: int | None = None,
) -> Burst:
    """``workers`` worker processes; with ``database_url`` and ``broker`` the scale-out mode
    (PostgreSQL, Celery on Redis), whose broker is restarted once ``restart_broker_after``
    reports are in. ``kill_after``: one worker is killed with SIGKILL then (and restarted)."""
    port = _free_port()
    sandbox_base = f"http://127.0.0.1:{port}"
    sandbox = Sandbox.open(SandboxSettings(data_dir=workdir / "ehr", base_url=sandbox_base))
    template = next(s for s in seed(sandbox.store) if s["id"] == TEMPLATE)
    media = sandbox.store.search("Media", [("_id", f"media-{TEMPLATE.removeprefix('cxr-')}")])
    template_media = media.resources[0]
    sandbox_server = make_server(
        "127.0.0.1", port, create_sandbox_app(sandbox=sandbox), threaded=True
    )
    threading.Thread(target=sandbox_server.serve_forever, daemon=True).start()
    fhir = f"{sandbox_base}/fhir"

    key = SigningKey.load_or_create(workdir / "backend.jwk.json")
    sandbox.backend.register(CLIENT_ID, key.public_jwks(), f"{SERVICE_SCOPE} {SUBSCRIPTION_SCOPE}")
    token_file = workdir / "notification-token.txt"
    token_file.write_text("burst-" + os.urandom(24).hex())
    clients_file = workdir / "ehr-clients.json"
    clients_file.write_text(
        json.dumps(
            [
                {
                    "fhir_base": fhir,
                    "token_url": f"{sandbox_base}/auth/token",
                    "client_id": CLIENT_ID,
                    "jwk_file": str(workdir / "backend.jwk.json"),
                    "notification_token_file": str(token_file),
                }
            ]
        )
    )
    ehr = EhrClient.from_json(json.loads(clients_file.read_text())[0])
    database = workdir / "cds.sqlite3"
    service_port = _free_port()
    service_base = f"http://127.0.0.1:{service_port}"
    issuer = TrustedIssuer(iss=sandbox_base, jwks=sandbox.key.public_jwks(), fhir_servers=(fhir,))
    scale: dict[str, Any] = {}
    if database_url is not None and broker is not None:
        scale = {"database_url": database_url, "queue": "celery", "redis_url": broker.url}
    settings = Settings(
        mode="demo",
        public_url=service_base,
        trusted_issuers=(issuer,),
        database=database,
        ehr_clients=(ehr,),
        **scale,
    ).validated()
    parts = Composition(settings)
    store = parts.storage
    service_server = make_server("127.0.0.1", service_port, create_app(parts), threaded=True)
    threading.Thread(target=service_server.serve_forever, daemon=True).start()

    model = SimulatedBackend.model
    arrivals = Arrivals(store, model, parts.access)
    subscribe(arrivals, ehr, service_base + NOTIFICATIONS_PATH, payload="id-only")

    env = {
        **os.environ,
        "CXR_CDS_MODE": "demo",
        "CXR_CDS_PUBLIC_URL": service_base,
        "CXR_CDS_DB": str(database),
        "CXR_CDS_EHR_CLIENTS": str(clients_file),
        "CXR_CDS_BACKEND": "simulated",
        "CXR_CDS_MODEL_BATCH_SIZE": str(batch_size),
        "CXR_CDS_JOB_LEASE_S": str(lease_s),
        "PYTHONPATH": str(ROOT),
    }
    if scale:
        env.update(
            CXR_CDS_DATABASE_URL=scale["database_url"],
            CXR_CDS_QUEUE="celery",
            CXR_CDS_REDIS_URL=scale["redis_url"],
        )
    log = workdir / "worker.log"
    pool = [_worker(env, log) for _ in range(workers)]

    started = time.monotonic()
    ids: list[str] = []
    for number in range(studies):  # the burst: as fast as the EHR takes them
        patient = f"burst-{number // STUDIES_PER_PATIENT}"
        study = copy.deepcopy(template)
        study.pop("meta", None)
        study["id"] = f"burst-{number}"
        study["subject"] = {"reference": f"Patient/{patient}"}
        study["identifier"] = [
            {"system": "urn:dicom:uid", "value": f"urn:oid:2.25.{10**6 + number}"}
        ]
        item = copy.deepcopy(template_media)
        item.pop("meta", None)
        item["id"] = f"burst-media-{number}"
        item["partOf"] = [{"reference": f"ImagingStudy/{study['id']}"}]
        item["subject"] = {"reference": f"Patient/{patient}"}
        with sandbox.store.held_changes():  # announced once its Media exists
            sandbox.store.update(study)
            sandbox.store.update(item)
        ids.append(study["id"])

    killed_at: int | None = None
    restarted_at: int | None = None
    deadline = time.monotonic() + timeout_s
    per_study: Counter[str] = Counter()
    while time.monotonic() < deadline:
        per_study = _ai_reports(sandbox)
        filed = sum(per_study.values())
        if kill_after is not None and killed_at is None and filed >= kill_after:
            pool[0].send_signal(signal.SIGKILL)  # kill -9, mid-batch
            pool[0].wait()
            killed_at = filed
            pool[0] = _worker(env, log)
        if (
            broker is not None
            and restart_broker_after is not None
            and restarted_at is None
            and filed >= restart_broker_after
        ):
            broker.restart()  # its queued messages are gone: the sweeps must make up
            restarted_at = filed
        # Done when every study has its report and no job is left open: a job killed after
        # filing, before closing, runs again once its lease lapses (and files nothing new).
        if all(per_study[f"ImagingStudy/{i}"] for i in ids) and store.jobs.queue_depth(model) == 0:
            break
        time.sleep(0.2)
    seconds = time.monotonic() - started
    time.sleep(1.0)  # anything still in flight lands before the count
    per_study = _ai_reports(sandbox)
    for worker in pool:
        worker.send_signal(signal.SIGTERM)
    for worker in pool:
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            worker.kill()
    service_server.shutdown()
    sandbox_server.shutdown()
    sandbox.close()

    latencies = _latencies(database, database_url)
    counts = [per_study[f"ImagingStudy/{i}"] for i in ids]
    return Burst(
        studies=studies,
        reports=sum(counts),
        duplicates=sum(1 for c in counts if c > 1),
        missing=sum(1 for c in counts if c == 0),
        killed_at_reports=killed_at,
        seconds=seconds,
        latencies_s=latencies,
    )


LATENCY_SQL = (
    "SELECT r.created_at - j.created_at FROM results r JOIN jobs j "
    "ON j.source = r.source AND j.study_uid = r.study_uid "
    "AND j.model_id = r.model_id AND j.status = 'done'"
)


def _latencies(database: Path, database_url: str | None) -> list[float]:
    """Queued -> result seconds of each finished job (read from the database itself)."""
    if database_url is not None:
        import psycopg

        with psycopg.connect(database_url) as conn:
            return [float(r[0]) for r in conn.execute(LATENCY_SQL)]
    with sqlite3.connect(database) as conn:
        return [float(r[0]) for r in conn.execute(LATENCY_SQL)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--kill-after", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lease", type=float, default=15.0)
    parser.add_argument(
        "--queue",
        choices=("embedded", "celery"),
        default="embedded",
        help="celery: PostgreSQL + Celery on Redis, both started here on loopback",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument(
        "--restart-broker-after", type=int, help="celery: restart Redis after N reports"
    )
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log per request
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as servers:
        scale: dict[str, Any] = {}
        if args.queue == "celery":
            from tests import services  # the same real servers the tests start

            postgres = servers.enter_context(services.postgres_server())
            redis = servers.enter_context(services.redis_server())
            scale = {
                "database_url": postgres.create_database("burst"),
                "broker": redis,
                "restart_broker_after": args.restart_broker_after,
            }
        burst = run_burst(
            Path(tmp),
            args.studies,
            kill_after=args.kill_after,
            batch_size=args.batch_size,
            lease_s=args.lease,
            workers=args.workers,
            **scale,
        )
    lat = sorted(burst.latencies_s)
    p95 = lat[int(0.95 * (len(lat) - 1))] if lat else float("nan")
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} CPUs; simulated backend")
    print(f"queue: {args.queue}, {args.workers} worker process(es), batches of {args.batch_size}")
    if args.restart_broker_after is not None:
        print(f"Redis restarted after {args.restart_broker_after} reports")
    print(f"studies created in a burst: {burst.studies}")
    print(f"worker killed (SIGKILL) after {burst.killed_at_reports} reports, restarted")
    print(f"AI DiagnosticReports in the EHR: {burst.reports}")
    print(f"studies with two or more reports: {burst.duplicates}; with none: {burst.missing}")
    print(f"all filed in {burst.seconds:.1f} s: {burst.studies / burst.seconds:.1f} studies/s")
    if lat:
        print(f"queued -> result latency: p50 {statistics.median(lat):.2f} s, p95 {p95:.2f} s")
    print("exactly once:", "yes" if burst.exactly_once else "NO")
    return 0 if burst.exactly_once else 1


if __name__ == "__main__":
    raise SystemExit(main())
