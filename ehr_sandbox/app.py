"""The EHR sandbox application: FHIR R4 API, SMART authorization server, the CDS client's JWKS."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from flask import Flask, Response, abort, jsonify, redirect, request

from ehr_sandbox.access_tokens import TokenStore
from ehr_sandbox.auth.smart_store import SmartStore
from ehr_sandbox.auth.web import SmartAuth, capability_security
from ehr_sandbox.backend_auth import BackendServices
from ehr_sandbox.cds_client import SigningKey
from ehr_sandbox.fhir.search import RESOURCE_TYPE_RE
from ehr_sandbox.fhir.store import FhirStore
from ehr_sandbox.notifier import DeliverySettings, SubscriptionNotifier
from ehr_sandbox.secret_files import form_secret
from ehr_sandbox.web.cors import install_cors
from ehr_sandbox.web.fhir_api import MAX_BODY_BYTES, create_fhir_blueprint

log = logging.getLogger(__name__)

SANDBOX_CLIENT_ID = "cxr-cds-sandbox-ehr"


@dataclass(frozen=True)
class SandboxSettings:
    """Where the sandbox keeps its state and how it presents itself."""

    data_dir: Path = Path("var/sandbox")
    # The public base, e.g. http://127.0.0.1:8081: when set, every absolute URL in answers
    # (fullUrl, Bundle.link, Location, /metadata, smart-configuration, the EHR launch's iss)
    # starts with it, whatever Host the request named, and it is the sandbox's own address
    # (below). None: the URLs follow the base each request came to.
    base_url: str | None = None
    # The sandbox's own address, for a sandbox whose URLs follow each request (a proxy such as
    # the SMART launcher reaches it under another host:port): the audience Backend Services
    # assertions must name (never taken from Host) and the base of Subscription
    # notifications. base_url, when set, is both.
    address: str | None = None
    open_access: bool = True  # requests without a token are served (like public sandboxes)
    # Subscription notifications: attempts, retry delay and request timeout.
    delivery: DeliverySettings = field(default_factory=DeliverySettings)

    @property
    def database(self) -> Path:
        return self.data_dir / "ehr.sqlite3"

    @property
    def own_url(self) -> str | None:
        """The sandbox's own address: base_url, else address."""
        own = self.base_url or self.address
        return own.rstrip("/") if own else None

    @property
    def fhir_base(self) -> str | None:
        """The FHIR base at the sandbox's own address (Subscription notifications)."""
        return f"{self.own_url}/fhir" if self.own_url else None

    @property
    def public_fhir_base(self) -> str | None:
        """The FHIR base every answer names, when fixed (base_url set)."""
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
    if sandbox.settings.public_fhir_base:
        app.config["FHIR_BASE_URL"] = sandbox.settings.public_fhir_base
    app.extensions["ehr_sandbox"] = sandbox
    # Preflights are answered before the token check; every FHIR answer carries CORS headers.
    install_cors(app)
    # SMART authorization server, token endpoint and the FHIR API's scope/compartment policy.
    auth = SmartAuth(
        app,
        store=sandbox.store,
        tokens=sandbox.tokens,
        backend=sandbox.backend,
        smart=sandbox.smart,
        base_url=sandbox.settings.own_url,
        public_base_url=sandbox.settings.base_url,
        open_access=sandbox.settings.open_access,
        secret=sandbox.secret,
    )
    app.register_blueprint(
        create_fhir_blueprint(sandbox.store, lambda: capability_security(auth.base())),
        url_prefix="/fhir",
    )

    @app.get("/.well-known/jwks.json")
    def jwks() -> Response:
        return jsonify(sandbox.key.public_jwks())

    @app.get("/")
    def index() -> Response:
        base = auth.base()
        return jsonify(
            {
                "name": "cxr-cds EHR sandbox",
                "fhir": f"{base}/fhir",
                "jwks": f"{base}/.well-known/jwks.json",
                "smart_configuration": f"{base}/fhir/.well-known/smart-configuration",
                "ehr_launch": f"{base}/ehr/launch",
            }
        )

    @app.get("/<rtype>", strict_slashes=False)
    def search_outside_the_base(rtype: str) -> Response:
        """`GET /Encounter/?...` at the root: sent to the FHIR base. The SMART launcher's
        automatic encounter pick builds `new URL("/Encounter/?...", fhirServer)`, which drops
        the base's path; a redirect (followed by fetch) brings it to `/fhir/Encounter/`."""
        if not RESOURCE_TYPE_RE.match(rtype):
            abort(404)
        query = request.query_string.decode("latin-1")
        target = f"/fhir/{rtype}/" + (f"?{query}" if query else "")
        return redirect(target, 307)  # type: ignore[return-value]

    return app
