"""Application factory for the CDS service (and the SMART app mounted beside it)."""

from __future__ import annotations

import logging
from html import escape
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from cds_service.composition import Composition
from cds_service.config import Settings
from cds_service.errors import CdsServiceError, Unauthorized
from cds_service.inference.registry import device_info
from cds_service.web.arrivals import create_arrivals_blueprint
from cds_service.web.cds_hooks import create_cds_blueprint, request_authenticator
from cds_service.web.metrics import install_metrics

log = logging.getLogger(__name__)

READY_WORKER_S = 30.0  # a worker heartbeat older than this means no worker
STORAGE_RETRY_AFTER_S = 5  # Retry-After of a 503 (database down, queue full, EHR down)
CORS_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Max-Age": "600",
}


MODEL_CARD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>AI model card</title></head><body>
<h1>AI chest radiograph model served by this CDS service</h1>{simulated}
<dl><dt>Model</dt><dd>{model}</dd><dt>Version (weights hash)</dt><dd>{version}</dd>
<dt>Made by</dt><dd>{maker}</dd><dt>Licence</dt><dd>{licence}</dd></dl>
<p>Everything this service produces is AI-generated, preliminary and not reviewed by a
radiologist. A missed finding is never reported as normal: the service says "no major finding
detected by the model".</p>
</body></html>
"""
SIMULATED_NOTE = "<p><strong>SIMULATED: no AI model is loaded; all output is made up.</strong></p>"


def _error_body(status: int, code: str, description: str) -> Response:
    response = jsonify({"error": code, "error_description": description})
    response.status_code = status
    return response


def create_app(setup: Settings | Composition | None = None) -> Flask:
    """Build the WSGI app from the parts of this process (a Composition: the demo and tests
    share its storage and EHR access with a worker), or from settings (production: the
    environment)."""
    parts = setup if isinstance(setup, Composition) else Composition(setup or Settings.from_env())
    settings = parts.settings
    store = parts.storage
    handler = parts.hook_handler
    verifier = parts.jwt_verifier
    if verifier is not None:
        if settings.trust_public_sandbox:
            log.warning(
                "TRUSTING THE PUBLIC CDS HOOKS SANDBOX (CXR_CDS_TRUST_PUBLIC_SANDBOX=1): its "
                "signing key is public, anyone can call as it. For trials without patient data."
            )
    else:
        log.warning(
            "AUTHENTICATION IS OFF (CXR_CDS_AUTH=off, development mode): any caller is "
            "trusted. Never run this way with real patient data."
        )

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.extensions["cxr_cds"] = {"settings": settings, "store": store, "handler": handler}
    app.register_blueprint(create_cds_blueprint(settings, handler, verifier))
    app.register_blueprint(
        create_arrivals_blueprint(
            settings, parts.arrivals, request_authenticator(settings, verifier)
        )
    )

    from smart_app.web import create_smart_blueprint

    app.register_blueprint(create_smart_blueprint(settings, store, parts.model), url_prefix="/app")
    install_metrics(app, settings, store, handler.model)  # GET /metrics, hook latency, errors

    @app.get("/healthz")
    def health() -> Response:
        return jsonify(
            {
                "status": "ok",
                "model": handler.model.label,
                "simulated": handler.model.simulated,
                "queueDepth": store.jobs.queue_depth(handler.model),
            }
        )

    @app.get("/readyz")
    def ready() -> tuple[Response, int]:
        """Ready when the queue answers and a worker of this model (loaded) reported in
        recently without a problem; otherwise 503 with the reasons."""
        reasons: list[str] = []
        try:
            depth = store.jobs.queue_depth(handler.model)
            workers = store.workers.alive(handler.model.label, READY_WORKER_S)
        except store.errors as exc:
            unreachable = {"status": "not-ready", "reasons": [f"job queue unreachable ({exc})"]}
            return jsonify(unreachable), 503
        if settings.queue == "celery" and parts.wakeups.waiting() is None:
            reasons.append(
                "the Celery broker (CXR_CDS_REDIS_URL) does not answer: new jobs wait for a "
                "worker's sweep of the database"
            )
        if not workers:
            reasons.append(
                f"no inference worker for {handler.model.label} reported in the last "
                f"{READY_WORKER_S:.0f} s (not started, crashed, or still loading the model)"
            )
            last_exit = store.workers.last_exit(handler.model.label)
            if last_exit:
                reasons.append(f"last exit: {last_exit}")
        elif all(error for _, error in workers):
            reasons.extend(sorted({str(error) for _, error in workers}))
        body: dict[str, Any] = {
            "status": "not-ready" if reasons else "ready",
            "model": handler.model.label,
            "simulated": handler.model.simulated,
            "workers": len(workers),
            "queueDepth": depth,
        }
        if reasons:
            body["reasons"] = reasons
        return jsonify(body), 503 if reasons else 200

    @app.get("/model-card")
    def model_card() -> Response:
        device = device_info(settings, handler.model)
        body = MODEL_CARD.format(
            model=escape(device.model_id),
            version=escape(device.version),
            maker=escape(device.manufacturer),
            licence=escape(device.licence_note),
            simulated=SIMULATED_NOTE if device.simulated else "",
        )
        response = Response(body, mimetype="text/html")
        response.headers["Content-Security-Policy"] = "default-src 'none'"
        return response

    @app.after_request
    def cors(response: Response) -> Response:
        # CDS Hooks 2.0: browser-based clients need CORS on every endpoint.
        origin = request.headers.get("Origin")
        response.headers["Access-Control-Allow-Origin"] = origin or "*"
        if origin:
            response.headers.add("Vary", "Origin")
        for name, value in CORS_HEADERS.items():
            response.headers[name] = value
        return response

    @app.errorhandler(CdsServiceError)
    def service_error(exc: CdsServiceError) -> Response:
        if isinstance(exc, Unauthorized):
            return _error_body(401, exc.code, "unauthorized")  # no detail to the caller
        response = _error_body(exc.status, exc.code, exc.description)
        if exc.status == 503:  # a full queue, an EHR not answering: worth trying again
            response.headers["Retry-After"] = str(STORAGE_RETRY_AFTER_S)
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return _error_body(
            exc.code or 500, (exc.name or "error").lower().replace(" ", "-"), exc.description or ""
        )

    def storage_down(exc: Exception) -> Response:
        # The database did not answer (PostgreSQL restarting, SQLite locked too long): the
        # caller may try again shortly; nothing was half-done (each write is a transaction).
        log.warning("storage unavailable: %s", type(exc).__name__)
        response = _error_body(
            503, "storage-unavailable", "the service's database is unavailable; try again"
        )
        response.headers["Retry-After"] = str(STORAGE_RETRY_AFTER_S)
        return response

    for error in store.errors:
        app.register_error_handler(error, storage_down)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return _error_body(500, "internal-error", "internal error; see the service log")

    return app


def app_config(app: Flask) -> dict[str, Any]:
    return dict(app.extensions["cxr_cds"])
