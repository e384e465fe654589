"""The EHR sandbox application: FHIR R4 API, the CDS client's JWKS, and token checks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, Response, jsonify, request

from ehr_sandbox.access_tokens import TokenStore
from ehr_sandbox.cds_client import SigningKey
from ehr_sandbox.fhir.store import FhirStore
from ehr_sandbox.web.fhir_api import create_fhir_blueprint

log = logging.getLogger(__name__)

SANDBOX_CLIENT_ID = "cxr-cds-sandbox-ehr"


@dataclass(frozen=True)
class SandboxSettings:
    """Where the sandbox keeps its state and how it presents itself."""

    data_dir: Path = Path("var/sandbox")
    base_url: str | None = None  # e.g. http://127.0.0.1:8081 ; None: from the request
    open_access: bool = True  # requests without a token are served (like public sandboxes)

    @property
    def database(self) -> Path:
        return self.data_dir / "ehr.sqlite3"

    @property
    def signing_key_file(self) -> Path:
        return self.data_dir / "cds-client-key.jwk.json"


@dataclass
class Sandbox:
    """The sandbox's parts, for the CLI and tests that drive it in-process."""

    settings: SandboxSettings
    store: FhirStore
    tokens: TokenStore
    key: SigningKey

    @classmethod
    def open(cls, settings: SandboxSettings) -> Sandbox:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        return cls(
            settings=settings,
            store=FhirStore(settings.database),
            tokens=TokenStore(settings.database),
            key=SigningKey.load_or_create(settings.signing_key_file),
        )


def _operation_outcome(status: int, code: str, text: str) -> Response:
    response = jsonify(
        {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": text}],
        }
    )
    response.status_code = status
    response.mimetype = "application/fhir+json"
    return response


def create_app(settings: SandboxSettings | None = None, sandbox: Sandbox | None = None) -> Flask:
    sandbox = sandbox or Sandbox.open(settings or SandboxSettings())
    app = Flask(__name__)
    if sandbox.settings.base_url:
        app.config["FHIR_BASE_URL"] = sandbox.settings.base_url.rstrip("/") + "/fhir"
    app.extensions["ehr_sandbox"] = sandbox
    app.register_blueprint(create_fhir_blueprint(sandbox.store), url_prefix="/fhir")

    @app.before_request
    def check_token() -> Response | None:
        if not request.path.startswith("/fhir") or request.path == "/fhir/metadata":
            return None
        header = request.headers.get("Authorization")
        if header is None:
            if sandbox.settings.open_access:
                return None
            return _operation_outcome(401, "login", "a bearer token is required")
        if not header.startswith("Bearer ") or sandbox.tokens.lookup(header[7:].strip()) is None:
            return _operation_outcome(401, "login", "the bearer token is unknown or expired")
        return None

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
            }
        )

    return app
