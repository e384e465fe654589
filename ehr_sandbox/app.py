"""The EHR sandbox application: FHIR R4 API, the CDS client's JWKS, and token checks."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, Response, jsonify, request

from ehr_sandbox.access_tokens import TokenStore
from ehr_sandbox.backend_auth import BackendServices, TokenError, can_write
from ehr_sandbox.cds_client import SigningKey
from ehr_sandbox.fhir.store import FhirStore
from ehr_sandbox.web.fhir_api import MAX_BODY_BYTES, create_fhir_blueprint

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
    backend: BackendServices

    @classmethod
    def open(cls, settings: SandboxSettings) -> Sandbox:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        tokens = TokenStore(settings.database)
        return cls(
            settings=settings,
            store=FhirStore(settings.database),
            tokens=tokens,
            key=SigningKey.load_or_create(settings.signing_key_file),
            backend=BackendServices(settings.database, tokens),
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


PUBLIC_FHIR_PATHS = frozenset({"/fhir/metadata", "/fhir/.well-known/smart-configuration"})


def _written_types() -> list[str]:
    """The resource types a write request creates or changes (entries of a transaction)."""
    parts = request.path.rstrip("/").split("/")
    if len(parts) >= 3 and parts[2]:
        return [parts[2]]
    try:
        body = json.loads(request.get_data(cache=True))
    except (ValueError, RecursionError):
        return ["Bundle"]  # the FHIR API answers the malformed body itself
    entries = body.get("entry") if isinstance(body, dict) else None
    types = [
        e["resource"].get("resourceType")
        for e in (entries if isinstance(entries, list) else [])
        if isinstance(e, dict) and isinstance(e.get("resource"), dict)
    ]
    return [str(t) for t in types] or ["Bundle"]


def create_app(settings: SandboxSettings | None = None, sandbox: Sandbox | None = None) -> Flask:
    sandbox = sandbox or Sandbox.open(settings or SandboxSettings())
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    if sandbox.settings.base_url:
        app.config["FHIR_BASE_URL"] = sandbox.settings.base_url.rstrip("/") + "/fhir"
    app.extensions["ehr_sandbox"] = sandbox
    app.register_blueprint(create_fhir_blueprint(sandbox.store), url_prefix="/fhir")

    def base_url() -> str:
        return (sandbox.settings.base_url or request.host_url).rstrip("/")

    @app.before_request
    def check_token() -> Response | None:
        if not request.path.startswith("/fhir") or request.path in PUBLIC_FHIR_PATHS:
            return None
        writing = request.method not in ("GET", "HEAD") and not request.path.endswith("/_search")
        header = request.headers.get("Authorization")
        if header is None:
            # Reads may be open (like public sandboxes); writes always need a token.
            if sandbox.settings.open_access and not writing:
                return None
            return _operation_outcome(401, "login", "a bearer token is required")
        token = sandbox.tokens.lookup(header[7:].strip()) if header.startswith("Bearer ") else None
        if token is None:
            return _operation_outcome(401, "login", "the bearer token is unknown or expired")
        if writing:
            interaction = {"PUT": "update", "PATCH": "update", "DELETE": "delete"}.get(
                request.method, "create"
            )
            denied = [t for t in _written_types() if not can_write(token.scope, t, interaction)]
            if denied:
                return _operation_outcome(
                    403, "forbidden", f"the token's scopes do not allow writing {denied[0]}"
                )
        return None

    @app.get("/fhir/.well-known/smart-configuration")
    def smart_configuration() -> Response:
        # SMART App Launch 2.x discovery; the Backend Services part (the SMART app issue adds
        # the authorization endpoint for user-facing launches).
        return jsonify(
            {
                "token_endpoint": f"{base_url()}/auth/token",
                "grant_types_supported": ["client_credentials"],
                "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
                "scopes_supported": ["system/*.cruds", "system/*.rs", "system/*.write"],
                "capabilities": ["client-confidential-asymmetric"],
            }
        )

    @app.post("/auth/token")
    def token_endpoint() -> Response:
        if not sandbox.settings.base_url:
            # The expected assertion aud must not come from the caller's Host header.
            response = jsonify(
                {
                    "error": "server_error",
                    "error_description": "the sandbox has no base_url configured",
                }
            )
            response.status_code = 503
            return response
        try:
            body = sandbox.backend.token(request.form, f"{base_url()}/auth/token")
        except TokenError as exc:
            response = jsonify({"error": exc.error, "error_description": exc.description})
            response.status_code = exc.status
            return response
        response = jsonify(body)
        response.headers["Cache-Control"] = "no-store"
        return response

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
