"""CDS Hooks 2.0 endpoints: discovery, one endpoint per service, feedback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, jsonify, request

from cds_service.config import Settings, TrustedIssuer
from cds_service.errors import BadRequest, NotFound
from cds_service.hooks import SERVICES, HookHandler, discovery_document
from cds_service.security.client_jwt import ClientJwtVerifier

FEEDBACK_OUTCOMES = frozenset({"accepted", "overridden"})


def json_body() -> Any:
    if not request.is_json:
        raise BadRequest("Content-Type must be application/json")
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        body = None  # nested deeper than the JSON parser allows
    if body is None:
        raise BadRequest("the request body is not valid JSON")
    return body


def _validate_feedback(body: Any) -> list[dict[str, Any]]:
    items = body.get("feedback") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        raise BadRequest("feedback must be a non-empty array")
    for item in items:
        if not isinstance(item, dict):
            raise BadRequest("each feedback item must be an object")
        if not isinstance(item.get("card"), str) or not item["card"]:
            raise BadRequest("feedback.card must be the card's uuid")
        if not isinstance(item.get("outcome"), str) or item["outcome"] not in FEEDBACK_OUTCOMES:
            raise BadRequest("feedback.outcome must be 'accepted' or 'overridden'")
        if not isinstance(item.get("outcomeTimestamp"), str):
            raise BadRequest("feedback.outcomeTimestamp must be an instant")
    return items


def request_authenticator(
    settings: Settings, verifier: ClientJwtVerifier | None
) -> Callable[[], TrustedIssuer | None]:
    """The check of the bearer JWT of the request being served (CDS Hooks and the REST API):
    the trusted issuer, or None when authentication is off (development only)."""

    def authenticate() -> TrustedIssuer | None:
        if verifier is None:
            return None
        # aud must be exactly the URL called (CDS Hooks 2.0 security).
        audience = settings.public_url + request.path
        return verifier.verify(request.headers.get("Authorization"), audience).issuer

    return authenticate


def create_cds_blueprint(
    settings: Settings,
    handler: HookHandler,
    verifier: ClientJwtVerifier | None,
) -> Blueprint:
    bp = Blueprint("cds_hooks", __name__)
    authenticate = request_authenticator(settings, verifier)

    @bp.route("/cds-services", methods=["GET", "OPTIONS"])
    def discovery() -> Response:
        if request.method == "OPTIONS":
            return Response(status=204)
        return jsonify(discovery_document())

    @bp.route("/cds-services/<service_id>", methods=["POST", "OPTIONS"])
    def call_service(service_id: str) -> Response:
        if request.method == "OPTIONS":
            return Response(status=204)
        if service_id not in SERVICES:
            raise NotFound(f"no CDS service with id {service_id!r}")
        issuer = authenticate()
        return jsonify(handler.handle(service_id, json_body(), issuer))

    @bp.route("/cds-services/<service_id>/feedback", methods=["POST", "OPTIONS"])
    def feedback(service_id: str) -> Response:
        if request.method == "OPTIONS":
            return Response(status=204)
        if service_id not in SERVICES:
            raise NotFound(f"no CDS service with id {service_id!r}")
        issuer = authenticate()
        items = _validate_feedback(json_body())
        stored = handler.feedback(service_id, items, issuer)
        return jsonify({"stored": stored, "duplicates": len(items) - stored})

    return bp
