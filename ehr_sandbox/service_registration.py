"""What an EHR administrator does for a new CDS service, done for the local sandbox: register
it as a SMART Backend Services client (read studies and images, file reports, subscribe to
new films) and write the files the service's settings name:

- ``cds-service/ehr-clients.json``    -> CXR_CDS_EHR_CLIENTS
- ``cds-service/trusted-issuers.json`` -> CXR_CDS_TRUSTED_ISSUERS (the sandbox's CDS client)
- ``cds-service/backend.jwk.json``     the service's private key (the sandbox keeps the public)
- ``cds-service/notification-token.txt`` the secret the sandbox's Subscriptions send
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from ehr_sandbox.app import Sandbox
from ehr_sandbox.cds_client import SigningKey

SERVICE_CLIENT_ID = "cxr-cds-service"
# Read studies and images, file the AI report, and subscribe to new films.
SERVICE_SCOPE = (
    "system/ImagingStudy.rs system/Endpoint.rs system/Media.rs system/Binary.rs "
    "system/DiagnosticReport.c system/Observation.c system/Device.c system/Provenance.c "
    "system/Subscription.crus"
)


@dataclass(frozen=True)
class ServiceFiles:
    folder: Path
    ehr_clients: Path
    trusted_issuers: Path


def _private(path: Path, text: str) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def register_service(sandbox: Sandbox, base_url: str) -> ServiceFiles:
    """Register the CDS service with the sandbox (idempotent: the key and token are kept)."""
    folder = sandbox.settings.data_dir / "cds-service"
    folder.mkdir(parents=True, exist_ok=True)
    key = SigningKey.load_or_create(folder / "backend.jwk.json")
    sandbox.backend.register(SERVICE_CLIENT_ID, key.public_jwks(), SERVICE_SCOPE)
    token = folder / "notification-token.txt"
    if not token.exists():
        _private(token, secrets.token_urlsafe(32))
    fhir = f"{base_url}/fhir"
    clients = folder / "ehr-clients.json"
    clients.write_text(
        json.dumps(
            [
                {
                    "fhir_base": fhir,
                    "token_url": f"{base_url}/auth/token",
                    "client_id": SERVICE_CLIENT_ID,
                    "jwk_file": str((folder / "backend.jwk.json").resolve()),
                    "notification_token_file": str(token.resolve()),
                }
            ],
            indent=2,
        ),
        encoding="utf-8",
    )
    issuers = folder / "trusted-issuers.json"
    issuers.write_text(
        json.dumps(
            [
                {
                    "iss": base_url,
                    "jwks_url": f"{base_url}/.well-known/jwks.json",
                    "fhir_servers": [fhir],
                }
            ],
            indent=2,
        ),
        encoding="utf-8",
    )
    return ServiceFiles(folder, clients, issuers)
