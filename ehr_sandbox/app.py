"""The EHR sandbox application: FHIR R4 API, SMART authorization server, the CDS client's JWKS."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from flask import Flask, Response, jsonify, request

from ehr_sandbox.access_tokens import TokenStore
from ehr_sandbox.auth.smart_store import SmartStore
from ehr_sandbox.auth.web import SmartAuth, capability_security
from ehr_sandbox.backend_auth import BackendServices
from ehr_sandbox.cds_client import SigningKey
from ehr_sandbox.fhir.store import FhirStore
from ehr_sandbox.notifier import DeliverySettings, SubscriptionNotifier
from ehr_sandbox.secret_files import form_secret
from ehr_sandbox.web.fhir_api import MAX_BODY_BYTES, create_fhir_blueprint

log = logging.getLogger(__name__)

SANDBOX_CLIENT_ID = "cxr-cds-sandbox-ehr"


@dataclass(frozen=True)
class SandboxSettings:
    """Where the sandbox keeps its state and how it presents itself."""

    data_dir: Path = Path("var/sandbox")
    base_url: str | None = None  # e.g. http://127.0.0.1:8081 ; None: from the request
    open_access: bool = True  # requests without a token are served (like public sandboxes)
    # Subscription notifications: attempts, retry delay and request timeout.
    delivery: DeliverySettings = field(default_factory=DeliverySettings)

    @property
    def database(self) -> Path:
        return self.data_dir / "ehr.sqlite3"

    @property
    def fhir_base(self) -> str | None:
        return self.base_url.rstrip("/") + "/fhir" if self.base_url else None

    @property
    def signing_key_file(self) -> Path:
        return self.data_dir / "cds-client-key.jwk.json"

    @property
    def form_secret_file(self) -> Path:
        """Signs the sign-in forms: one file, so every worker process accepts every form."""
        return self.data_dir / "form-secret.bin"


@dataclass
class Sandbox:
    """The sandbox's parts, for the CLI and tests that drive it in-process."""

    settings: SandboxSettings
    store: FhirStore
    tokens: TokenStore
    key: SigningKey
    backend: BackendServices
    smart: SmartStore
    secret: bytes
    notifier: SubscriptionNotifier  # rest-hook notifications for writes through `store`

    @classmethod
    def open(cls, settings: SandboxSettings) -> Sandbox:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        tokens = TokenStore(settings.database)
        store = FhirStore(settings.database)
        return cls(
            settings=settings,
            store=store,
            tokens=tokens,
            key=SigningKey.load_or_create(settings.signing_key_file),
            backend=BackendServices(settings.database, tokens),
            smart=SmartStore(settings.database),
            secret=form_secret(settings.form_secret_file),
            notifier=SubscriptionNotifier(
                store, fhir_base=settings.fhir_base, delivery=settings.delivery
            ),
        )

    def close(self) -> None:
        """Stop the subscription delivery threads (call when the server has stopped)."""
        self.notifier.close()


def create_app(settings: SandboxSettings | None = None, sandbox: Sandbox | None = None) -> Flask:
    sandbox = sandbox or Sandbox.open(settings or SandboxSettings())
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    if sandbox.settings.fhir_base:
        app.config["FHIR_BASE_URL"] = sandbox.settings.fhir_base
    app.extensions["ehr_sandbox"] = sandbox
    base = sandbox.settings.base_url.rstrip("/") if sandbox.settings.base_url else None
    # SMART authorization server, token endpoint and the FHIR API's scope/compartment policy.
    SmartAuth(
        app,
        store=sandbox.store,
        tokens=sandbox.tokens,
        backend=sandbox.backend,
        smart=sandbox.smart,
        base_url=base,
        open_access=sandbox.settings.open_access,
        secret=sandbox.secret,
    )
    security = capability_security(base) if base else None
    app.register_blueprint(create_fhir_blueprint(sandbox.store, security), url_prefix="/fhir")

    @app.get("/.well-known/jwks.json")
    def jwks() -> Response:
        return jsonify(sandbox.key.public_jwks())

    @app.get("/")
    def index() -> Response:
        return jsonify(
            {
                "name": "cxr-cds EHR sandbox",
                "fhir": request.host_url + "fhir",
                "jwks": request.host_url + ".well-known/jwks.json",
                "smart_configuration": request.host_url + "fhir/.well-known/smart-configuration",
                "ehr_launch": request.host_url + "ehr/launch",
            }
        )

    return app
