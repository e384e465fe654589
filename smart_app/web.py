"""The SMART app's routes: EHR and standalone launch, the OAuth callback, the patient's chest
studies and the study viewer (image, AI report, findings, request analysis, file to chart).

A session is named by an opaque handle in the URL path (`/app/s/<sid>/...`), so the app works
inside an EHR iframe without third-party cookies; the tokens stay on the server."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from threading import Lock
from typing import Any, TypeVar
from urllib.parse import urlsplit

from flask import Blueprint, Response, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException

from cds_service.config import Settings
from cds_service.fhir.client import FhirAccessDenied, FhirClient, FhirError
from cds_service.fhir_out.bundle import transaction_bundle
from cds_service.fhir_out.resources import build_ai_report
from cds_service.imaging.errors import NotAnalysable
from cds_service.imaging.limits import ImageLimits
from cds_service.imaging.retrieval import url_under
from cds_service.inference.registry import device_info
from cds_service.jobs.arrivals import enqueue_arrival
from cds_service.jobs.filing import analysis_time
from cds_service.results import ModelInfo
from cds_service.security.secret_compare import same_secret
from cds_service.sources import canonical_fhir_base
from cds_service.storage.ports import ImageTooLarge, Storage
from smart_app import smart_client, viewer
from smart_app.sessions import (
    PendingLaunch,
    Session,
    SessionStore,
    binding_hash,
    expiry,
)
from smart_app.write import WriteRefused, post_transaction

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_CLIENT_ID = "cxr-cds-viewer"
DATA_SCOPES = (
    "patient/Patient.rs patient/ImagingStudy.rs patient/Media.rs patient/Binary.r "
    "patient/Endpoint.r patient/DiagnosticReport.cruds patient/Observation.cs "
    "patient/Device.cs patient/Provenance.cs"
)
EHR_LAUNCH_SCOPE = f"launch offline_access {DATA_SCOPES}"
STANDALONE_SCOPE = f"launch/patient offline_access {DATA_SCOPES}"
BINDING_COOKIE = "cxr_smart_launch"
# Sec-Fetch-Dest of a navigation inside a frame: there the launch cookie may be dropped
# (third-party cookies blocked), so the user confirms the sign-in on the app's page instead.
FRAME_DESTINATIONS = frozenset({"iframe", "frame"})
NOTICES = {
    "queued": "Analysis requested. The status updates when the model has finished.",
    "already-queued": "An analysis of this study is already queued or running.",
    "filed": "The AI report was filed to the chart as a preliminary, AI-generated report.",
}
PNG_CACHE_SIZE = 16
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def _page(template: str, http_status: int = 200, **values: Any) -> Response:
    body = render_template(template, **values)
    return Response(body, status=http_status, mimetype="text/html")


def _error(title: str, detail: str, status: int = 400) -> Response:
    return _page("smart_app/error.html", status, title=title, detail=detail)


class SmartApp:
    def __init__(self, settings: Settings, storage: Storage, model: ModelInfo) -> None:
        self.settings = settings
        self.storage = storage
        self.model = model
        self.client_id = os.environ.get("CXR_CDS_SMART_CLIENT_ID", DEFAULT_CLIENT_ID)
        database = Path(settings.database)
        self.sessions = SessionStore(database.with_name(f"{database.stem}-smart-app.sqlite3"))
        self._png_cache: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._png_lock = Lock()

    # -- configuration ----------------------------------------------------------------------
    def source_for(self, iss: str) -> str | None:
        """The data source (canonical FHIR base) of a launch from `iss`, when some trusted
        issuer lists it or it is one of the EHRs that only launch the app (the SMART
        launcher). Only these EHRs are contacted: `iss` comes from the browser (SSRF)."""
        if any(issuer.allows_fhir_server(iss) for issuer in self.settings.accepted_issuers()):
            return canonical_fhir_base(iss)
        if any(url_under(iss, base) for base in self.settings.app_fhir_servers):
            return canonical_fhir_base(iss)
        return None

    def ehr_origins(self) -> list[str]:
        origins = []
        servers = [s for i in self.settings.trusted_issuers for s in i.fhir_servers]
        for server in [*servers, *self.settings.app_fhir_servers]:
            parts = urlsplit(server)
            origins.append(f"{parts.scheme}://{parts.netloc}")
        return sorted(set(origins))

    def redirect_uri(self) -> str:
        return f"{self.settings.public_url}/app/callback"

    def secure(self) -> bool:
        return self.settings.public_url.startswith("https://")

    # -- launch -----------------------------------------------------------------------------
    def start(self, iss: str, launch: str | None, scope: str) -> Response:
        iss = iss.rstrip("/")
        source = self.source_for(iss)
        if not iss or source is None:
            return _error(
                "Unknown EHR",
                "This app is not configured for the EHR that launched it (iss). Ask your "
                "administrator to add its FHIR base to a trusted issuer's fhir_servers "
                "(CXR_CDS_TRUSTED_ISSUERS) or, for an EHR that only launches the app (such "
                "as the SMART launcher), a prefix of it to CXR_CDS_APP_FHIR_SERVERS.",
            )
        try:
            config = smart_client.discover(iss)
        except smart_client.SmartError as exc:
            return _error("Cannot start the app", f"The EHR cannot be used: {exc}.", 502)
        binding = secrets.token_urlsafe(32)
        verifier = smart_client.new_code_verifier()
        pending = self.sessions.new_launch(
            iss=iss,
            source=source,
            token_endpoint=config.token_endpoint,
            code_verifier=verifier,
            redirect_uri=self.redirect_uri(),
            browser_binding=binding,
        )
        url = smart_client.authorization_url(
            config,
            client_id=self.client_id,
            redirect_uri=self.redirect_uri(),
            scope=scope,
            state=pending.state,
            code_verifier=verifier,
            iss=iss,
            launch=launch,
        )
        response: Response = redirect(url, 302)  # type: ignore[assignment]
        # Binds the launch to this browser where cookies work; inside an iframe without
        # third-party cookies the server-side state alone carries the launch.
        response.set_cookie(
            BINDING_COOKIE,
            binding,
            max_age=600,
            path="/app/callback",
            httponly=True,
            secure=self.secure(),
            samesite="None" if self.secure() else "Lax",
        )
        return response

    def callback(self) -> Response:
        args = request.args
        if args.get("error"):
            return _error(
                "The EHR did not authorize the app",
                f"{args.get('error')}: {args.get('error_description') or 'no detail given'}",
                403,
            )
        pending = self.sessions.take_launch(args.get("state", ""))
        if pending is None:
            return _error(
                "Sign-in not accepted",
                "The sign-in answer does not match a launch of this app (unknown, expired or "
                "already used 'state'). Nothing was shown. Start the app again from the EHR.",
            )
        cookie = request.cookies.get(BINDING_COOKIE, "")
        proven = bool(cookie) and same_secret(pending.browser_binding, binding_hash(cookie))
        if cookie and not proven:
            return _error(
                "Sign-in not accepted",
                "The sign-in answer belongs to a launch made in another browser.",
            )
        framed = request.headers.get("Sec-Fetch-Dest", "") in FRAME_DESTINATIONS
        if not proven and not framed:
            # A sign-in answer opened by a browser that did not start it (e.g. a link made
            # from someone else's launch) never becomes a session.
            return _error(
                "Sign-in not accepted",
                "This browser did not start this sign-in (the app's launch cookie is "
                "missing). Nothing was shown. Start the app again from the EHR, with the app "
                f"at {self.settings.public_url}/app/launch.",
            )
        code = args.get("code")
        if not code:
            return _error("Sign-in not accepted", "The EHR sent no authorization code.")
        try:
            token = smart_client.exchange_code(
                token_endpoint=pending.token_endpoint,
                client_id=self.client_id,
                redirect_uri=pending.redirect_uri,
                code=code,
                code_verifier=pending.code_verifier,
            )
        except smart_client.SmartError as exc:
            return _error("Sign-in not accepted", f"{exc}. Start the app again from the EHR.")
        fields = _session_fields(pending, token)
        if not proven:
            return self.ask_to_continue(fields)
        return self.open_session(fields)

    def open_session(self, fields: dict[str, Any]) -> Response:
        session = self.sessions.create_session(**fields)
        response: Response = redirect(url_for("smart_app.home", sid=session.sid), 303)  # type: ignore[assignment]
        response.delete_cookie(BINDING_COOKIE, path="/app/callback")
        return response

    def ask_to_continue(self, fields: dict[str, Any]) -> Response:
        """Inside an EHR frame without the launch cookie: show whom the sign-in is for and
        create the session only when the user confirms (POST with the page's CSRF token)."""
        patient = fields.get("patient")
        banner = None
        if patient:
            try:
                client = FhirClient(fields["iss"], fields["access_token"], timeout=(3, 15))
                banner = viewer.patient_banner(client.get_json(f"Patient/{patient}"))
            except FhirError as exc:
                log.warning("sign-in confirmation: patient not read (%s)", type(exc).__name__)
                return _error(
                    "Sign-in not accepted",
                    "The patient of this sign-in could not be read from the EHR. Start the "
                    "app again from the EHR.",
                    502,
                )
        pending = self.sessions.hold_for_confirmation(**fields)
        return _page(
            "smart_app/confirm.html",
            patient=banner,
            ehr=urlsplit(str(fields["iss"])).netloc,
            pending=pending,
        )

    def confirm(self) -> Response:
        if not self.posted_from_own_page():
            # A confirmation form is only answered from the app's own page: a form another
            # site submits (with a confirmation its author fetched) must not plant a session.
            return _error(
                "Sign-in not accepted",
                "This confirmation was not sent from the app's own page. Start the app again "
                "from the EHR.",
                403,
            )
        fields = self.sessions.take_confirmation(
            request.form.get("confirmation", ""), request.form.get("csrf", "")
        )
        if fields is None:
            return _error(
                "Sign-in not accepted",
                "This confirmation is unknown, expired or was already answered. Start the app "
                "again from the EHR.",
                403,
            )
        if request.form.get("decision") != "continue":
            return _error(
                "Not continued",
                "No session was opened. Start the app again from the EHR when you need it.",
                200,
            )
        return self.open_session(fields)

    def posted_from_own_page(self) -> bool:
        """Whether the browser says this POST came from a page of the app's own origin:
        Sec-Fetch-Site, or the Origin header from a browser that sends no Sec-Fetch-Site
        (the app's pages send no referrer, so Chromium's Origin there is "null")."""
        fetch_site = request.headers.get("Sec-Fetch-Site")
        if fetch_site is not None:
            return fetch_site == "same-origin"
        origin = request.headers.get("Origin", "")
        return origin in {_origin(self.settings.public_url), _origin(request.host_url)}

    # -- tokens -----------------------------------------------------------------------------
    def refreshed(self, failed: Session) -> Session:
        """A session with a fresh access token. Concurrent requests of one session (the page
        and its image, maybe in two worker processes) share one refresh."""
        with self.sessions.refresh_lock():
            session = self.sessions.session(failed.sid) or failed
            if session.access_token != failed.access_token and not session.expired:
                return session  # another request refreshed it meanwhile
            if not session.refresh_token:
                raise viewer.ViewerError(
                    "your EHR session has expired; open the app again from the EHR"
                )
            try:
                token = smart_client.refresh(
                    token_endpoint=session.token_endpoint,
                    client_id=self.client_id,
                    refresh_token=session.refresh_token,
                )
            except smart_client.SmartError as exc:
                raise viewer.ViewerError(
                    f"your EHR session could not be renewed ({exc}); open the app again"
                ) from None
            fresh = session.with_tokens(token)
            self.sessions.save(fresh)
        log.info("SMART session token refreshed")
        return fresh

    def with_fhir(self, session: Session, call: Callable[[FhirClient, Session], T]) -> T:
        """Run `call` with a FHIR client holding a live token: refreshed when it has expired,
        and once more when the EHR answers 401 (revoked or expired early)."""
        session = self.sessions.session(session.sid) or session  # latest tokens
        if session.expired:
            session = self.refreshed(session)
        try:
            return call(FhirClient(session.iss, session.access_token, timeout=(3, 15)), session)
        except FhirAccessDenied as exc:
            if "401" not in str(exc):
                raise
        session = self.refreshed(session)
        return call(FhirClient(session.iss, session.access_token, timeout=(3, 15)), session)

    # -- views ------------------------------------------------------------------------------
    def session_or_error(self, sid: str) -> Session | Response:
        session = self.sessions.session(sid)
        if session is None:
            return _error(
                "Session not found",
                "This viewer session is unknown or has ended. Open the app again from the EHR.",
                404,
            )
        return session

    def banner(self, session: Session) -> viewer.PatientBanner | None:
        if not (session.need_patient_banner and session.patient):
            return None
        patient = self.with_fhir(session, lambda f, s: f.get_json(f"Patient/{s.patient}"))
        return viewer.patient_banner(patient)

    def context_study(self, session: Session) -> str | None:
        """The study the launch points at: the card's appContext, else fhirContext."""
        if session.app_context:
            try:
                app_context = json.loads(session.app_context)
            except ValueError:
                app_context = None
            reference = app_context.get("imagingStudy") if isinstance(app_context, dict) else None
            if isinstance(reference, str) and reference.startswith("ImagingStudy/"):
                return reference.split("/", 1)[1]
        for item in session.fhir_context:
            reference = item.get("reference")
            if isinstance(reference, str) and reference.startswith("ImagingStudy/"):
                return reference.split("/", 1)[1]
        return None

    def home(self, session: Session) -> Response:
        study = self.context_study(session)
        if study and not request.args.get("list"):
            return redirect(  # type: ignore[return-value]
                url_for("smart_app.study", sid=session.sid, study_id=study), 303
            )
        if not session.patient:
            return _error("No patient", "The EHR launched the app without a patient.")
        rows = self.with_fhir(
            session,
            lambda f, s: viewer.study_rows(f, str(s.patient), s.source, self.storage, self.model),
        )
        return _page(
            "smart_app/studies.html",
            session=session,
            banner=self.banner(session),
            rows=rows,
            model=self.model,
        )

    def study(self, session: Session, study_id: str) -> Response:
        study = self.with_fhir(session, lambda f, s: viewer.read_study(f, study_id, s.patient))
        stored = viewer.stored_result(self.storage, session.source, study, self.model)
        ref = viewer.study_ref(session.source, study)
        status = viewer.ai_status(self.storage, ref, self.model) if ref else "not analysed"
        device = device_info(self.settings, self.model)
        notice = NOTICES.get(request.args.get("notice", ""))
        return _page(
            "smart_app/study.html",
            session=session,
            banner=self.banner(session),
            study=study,
            study_id=study_id,
            stored=stored,
            ai_state=status,
            model=self.model,
            device=device,
            filing_refusal=viewer.filing_refusal(session.scope),
            notice=notice,
        )

    def image(self, session: Session, study_id: str) -> Response:
        key = (session.sid, study_id)
        with self._png_lock:
            png = self._png_cache.get(key)
        if png is None:

            def load(fhir: FhirClient, s: Session) -> bytes:
                study = viewer.read_study(fhir, study_id, s.patient)
                servers = viewer.image_servers_for(self.settings, s.iss)
                return viewer.study_png(fhir, s.access_token, study, image_servers=servers)

            png = self.with_fhir(session, load)
            with self._png_lock:
                self._png_cache[key] = png
                while len(self._png_cache) > PNG_CACHE_SIZE:
                    self._png_cache.popitem(last=False)
        response = Response(png, mimetype="image/png")
        response.headers["Cache-Control"] = "private, max-age=300"
        return response

    def request_analysis(self, session: Session, study_id: str) -> Response:
        """Queue the study with the DICOM the clinician's token reads (as the viewer shows
        it), so the worker needs no access of its own to this EHR."""
        limits = ImageLimits(
            max_bytes=self.settings.image_max_bytes, max_pixels=self.settings.image_max_pixels
        )

        def read(fhir: FhirClient, s: Session) -> tuple[dict[str, Any], bytes | None]:
            study = viewer.read_study(fhir, study_id, s.patient)
            if viewer.study_ref(s.source, study) is None:
                return study, None
            servers = viewer.image_servers_for(self.settings, s.iss)
            dicom = viewer.analysable_dicom(fhir, s.access_token, study, servers, limits)
            return study, dicom

        try:
            study, dicom = self.with_fhir(session, read)
        except NotAnalysable as exc:
            return _error(
                "Cannot analyse",
                f"This study has no image the model can analyse: {exc.reason}.",
                422,
            )
        if dicom is None:
            return _error("Cannot analyse", "The study has no DICOM Study UID.")
        try:
            arrival = enqueue_arrival(
                self.storage,
                self.model,
                study,
                session.iss,
                source=session.source,
                dicom=dicom,
                max_dicom_bytes=self.settings.image_max_bytes,
                again=True,
            )
        except ImageTooLarge as exc:
            text = str(exc)
            return _error("Cannot analyse", text[:1].upper() + text[1:] + ".", 413)
        if arrival.outcome == "queue-full":
            return _error("Cannot analyse now", "The analysis queue is full; try later.", 503)
        if arrival.outcome == "not-a-chest-radiograph":
            return _error("Cannot analyse", "The study is not a chest radiograph.", 422)
        notice = "queued" if arrival.outcome == "queued" else "already-queued"
        return redirect(  # type: ignore[return-value]
            url_for("smart_app.study", sid=session.sid, study_id=study_id, notice=notice), 303
        )

    def file_to_chart(self, session: Session, study_id: str) -> Response:
        refusal = viewer.filing_refusal(session.scope)
        if refusal:
            return _error("Cannot file to chart", refusal, 403)

        def file(fhir: FhirClient, s: Session) -> Response:
            study = viewer.read_study(fhir, study_id, s.patient)
            stored = viewer.stored_result(self.storage, s.source, study, self.model)
            if stored is None or stored.result.status != "completed":
                return _error("Cannot file to chart", "There is no completed AI analysis.")
            resources = build_ai_report(
                stored.result,
                study,
                device_info(self.settings, self.model),
                fhir_study_reference=f"ImagingStudy/{study_id}",
                issued=analysis_time(stored.result),
            )
            answer = post_transaction(
                fhir, s.access_token, transaction_bundle(resources), timeout=(3, 15)
            )
            location = _report_location(answer)
            if location:
                self.storage.results.mark_filed(
                    s.source, stored.result.study_uid, self.model, location
                )
            return redirect(  # type: ignore[return-value]
                url_for("smart_app.study", sid=s.sid, study_id=study_id, notice="filed"), 303
            )

        try:
            return self.with_fhir(session, file)
        except WriteRefused as exc:
            log.info("filing to the chart refused by the EHR (%s)", exc.status)
            return _error(
                "The EHR refused to file the report",
                f"The EHR answered HTTP {exc.status}: {exc.message}. Nothing was filed.",
                403 if exc.status in (401, 403) else 422,
            )


def _session_fields(pending: PendingLaunch, token: dict[str, Any]) -> dict[str, Any]:
    """A session's fields from its launch and the EHR's token response."""
    fhir_context = token.get("fhirContext")
    app_context = token.get("appContext")
    return {
        "iss": pending.iss,
        "source": pending.source,
        "token_endpoint": pending.token_endpoint,
        "access_token": str(token["access_token"]),
        "expires_at": expiry(token),
        "scope": str(token.get("scope") or ""),
        "refresh_token": str(token["refresh_token"]) if token.get("refresh_token") else None,
        "patient": str(token["patient"]) if token.get("patient") else None,
        "encounter": str(token["encounter"]) if token.get("encounter") else None,
        "fhir_context": [c for c in fhir_context if isinstance(c, dict)]
        if isinstance(fhir_context, list)
        else [],
        "app_context": app_context if isinstance(app_context, str) else None,
        "need_patient_banner": bool(token.get("need_patient_banner", True)),
    }


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _report_location(answer: dict[str, Any]) -> str | None:
    for entry in answer.get("entry") or []:
        response = entry.get("response") if isinstance(entry, dict) else None
        location = response.get("location") if isinstance(response, dict) else None
        if isinstance(location, str) and location.startswith("DiagnosticReport/"):
            return location
    return None


def _content_security_policy(frame_ancestors: list[str]) -> str:
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; "
        f"frame-ancestors 'self' {' '.join(frame_ancestors)}".rstrip()
    )


def create_smart_blueprint(
    settings: Settings | None = None,
    storage: Storage | None = None,
    model: ModelInfo | None = None,
) -> Blueprint:
    bp = Blueprint(
        "smart_app",
        __name__,
        template_folder="templates",
        static_folder="static",
        static_url_path="/static",
    )
    if settings is None or storage is None or model is None:
        raise ValueError("the SMART app needs the service's settings, result store and model")
    app = SmartApp(settings, storage, model)
    csp = _content_security_policy(app.ehr_origins())

    @bp.after_request
    def headers(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = csp
        response.headers["Referrer-Policy"] = "no-referrer"  # the URL holds the session handle
        response.headers["X-Content-Type-Options"] = "nosniff"
        if response.mimetype == "text/html":
            response.headers["Cache-Control"] = "no-store"
        return response

    def with_session(
        sid: str, view: Callable[[Session], Response], *, form: bool = False
    ) -> Response:
        study_id = request.view_args.get("study_id") if request.view_args else None
        if study_id is not None and (
            not FHIR_ID.fullmatch(str(study_id)) or not str(study_id).strip(".")
        ):
            return _error("Not found", "That is not a FHIR resource id.", 404)
        found = app.session_or_error(sid)
        if isinstance(found, Response):
            return found
        if form and not same_secret(found.csrf, request.form.get("csrf", "")):
            return _error("Form not accepted", "The form has expired; reload the page.", 403)
        try:
            return view(found)
        except viewer.ViewerError as exc:
            text = str(exc)
            return _error("Cannot show this", text[:1].upper() + text[1:] + ".", 502)
        except FhirError as exc:
            log.warning("FHIR call from the viewer failed: %s", type(exc).__name__)
            return _error("The EHR did not answer", "The EHR refused or failed a request.", 502)

    @bp.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        if isinstance(exc, HTTPException):
            return _error(exc.name, exc.description or "", exc.code or 500)
        log.exception("unhandled error in the SMART app")
        return _error("Something went wrong", "The viewer hit an internal error.", 500)

    @bp.get("/launch")
    def launch() -> Response:
        return app.start(request.args.get("iss", ""), request.args.get("launch"), EHR_LAUNCH_SCOPE)

    @bp.get("/standalone")
    def standalone() -> Response:
        iss = request.args.get("iss", "").strip()
        if not iss:
            # Which EHR to sign in to, and how an EHR that only launches the app is allowed.
            return _page(
                "smart_app/standalone.html",
                public_url=settings.public_url,
                servers=sorted({s for i in settings.trusted_issuers for s in i.fhir_servers}),
                prefixes=settings.app_fhir_servers,
            )
        return app.start(iss, None, STANDALONE_SCOPE)

    @bp.get("/callback")
    def callback() -> Response:
        return app.callback()

    @bp.post("/confirm")
    def confirm() -> Response:
        return app.confirm()

    @bp.get("/s/<sid>/")
    def home(sid: str) -> Response:
        return with_session(sid, app.home)

    @bp.get("/s/<sid>/study/<study_id>")
    def study(sid: str, study_id: str) -> Response:
        return with_session(sid, lambda s: app.study(s, study_id))

    @bp.get("/s/<sid>/study/<study_id>/image.png")
    def image(sid: str, study_id: str) -> Response:
        return with_session(sid, lambda s: app.image(s, study_id))

    @bp.post("/s/<sid>/study/<study_id>/analyse")
    def analyse(sid: str, study_id: str) -> Response:
        return with_session(sid, lambda s: app.request_analysis(s, study_id), form=True)

    @bp.post("/s/<sid>/study/<study_id>/file")
    def file(sid: str, study_id: str) -> Response:
        return with_session(sid, lambda s: app.file_to_chart(s, study_id), form=True)

    return bp
