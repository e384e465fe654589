"""The sandbox's SMART on FHIR authorization server (authlib) and the FHIR API's access policy.

Routes: `/fhir/.well-known/smart-configuration`, `/auth/authorize` (sign-in and patient
picker for standalone launches; EHR launches are approved from their launch context),
`/auth/token` (authorization_code + PKCE S256, refresh_token, and Backend Services
client_credentials), `/ehr/launch` (the EHR's launch page for registered apps) and
`POST /fhir/_services/smart/Launch` (launch ids for a CDS Hooks card's SMART link).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2 import OAuth2Error
from flask import Blueprint, Flask, Response, jsonify, redirect, render_template, request

from ehr_sandbox.access_tokens import TokenStore
from ehr_sandbox.auth.compartment import PatientCompartment
from ehr_sandbox.auth.grants import (
    USER_TOKEN_LIFETIME_S,
    Approval,
    CodeRecord,
    S256Only,
    SmartAuthorizationCodeGrant,
    SmartClient,
    SmartRefreshTokenGrant,
    save_token,
)
from ehr_sandbox.auth.policy import (
    PUBLIC_FHIR_PATHS,
    Denial,
    anonymous_read_allowed,
    check_request,
    restricted_patient,
)
from ehr_sandbox.auth.scopes import grantable
from ehr_sandbox.auth.smart_store import LaunchContext, SmartStore
from ehr_sandbox.backend_auth import BackendServices, TokenError
from ehr_sandbox.fhir.search import request_search_pairs
from ehr_sandbox.fhir.store import FhirStore
from ehr_sandbox.web.fhir_api import restrict_results

log = logging.getLogger(__name__)

SANDBOX_USERS = {
    "Practitioner/sandbox-clinician": "Dr Sam Rivera (sandbox clinician)",
    "Practitioner/sandbox-radiologist": "Dr Noor Haddad (sandbox radiologist)",
}
# SMART App Launch 2.x scopes this server understands (v2 letters; v1 .read/.write also work).
# No OpenID Connect id_token is issued, so `openid fhirUser` are not offered.
SCOPES_SUPPORTED = [
    "launch",
    "launch/patient",
    "offline_access",
    "online_access",
    "patient/*.rs",
    "patient/*.cruds",
    "user/*.rs",
    "user/*.cruds",
    "system/*.cruds",
    "system/*.rs",
    "patient/*.read",
    "patient/*.write",
    "user/*.read",
    "user/*.write",
]
CAPABILITIES = [
    "launch-ehr",
    "launch-standalone",
    "client-public",
    "client-confidential-asymmetric",
    "context-ehr-patient",
    "context-ehr-encounter",
    "context-standalone-patient",
    "context-banner",
    "permission-offline",
    "permission-patient",
    "permission-user",
    "permission-v1",
    "permission-v2",
]
STANDALONE_ONLY_SCOPES = frozenset({"launch", "launch/patient"})
# The user an EHR launch is made for (the sandbox has no signed-in EHR user of its own).
LAUNCHING_USER = "Practitioner/sandbox-clinician"
# The HSPC/Logica launch-context API the CDS Hooks sandbox calls before it enables a card's
# SMART link (see `SmartAuth.launch_api`).
LAUNCH_API_PATH = "/fhir/_services/smart/Launch"
PAGE_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; "
    "frame-ancestors 'self'; frame-src http: https:"
)


def smart_configuration(base: str) -> dict[str, Any]:
    return {
        "issuer": base,
        "authorization_endpoint": f"{base}/auth/authorize",
        "token_endpoint": f"{base}/auth/token",
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "token_endpoint_auth_methods_supported": ["none", "private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "scopes_supported": SCOPES_SUPPORTED,
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "capabilities": CAPABILITIES,
    }


def capability_security(base: str) -> dict[str, Any]:
    """CapabilityStatement.rest[0].security for SMART on FHIR (oauth-uris extension)."""
    return {
        "cors": True,
        "service": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                        "code": "SMART-on-FHIR",
                        "display": "SMART-on-FHIR",
                    }
                ],
                "text": "OAuth2 using SMART-on-FHIR profile (see .well-known/smart-configuration)",
            }
        ],
        "extension": [
            {
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [
                    {"url": "authorize", "valueUri": f"{base}/auth/authorize"},
                    {"url": "token", "valueUri": f"{base}/auth/token"},
                ],
            }
        ],
    }


def _operation_outcome(denial: Denial) -> Response:
    response = jsonify(
        {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": denial.code, "diagnostics": denial.text}],
        }
    )
    response.status_code = denial.status
    response.mimetype = "application/fhir+json"
    return response


def _page(template: str, status: int = 200, **values: Any) -> Response:
    response = Response(render_template(template, **values), status=status, mimetype="text/html")
    response.headers["Content-Security-Policy"] = PAGE_CSP
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def _launch_url_key(url: str) -> tuple[str, str, str]:
    """A launch URL as compared with an app's registered one: scheme, host:port and path,
    without query, fragment or trailing slash."""
    parts = urlsplit(url.strip())
    return parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/")


def _reference_id(value: Any, rtype: str) -> str | None:
    """`x` from `x` or `{rtype}/x`; None for anything else."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip().removeprefix(f"{rtype}/")
    return text if "/" not in text else None


def _error_page(title: str, detail: str, status: int = 400) -> Response:
    return _page("auth_error.html", status, title=title, detail=detail)


def _token_error(status: int, error: str, description: str) -> Response:
    response = jsonify({"error": error, "error_description": description})
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    return response


class SmartAuth:
    """Wires the SMART pieces into the sandbox's Flask app."""

    def __init__(
        self,
        app: Flask,
        *,
        store: FhirStore,
        tokens: TokenStore,
        backend: BackendServices,
        smart: SmartStore,
        base_url: str | None,
        open_access: bool,
        secret: bytes,
        public_base_url: str | None = None,
    ) -> None:
        self.store = store
        self.tokens = tokens
        self.backend = backend
        self.smart = smart
        # The sandbox's own address (the audience of Backend Services assertions); URLs in
        # answers use the public base when one is set, else the base the request came to.
        # (SandboxSettings: base_url is both; `address` only the first.)
        self.configured_base = base_url.rstrip("/") if base_url else None
        self.public_base = public_base_url.rstrip("/") if public_base_url else None
        self.open_access = open_access
        self.secret = secret
        self.server = AuthorizationServer()
        self.server.init_app(app, query_client=self._query_client, save_token=self._save_token)
        self.server.smart_store = smart
        self.server.token_store = tokens
        self.server.register_grant(SmartAuthorizationCodeGrant, [S256Only(required=True)])
        self.server.register_grant(SmartRefreshTokenGrant)
        app.config.setdefault("OAUTH2_REFRESH_TOKEN_GENERATOR", True)
        app.config.setdefault(
            "OAUTH2_TOKEN_EXPIRES_IN",
            {"authorization_code": USER_TOKEN_LIFETIME_S, "refresh_token": USER_TOKEN_LIFETIME_S},
        )
        self.server.load_config(app.config)
        app.before_request(self.check_token)
        app.register_blueprint(self.blueprint())

    # -- authlib callbacks ------------------------------------------------------------------
    def _query_client(self, client_id: str) -> SmartClient | None:
        registered = self.smart.app(client_id)
        return SmartClient(registered) if registered else None

    def _save_token(self, token: dict[str, Any], oauth_request: Any) -> None:
        code = getattr(oauth_request, "authorization_code", None)
        save_token(
            token,
            oauth_request.client,
            oauth_request.user,
            self.tokens,
            self.smart,
            code.record.code if isinstance(code, CodeRecord) else None,
        )

    # -- helpers ----------------------------------------------------------------------------
    def base(self) -> str:
        """The base of absolute URLs in this answer: the configured public base, else the
        one the request came to (a proxy's upstream address, e.g. the SMART launcher's)."""
        return self.public_base or request.url_root.rstrip("/")

    def fhir_base(self) -> str:
        return f"{self.base()}/fhir"

    def csrf_token(self, bound_to: str) -> str:
        return hmac.new(self.secret, bound_to.encode("utf-8"), hashlib.sha256).hexdigest()

    def csrf_ok(self, bound_to: str) -> bool:
        return hmac.compare_digest(request.form.get("csrf", ""), self.csrf_token(bound_to))

    def patients(self) -> list[dict[str, Any]]:
        return self.store.search("Patient", [("_count", "200")]).resources

    # -- FHIR API policy --------------------------------------------------------------------
    def check_token(self) -> Response | None:
        if not request.path.startswith("/fhir") or request.path in PUBLIC_FHIR_PATHS:
            return None
        if request.path == LAUNCH_API_PATH:
            return None  # not a FHIR interaction: `launch_api` checks its own caller
        header = request.headers.get("Authorization")
        if header is None:
            # Reads may be open (like public sandboxes); writes always need a token.
            if self.open_access and anonymous_read_allowed(request.method, request.path):
                return None
            return _operation_outcome(Denial(401, "login", "a bearer token is required"))
        token = self.tokens.lookup(header[7:].strip()) if header.startswith("Bearer ") else None
        if token is None:
            return _operation_outcome(
                Denial(401, "login", "the bearer token is unknown or expired")
            )
        body = request.get_data(cache=True) if request.method not in ("GET", "HEAD") else b""
        posted_form = (
            request.method == "POST"
            and request.path.endswith("/_search")
            and request.mimetype in ("", "application/x-www-form-urlencoded")
        )
        # Read exactly as the FHIR API reads them (a form without a Content-Type included).
        params = request_search_pairs(request.query_string, body if posted_form else None)
        if_none_exist = request.headers.get("If-None-Exist", "").strip() or None
        denial = check_request(
            token, request.method, request.path, params, body, self.store, if_none_exist
        )
        if denial:
            return _operation_outcome(denial)
        patient = restricted_patient(token, request.method, request.path, body, if_none_exist)
        if patient is not None:
            # Whatever the query asked, the answers stay inside the patient's compartment.
            restrict_results(PatientCompartment(self.store, patient).contains)
        return None

    # -- routes -----------------------------------------------------------------------------
    def blueprint(self) -> Blueprint:
        bp = Blueprint(
            "smart_auth", __name__, template_folder=str(Path(__file__).parent / "templates")
        )

        @bp.get("/fhir/.well-known/smart-configuration")
        def discovery() -> Response:
            return jsonify(smart_configuration(self.base()))  # CORS: ehr_sandbox.web.cors

        @bp.post(LAUNCH_API_PATH)
        def launch_api() -> Response:
            return self.launch_api()

        @bp.route("/auth/authorize", methods=["GET", "POST"])
        def authorize() -> Response:
            return self.authorize()

        @bp.post("/auth/token")
        def token() -> Response:
            return self.token()

        @bp.get("/ehr/launch")
        def ehr_launch() -> Response:
            return self.ehr_launch()

        return bp

    def authorize(self) -> Response:
        args = request.args
        aud = (args.get("aud") or request.form.get("aud") or "").rstrip("/")
        try:
            grant = self.server.get_consent_grant(end_user=None)
        except OAuth2Error as error:
            if getattr(error, "redirect_uri", None):
                return self.server.handle_error_response(None, error)
            return _error_page(
                "Authorization refused",
                f"{error.error}: {error.description or 'unknown client or redirect URI'}",
            )
        # This EHR is named by the base the request came to, and by its configured address.
        own = {self.fhir_base()}
        if self.configured_base:
            own.add(f"{self.configured_base}/fhir")
        if aud not in own:
            # SMART App Launch: the app names the FHIR server it will use; a mismatch could
            # send the token to another server, so the EHR refuses outright.
            return _error_page(
                "Authorization refused",
                "The app asked for access to a FHIR server ('aud') that is not this EHR's "
                f"({self.fhir_base()}). No token was issued.",
            )
        client: SmartClient = grant.client
        requested = str(args.get("scope", ""))
        launch = args.get("launch")
        if launch:
            context = self.smart.launch(launch, client.client_id)
            if context is None:
                return _error_page(
                    "Launch expired or unknown",
                    "This EHR launch is unknown, expired or was made for another app. "
                    "Start the app again from the EHR.",
                )
            scope = grantable(requested, client.app.scope)
            return self._approve(grant, Approval(context, scope))
        return self._standalone(grant, client, requested)

    def _approve(self, grant: Any, approval: Approval) -> Response:
        return self.server.create_authorization_response(grant_user=approval, grant=grant)

    def _standalone(self, grant: Any, client: SmartClient, requested: str) -> Response:
        bound_to = request.query_string.decode("ascii", "replace")
        offered = [s for s in grantable(requested, client.app.scope).split() if s != "launch"]
        patients = self.patients()
        if request.method == "GET":
            return _page(
                "authorize.html",
                app_name=client.app.name,
                users=SANDBOX_USERS,
                patients=patients,
                scopes=offered,
                csrf=self.csrf_token(bound_to),
                needs_patient="launch/patient" in requested.split(),
            )
        if not self.csrf_ok(bound_to):
            return _error_page("Form expired", "The sign-in form was not accepted; try again.")
        if request.form.get("decision") != "allow":
            return self._approve(grant, None)  # type: ignore[arg-type]  # authlib: access_denied
        user = request.form.get("user", "")
        patient = request.form.get("patient") or None
        if user not in SANDBOX_USERS:
            return _error_page("Sign-in failed", "Choose one of the sandbox users.")
        known = {str(p.get("id")) for p in patients}
        if "launch/patient" in requested.split() and patient not in known:
            return _error_page("No patient chosen", "Choose a patient for the app.")
        chosen = set(request.form.getlist("grant_scope"))
        scope = " ".join(s for s in offered if s in chosen)
        context = LaunchContext(user=user, patient=patient, need_patient_banner=True)
        return self._approve(grant, Approval(context, scope))

    def token(self) -> Response:
        if request.form.get("grant_type") == "client_credentials":
            if not self.configured_base:
                # The expected assertion aud must not come from the caller's Host header.
                return _token_error(503, "server_error", "the sandbox has no base_url configured")
            try:
                body = self.backend.token(request.form, f"{self.configured_base}/auth/token")
            except TokenError as exc:
                return _token_error(exc.status, exc.error, exc.description)
            response = jsonify(body)
            response.headers["Cache-Control"] = "no-store"
            return response
        return self.server.create_token_response()

    def ehr_launch(self) -> Response:
        """The EHR's launch page: pick a patient (and study) and open a registered app, in a
        new page or inside an EHR frame. With app and patient given, it launches at once."""
        apps = self.smart.apps()
        app_id, patient = request.args.get("app"), request.args.get("patient")
        if not (app_id and patient):
            rows = []
            for item in self.patients():
                studies = self.store.search(
                    "ImagingStudy", [("patient", str(item.get("id"))), ("_count", "50")]
                ).resources
                rows.append((item, studies))
            return _page("ehr_launch.html", apps=apps, rows=rows)
        registered = self.smart.app(app_id)
        if registered is None or self.store.read("Patient", patient) is None:
            return _error_page("Cannot launch", "Unknown app or patient.", 404)
        study = request.args.get("study")
        fhir_context: list[dict[str, str]] = []
        if study:
            found = self.store.read("ImagingStudy", study)
            if found is None:
                return _error_page("Cannot launch", "Unknown imaging study.", 404)
            if not PatientCompartment(self.store, patient).contains(found):
                return _error_page("Cannot launch", "That imaging study is another patient's.")
            fhir_context.append({"reference": f"ImagingStudy/{study}"})
        context = LaunchContext(
            user=LAUNCHING_USER,
            patient=patient,
            encounter=request.args.get("encounter") or None,
            fhir_context=fhir_context,
            # Inside the EHR frame the EHR shows its own patient banner.
            need_patient_banner=request.args.get("embed") != "1",
            app_context=request.args.get("appContext") or None,
        )
        launch = self.smart.create_launch(registered.client_id, context)
        target = f"{registered.launch_url}?{urlencode({'iss': self.fhir_base(), 'launch': launch})}"
        if request.args.get("embed") == "1":
            return _page("ehr_frame.html", target=target, app_name=registered.name)
        return redirect(target, 302)  # type: ignore[return-value]

    def launch_api(self) -> Response:
        """`POST /fhir/_services/smart/Launch`: the launch-context API of HSPC/Logica
        sandboxes, which the CDS Hooks sandbox calls for every SMART link on a card.

        Body: ``{"launchUrl": "<the link's url>", "parameters": {"patient": "<id>",
        "encounter"?: "<id>", "appContext"?: "<the link's appContext>", ...}}`` (other
        parameters, such as ``smart_messaging_origin``, are ignored). Answer:
        ``{"launch_id": "..."}``: a launch of the registered app whose launch URL is
        ``launchUrl`` (compared without query string), which that app's authorize request
        accepts as ``launch=``; its token response then carries the patient, the encounter
        and the appContext. The id lives for ``LAUNCH_LIFETIME_S`` (10 minutes), like those
        of the EHR launch page.

        Authentication: the CDS Hooks sandbox sends a bearer token only when it was itself
        SMART-launched; against an open FHIR server it sends none. So, like `/ehr/launch`,
        a request without a token is accepted while the sandbox is open (`open_access`, the
        default); a token, when sent, must be valid, and a patient-bound one may only
        launch on its own patient. What an id allows is limited all the same: it works only
        for the app registered with that launch URL, through that app's registered redirect
        URIs and with PKCE, and only for an existing patient (and that patient's encounter).
        """
        header = request.headers.get("Authorization")
        token = None
        if header is not None:
            token = self.tokens.lookup(header[7:].strip()) if header.startswith("Bearer ") else None
            if token is None:
                return _operation_outcome(
                    Denial(401, "login", "the bearer token is unknown or expired")
                )
        elif not self.open_access:
            return _operation_outcome(Denial(401, "login", "a bearer token is required"))
        try:
            body = json.loads(request.get_data(cache=True) or b"null")
        except (ValueError, RecursionError):
            body = None
        if not isinstance(body, dict):
            return _operation_outcome(Denial(400, "structure", "the body must be a JSON object"))
        launch_url, parameters = body.get("launchUrl"), body.get("parameters") or {}
        if not isinstance(launch_url, str) or not launch_url.strip():
            return _operation_outcome(Denial(400, "required", "launchUrl is required"))
        if not isinstance(parameters, dict):
            return _operation_outcome(Denial(400, "structure", "parameters must be an object"))
        wanted = _launch_url_key(launch_url)
        registered = next(
            (a for a in self.smart.apps() if _launch_url_key(a.launch_url) == wanted), None
        )
        if registered is None:
            return _operation_outcome(
                Denial(404, "not-found", f"no registered SMART app launches from {launch_url}")
            )
        patient = _reference_id(parameters.get("patient"), "Patient")
        if patient is None:
            return _operation_outcome(Denial(400, "required", "parameters.patient is required"))
        if self.store.read("Patient", patient) is None:
            return _operation_outcome(Denial(404, "not-found", f"Patient/{patient} is not known"))
        if token is not None and token.patient is not None and token.patient != patient:
            return _operation_outcome(
                Denial(403, "forbidden", "the token is limited to another patient")
            )
        encounter = None
        if parameters.get("encounter") is not None:
            encounter = _reference_id(parameters.get("encounter"), "Encounter")
            found = self.store.read("Encounter", encounter) if encounter else None
            if found is None or not PatientCompartment(self.store, patient).contains(found):
                return _operation_outcome(
                    Denial(404, "not-found", "parameters.encounter is not one of the patient's")
                )
        app_context = parameters.get("appContext")
        context = LaunchContext(
            user=LAUNCHING_USER,
            patient=patient,
            encounter=encounter,
            app_context=app_context if isinstance(app_context, str) and app_context else None,
        )
        response = jsonify({"launch_id": self.smart.create_launch(registered.client_id, context)})
        response.headers["Cache-Control"] = "no-store"
        return response
