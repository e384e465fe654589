"""`cxr-cds demo`: sandbox and service on localhost, seeded studies analysed, a hook fired."""

from __future__ import annotations

import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from werkzeug.serving import BaseWSGIServer, make_server

from cds_service.composition import Composition
from cds_service.config import SERVICE_SCOPE, ConfigurationError, Settings, TrustedIssuer
from cds_service.fhir import imaging_study
from cds_service.fhir.backend_services import EhrClient
from cds_service.inference.registry import SIMULATED_WARNING
from cds_service.jobs.arrivals import NOTIFICATIONS_PATH, SUBSCRIPTION_SCOPE, Arrivals, subscribe
from cds_service.jobs.worker import run_forever
from cds_service.storage.ports import StoredResult, StudyRef
from cds_service.web.app import create_app as create_service_app
from ehr_sandbox.app import SANDBOX_CLIENT_ID, Sandbox, SandboxSettings
from ehr_sandbox.app import create_app as create_sandbox_app
from ehr_sandbox.auth.smart_store import SmartApp
from ehr_sandbox.cds_client import CdsHooksClient, SigningKey, format_cards, hook_context
from ehr_sandbox.seed import seed
from smart_app.web import DATA_SCOPES, DEFAULT_CLIENT_ID

# Write-back, plus reading the studies' images (Media -> Binary, or a DICOMweb Endpoint).

log = logging.getLogger(__name__)
DEMO_PATIENT = "cxr-demo-1"
BACKEND_CLIENT_ID = "cxr-cds-service"
ANALYSIS_TIMEOUT_S = 60.0


def _filed(stored: StoredResult | None) -> bool:
    return stored is not None and stored.filed_location is not None


def _serve(server: BaseWSGIServer, name: str) -> None:
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()


def _banner(lines: list[str]) -> None:
    width = max(len(line) for line in lines) + 4
    print("#" * width)
    for line in lines:
        print(f"# {line.ljust(width - 4)} #")
    print("#" * width)


def register_viewer(sandbox: Sandbox, service_base: str) -> None:
    """Register the service's SMART app (a public client) with the sandbox EHR."""
    sandbox.smart.register_app(
        SmartApp(
            client_id=DEFAULT_CLIENT_ID,
            name="AI chest X-ray viewer",
            redirect_uris=(f"{service_base}/app/callback",),
            launch_url=f"{service_base}/app/launch",
            scope=f"launch launch/patient offline_access online_access {DATA_SCOPES}",
        )
    )


def smart_launch_url(sandbox_base: str, studies: list[dict[str, Any]]) -> str:
    """The sandbox's EHR launch of the viewer on the demo patient's newest study."""
    study = next((s for s in studies if imaging_study.subject_patient_id(s) == DEMO_PATIENT), None)
    query = f"app={DEFAULT_CLIENT_ID}&patient={DEMO_PATIENT}"
    if study is not None:
        query += f"&study={study['id']}"
    return f"{sandbox_base}/ehr/launch?{query}"


def demo_settings(
    env: Mapping[str, str], service_base: str, data_dir: Path, issuer: TrustedIssuer, ehr: EhrClient
) -> Settings:
    """The same CXR_CDS_* settings as `serve` (backend, model, batch size, ...), with demo
    defaults, plus the sandbox as a trusted CDS client and as a registered EHR."""
    defaults = {
        "CXR_CDS_MODE": "demo",
        "CXR_CDS_PUBLIC_URL": service_base,
        "CXR_CDS_DB": str(data_dir / "cds.sqlite3"),
    }
    settings = Settings.from_env({**defaults, **env})
    overrides: dict[str, Any] = {}
    if settings.trust_public_sandbox and not settings.public_sandbox_fhir_servers:
        # CXR_CDS_TRUST_PUBLIC_SANDBOX=1: the public CDS Hooks sandbox, pointed at the demo's
        # EHR sandbox, sees the demo's results (CXR_CDS_PUBLIC_SANDBOX_FHIR_SERVERS replaces it).
        overrides["public_sandbox_fhir_servers"] = issuer.fhir_servers
    return settings.with_overrides(
        trusted_issuers=(*settings.trusted_issuers, issuer),
        ehr_clients=(*settings.ehr_clients, ehr),
        **overrides,
    )


def notification_token(path: Path) -> str:
    """The secret the sandbox's Subscription sends; made once, kept private."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(32), encoding="utf-8")
    return path.read_text(encoding="utf-8").strip()


def ensure_subscription(sandbox: Sandbox, arrivals: Arrivals, ehr: EhrClient, endpoint: str) -> str:
    """Subscribe the service to the sandbox's ImagingStudy changes (once per endpoint)."""
    for existing in sandbox.store.search("Subscription", [("url", endpoint)]).resources:
        if existing.get("status") == "active":
            return f"Subscription/{existing['id']}"
    created = subscribe(arrivals, ehr, endpoint, criteria="ImagingStudy", payload="id-only")
    return f"Subscription/{created['id']}"


def run_demo(
    *, host: str, service_port: int, sandbox_port: int, data_dir: Path, keep_running: bool
) -> int:
    sandbox_base = f"http://{host}:{sandbox_port}"
    service_base = f"http://{host}:{service_port}"
    # The sandbox's absolute URLs follow each request's base, so a proxy in front of it (the
    # SMART launcher) can rewrite them; its own address stays the Backend Services audience.
    sandbox = Sandbox.open(SandboxSettings(data_dir=data_dir / "sandbox", address=sandbox_base))
    sandbox_server = make_server(
        host, sandbox_port, create_sandbox_app(sandbox=sandbox), threaded=True
    )
    _serve(sandbox_server, "ehr-sandbox")

    # The demo trusts the sandbox as a CDS client, with its JWKS inline.
    issuer = TrustedIssuer(
        iss=sandbox_base, jwks=sandbox.key.public_jwks(), fhir_servers=(f"{sandbox_base}/fhir",)
    )
    # The service reads studies, writes reports back and subscribes to new films as a SMART
    # Backend Services client of the sandbox.
    service_key = SigningKey.load_or_create(data_dir / "cds-backend-key.jwk.json")
    register_viewer(sandbox, service_base)
    sandbox.backend.register(
        BACKEND_CLIENT_ID, service_key.public_jwks(), f"{SERVICE_SCOPE} {SUBSCRIPTION_SCOPE}"
    )
    ehr = EhrClient(
        fhir_base=f"{sandbox_base}/fhir",
        token_url=f"{sandbox_base}/auth/token",
        client_id=BACKEND_CLIENT_ID,
        key_file=data_dir / "cds-backend-key.jwk.json",
        scope=SERVICE_SCOPE,
        notification_token=notification_token(data_dir / "notification-token.txt"),
    )
    try:
        settings = demo_settings(os.environ, service_base, data_dir, issuer, ehr)
    except ConfigurationError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        sandbox_server.shutdown()
        return 2
    parts = Composition(settings)
    store = parts.storage
    # The simulated model still gets real pixels: each study's DICOM is read from the
    # sandbox (its Media -> Binary), selected and decoded before the canned report.
    backend = parts.backend()
    if backend.model.simulated:
        _banner([SIMULATED_WARNING[i : i + 90] for i in range(0, len(SIMULATED_WARNING), 90)])
    service_server = make_server(host, service_port, create_service_app(parts), threaded=True)
    _serve(service_server, "cds-service")
    stop = threading.Event()
    threading.Thread(
        target=run_forever,
        args=(store, backend, stop),
        kwargs={
            "filer": parts.report_filer(backend.model),
            "batch_size": settings.model_batch_size,
            "lease_s": settings.job_lease_s,
        },
        name="worker",
        daemon=True,
    ).start()

    # Image arrival as in a hospital: the service subscribes to the EHR's ImagingStudy
    # changes, then the films arrive (the seeding); each notification queues its study.
    arrivals = parts.arrivals
    subscription = ensure_subscription(sandbox, arrivals, ehr, service_base + NOTIFICATIONS_PATH)
    print(f"The service subscribed to new chest films in the sandbox EHR ({subscription}).")
    with sandbox.store.held_changes():  # announce each study once its Media exists too
        studies = seed(sandbox.store)
    pending = [
        StudyRef(f"{sandbox_base}/fhir", uid, imaging_study.subject_patient_id(study))
        for study in studies
        if (uid := imaging_study.study_uid(study)) is not None
    ]
    deadline = time.monotonic() + ANALYSIS_TIMEOUT_S
    while pending and time.monotonic() < deadline:
        # Wait for the notification, the analysis and its write-back to the sandbox EHR.
        pending = [
            ref for ref in pending if not _filed(store.results.get_result(ref, backend.model))
        ]
        time.sleep(0.05)
    if pending:
        print(
            f"warning: {len(pending)} studies not analysed and filed "
            f"within {ANALYSIS_TIMEOUT_S:.0f} s"
        )

    token = sandbox.tokens.issue(SANDBOX_CLIENT_ID, "patient/ImagingStudy.rs", DEMO_PATIENT)
    authorization: dict[str, Any] = {
        "access_token": token.token,
        "token_type": "Bearer",
        "expires_in": token.expires_in,
        "scope": token.scope,
        "subject": SANDBOX_CLIENT_ID,
        "patient": DEMO_PATIENT,
    }
    client = CdsHooksClient(sandbox_base, sandbox.key)
    context = hook_context("patient-view", DEMO_PATIENT, "Practitioner/example")
    calls = client.fire(
        service_base, "patient-view", context, f"{sandbox_base}/fhir", authorization
    )
    filed = sandbox.store.search("DiagnosticReport", [("status", "preliminary")]).total
    print(f"\nAI reports filed to the sandbox EHR (preliminary, AI-labelled): {filed}")
    print(f"\npatient-view hook for Patient/{DEMO_PATIENT}:")
    for call in calls:
        print(format_cards(call))
    print()
    print(f"CDS service discovery: {service_base}/cds-services")
    print(f"EHR sandbox FHIR base: {sandbox_base}/fhir")
    print(f"SMART app (standalone): {service_base}/app/standalone?iss={sandbox_base}/fhir")
    print(f"EHR launch page:       {sandbox_base}/ehr/launch")
    print(f"Open the study viewer: {smart_launch_url(sandbox_base, studies)}")
    print(
        "Fire another hook:     .venv/bin/cxr-cds hook --service "
        f"{service_base} --hook patient-view --patient cxr-demo-2 --fhir {sandbox_base}/fhir "
        f"--key {sandbox.settings.signing_key_file} --sandbox-dir {sandbox.settings.data_dir}"
    )
    if settings.trust_public_sandbox:
        print(
            "CDS Hooks sandbox:      trusted (CXR_CDS_TRUST_PUBLIC_SANDBOX=1); open it with "
            f"?fhirServiceUrl={sandbox_base}/fhir&patientId={DEMO_PATIENT}"
            f"&serviceDiscoveryURL={service_base}/cds-services"
        )
    for prefix in settings.app_fhir_servers:
        print(f"App-only EHR allowed:   {prefix} (CXR_CDS_APP_FHIR_SERVERS)")
    ok = bool(calls) and all(call.status == 200 for call in calls)
    if keep_running:
        print("\nServers keep running; press Ctrl-C to stop.")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    stop.set()
    service_server.shutdown()
    sandbox_server.shutdown()
    sandbox.close()
    return 0 if ok else 1
