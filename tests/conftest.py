"""Shared fixtures: a seeded EHR sandbox and the CDS service, both on real sockets."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from joserfc import jwt
from joserfc.jwk import ECKey
from werkzeug.serving import BaseWSGIServer, make_server

from cds_service.composition import Composition
from cds_service.config import Settings, TrustedIssuer
from cds_service.fhir import imaging_study
from cds_service.inference.simulated import SimulatedBackend
from cds_service.jobs.worker import drain
from cds_service.storage.ports import Storage, StudyRef
from cds_service.web.app import create_app
from ehr_sandbox.app import SANDBOX_CLIENT_ID, Sandbox, SandboxSettings
from ehr_sandbox.app import create_app as create_sandbox_app
from ehr_sandbox.cds_client import CdsHooksClient
from ehr_sandbox.seed import seed
from tests import services


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerThread:
    def __init__(self, app: Any, port: int) -> None:
        self.server: BaseWSGIServer = make_server("127.0.0.1", port, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class SandboxHandle:
    base: str
    sandbox: Sandbox
    studies: list[dict[str, Any]]

    @property
    def fhir(self) -> str:
        return f"{self.base}/fhir"

    def token(self, patient: str = "cxr-demo-1") -> str:
        return self.sandbox.tokens.issue(
            SANDBOX_CLIENT_ID, "patient/ImagingStudy.rs", patient
        ).token

    def authorization(self, patient: str = "cxr-demo-1") -> dict[str, Any]:
        return {
            "access_token": self.token(patient),
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "patient/ImagingStudy.rs",
            "subject": SANDBOX_CLIENT_ID,
            "patient": patient,
        }


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxHandle]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    data_dir = tmp_path_factory.mktemp("sandbox")
    box = Sandbox.open(SandboxSettings(data_dir=data_dir, base_url=base))
    studies = seed(box.store)
    server = ServerThread(create_sandbox_app(sandbox=box), port)
    yield SandboxHandle(base=base, sandbox=box, studies=studies)
    server.stop()


@dataclass
class ServiceHandle:
    base: str
    settings: Settings
    store: Storage
    client: CdsHooksClient

    def url(self, service_id: str) -> str:
        return f"{self.base}/cds-services/{service_id}"


def make_service(
    tmp_path: Path,
    sandbox: SandboxHandle,
    extra_fhir_servers: tuple[str, ...] = (),
    **overrides: Any,
) -> tuple[ServiceHandle, ServerThread]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    issuer = TrustedIssuer(
        iss=sandbox.base,
        jwks=sandbox.sandbox.key.public_jwks(),
        fhir_servers=(sandbox.fhir, *extra_fhir_servers),
    )
    fields: dict[str, Any] = {
        "mode": "demo",
        "public_url": base,
        "trusted_issuers": (issuer,),
        "database": tmp_path / "cds.sqlite3",
    }
    fields.update(overrides)
    settings = Settings(**fields).validated()
    parts = Composition(settings)  # SQLite at settings.database, or database_url's PostgreSQL
    store = parts.storage
    server = ServerThread(create_app(parts), port)
    client = CdsHooksClient(sandbox.base, sandbox.sandbox.key)
    return ServiceHandle(base=base, settings=settings, store=store, client=client), server


@pytest.fixture
def service(tmp_path: Path, sandbox: SandboxHandle) -> Iterator[ServiceHandle]:
    handle, server = make_service(tmp_path, sandbox)
    yield handle
    server.stop()


def sign(
    key: ECKey | Any,
    claims: dict[str, Any],
    header: dict[str, Any] | None = None,
    alg: str = "ES384",
) -> str:
    return jwt.encode(
        header or {"alg": alg, "typ": "JWT", "kid": key.kid}, claims, key, algorithms=[alg]
    )


def claims_for(iss: str, aud: str, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": iss,
        "aud": aud,
        "exp": now + 300,
        "iat": now,
        "jti": str(uuid.uuid4()),
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def patient_view_body(patient: str = "cxr-demo-1", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/example", "patientId": patient},
    }
    body.update(extra)
    return body


def analyse_seeded(service: ServiceHandle, sandbox: SandboxHandle) -> None:
    """Analyse every seeded study with the simulated backend, as the worker would."""
    backend = SimulatedBackend()
    for study in sandbox.studies:
        uid = imaging_study.study_uid(study)
        assert uid
        ref = StudyRef(sandbox.fhir, uid, imaging_study.subject_patient_id(study))
        service.store.jobs.enqueue(ref, backend.model, study, sandbox.fhir)
    drain(service.store, backend)


def signed_post(
    service: ServiceHandle, sandbox: SandboxHandle, service_id: str, body: Any
) -> requests.Response:
    """POST to a CDS service endpoint with a fresh, valid JWT from the sandbox's key."""
    url = service.url(service_id)
    token = sign(sandbox.sandbox.key.key, claims_for(sandbox.base, url))
    return requests.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=10)


def start_stub(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    """A throwaway HTTP server on loopback (stub FHIR or JWKS host); returns it and its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def two_issuer_service(
    tmp_path: Path,
    sandbox: SandboxHandle,
    other_iss: str = "https://other-ehr.example",
    other_fhir_servers: tuple[str, ...] = (),
    **overrides: Any,
) -> tuple[ServiceHandle, ServerThread, ECKey, TrustedIssuer]:
    """A service trusting the sandbox and a second CDS client (another EHR, or with
    ``other_fhir_servers`` another client of the same EHR); returns the second one's key."""
    other_key = ECKey.generate_key("P-384", auto_kid=True)
    other = TrustedIssuer(
        iss=other_iss,
        jwks={"keys": [{**other_key.as_dict(private=False), "kid": other_key.kid}]},
        fhir_servers=other_fhir_servers,
    )
    mine = TrustedIssuer(
        iss=sandbox.base, jwks=sandbox.sandbox.key.public_jwks(), fhir_servers=(sandbox.fhir,)
    )
    handle, server = make_service(tmp_path, sandbox, trusted_issuers=(mine, other), **overrides)
    return handle, server, other_key, other


# Real PostgreSQL and Redis on loopback (tests/services.py): one of each per test session,
# started when a test first asks, stopped afterwards. Missing servers fail these tests with
# what to install; CXR_CDS_SKIP_POSTGRES=1 / CXR_CDS_SKIP_REDIS=1 skip them instead.
@pytest.fixture(scope="session")
def postgres_server() -> Iterator[services.PostgresServer]:
    yield from services.for_tests(services.postgres_server, services.SKIP_POSTGRES)


@pytest.fixture
def postgres_dsn(postgres_server: services.PostgresServer) -> Iterator[str]:
    """A fresh, empty database on the session's PostgreSQL; dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield postgres_server.create_database(name)
    postgres_server.drop_database(name)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[services.RedisServer]:
    yield from services.for_tests(services.redis_server, services.SKIP_REDIS)
