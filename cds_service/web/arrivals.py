"""Arrival triggers over HTTP: the FHIR Subscription (R4 rest-hook) notification receiver and
the REST API for analyses, with its OpenAPI document. Both end in the jobs layer's one
idempotent enqueue (cds_service.jobs.arrivals)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from flask import Blueprint, Response, jsonify, request

from cds_service.config import Settings, TrustedIssuer
from cds_service.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    ServiceUnavailable,
    Unauthorized,
    UnprocessableEntity,
)
from cds_service.fhir.client import FhirAccessDenied, FhirError, FhirNotFound
from cds_service.jobs.arrivals import NOTIFICATIONS_PATH, Arrival, Arrivals, NoSourceAccess
from cds_service.sources import canonical_fhir_base
from cds_service.storage.ports import Analysis
from cds_service.web.cds_hooks import json_body

log = logging.getLogger(__name__)

AI_NOTICE = (
    "AI-generated, preliminary: not reviewed by a radiologist. A finding the model does not "
    "report is not evidence of its absence."
)


@contextmanager
def _source_errors() -> Iterator[None]:
    """What went wrong reading the study, as the caller should hear it (never a traceback)."""
    try:
        yield
    except NoSourceAccess as exc:
        raise Conflict(str(exc)) from exc
    except FhirNotFound as exc:
        raise NotFound("no such ImagingStudy at that FHIR server") from exc
    except FhirAccessDenied as exc:
        raise ServiceUnavailable(
            f"the FHIR server refused the service's access ({exc}); check its registration"
        ) from exc
    except FhirError as exc:
        raise ServiceUnavailable(f"the FHIR server could not be read ({exc}); try again") from exc
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc


def create_arrivals_blueprint(
    settings: Settings,
    arrivals: Arrivals,
    authenticate: Callable[[], TrustedIssuer | None],
) -> Blueprint:
    bp = Blueprint("arrivals", __name__)

    # -- FHIR Subscription notifications ------------------------------------------------------
    def notifying_source() -> str:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        source = arrivals.source_for_token(token.strip()) if scheme.lower() == "bearer" else None
        if source is None:
            # The EHR's Subscription may go to "error" after a few of these: say so here.
            log.warning(
                "notification refused (401): %s; check the EHR's Subscription channel.header "
                "against the notification_token_file in CXR_CDS_EHR_CLIENTS",
                "no bearer token" if not token.strip() else "unknown token",
            )
            raise Unauthorized("unknown notification sender: send the channel.header token")
        return source

    def notified(found: list[Arrival]) -> Response:
        queued = sum(a.outcome == "queued" for a in found)
        log.info("subscription notification: %d studies, %d queued", len(found), queued)
        return jsonify({"studies": len(found), "queued": queued})

    @bp.post(NOTIFICATIONS_PATH)
    def notification() -> Response:
        """Empty (R4 'empty' payload: query the source) or a Bundle naming the changes."""
        source = notifying_source()
        body = None
        if request.get_data(cache=True):
            body = json_body()
            if not isinstance(body, dict):
                raise BadRequest("a notification body must be a FHIR Bundle")
        with _source_errors():
            return notified(arrivals.notification(source, body))

    @bp.put(f"{NOTIFICATIONS_PATH}/ImagingStudy/<study_id>")
    def full_resource(study_id: str) -> Response:
        """R4 full-resource payload: the resource PUT to endpoint/[type]/[id]. The study is
        read again from the EHR; the body is never taken as the study itself."""
        source = notifying_source()
        with _source_errors():
            return notified([arrivals.study(source, f"ImagingStudy/{study_id}")])

    # -- REST API ---------------------------------------------------------------------------
    def may_name(issuer: TrustedIssuer | None, fhir_server: str) -> bool:
        if issuer is None:  # authentication off: development only
            return settings.mode == "development"
        return issuer.allows_fhir_server(fhir_server)

    @bp.post("/api/analyses")
    def request_analysis() -> tuple[Response, int]:
        issuer = authenticate()
        body = json_body()
        fhir_server = body.get("fhirServer") if isinstance(body, dict) else None
        study = body.get("imagingStudy") if isinstance(body, dict) else None
        if not isinstance(fhir_server, str) or not isinstance(study, str):
            raise BadRequest(
                'send {"fhirServer": "<FHIR base>", "imagingStudy": "ImagingStudy/<id>"}'
            )
        if not may_name(issuer, fhir_server):
            raise Forbidden("this caller may not name that FHIR server")
        with _source_errors():
            arrival = arrivals.study(fhir_server, study)
        if arrival.outcome == "queue-full":
            raise ServiceUnavailable("the analysis queue is full; try again later")
        if arrival.ref is None or not arrival.accepted:
            raise UnprocessableEntity(f"not analysed: {arrival.outcome.replace('-', ' ')}")
        job_id = arrivals.storage.jobs.latest_job_id(arrival.ref, arrivals.model)
        if job_id is None:  # a result stored without a job (by hand): nothing to point at
            raise UnprocessableEntity("this study has a result but no analysis record")
        analysis = arrivals.storage.jobs.analysis(job_id)
        assert analysis is not None
        return jsonify(analysis_body(analysis)), 201 if arrival.outcome == "queued" else 200

    @bp.get("/api/analyses/<int:analysis_id>")
    def get_analysis(analysis_id: int) -> Response:
        issuer = authenticate()
        analysis = arrivals.storage.jobs.analysis(analysis_id)
        # Another data source's analysis is "not found": ids reveal nothing across sources.
        if analysis is None or not (
            may_name(issuer, analysis.ref.source)
            or (issuer is not None and analysis.ref.source == canonical_fhir_base(issuer.iss))
        ):
            raise NotFound("no such analysis")
        return jsonify(analysis_body(analysis))

    @bp.get("/api/openapi.json")
    def openapi() -> Response:
        return jsonify(openapi_document(settings.public_url))

    return bp


def analysis_body(analysis: Analysis) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": analysis.id,
        "fhirServer": analysis.ref.source,
        "status": analysis.job_status,
        "model": {"id": analysis.model_id, "version": analysis.model_version},
    }
    if analysis.reason:
        body["reason"] = analysis.reason
    result = analysis.result
    if result is not None:
        body["result"] = {
            "status": result.status,
            "notice": AI_NOTICE,
            "simulated": result.model.simulated,
            "reason": result.reason or None,
            "analysedAt": result.analysed_at or None,
            "findings": [
                {"observation": str(f.key), "state": f.state, "evidence": f.evidence}
                for f in result.findings
            ],
            "reportText": result.report_text,
            "diagnosticReport": analysis.filed_location,
        }
    return body


def openapi_document(public_url: str) -> dict[str, Any]:
    """The REST API, as OpenAPI 3.1 (served at /api/openapi.json)."""
    error = {"$ref": "#/components/schemas/Error"}
    analysis = {"$ref": "#/components/schemas/Analysis"}

    def answer(description: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": schema}}}

    errors = {
        "400": answer("Malformed request", error),
        "401": answer(
            "Missing or invalid bearer JWT, or a FHIR server this caller may not name", error
        ),
        "404": answer("No such study at that FHIR server, or no such analysis", error),
        "409": answer("The service has no registered access to that FHIR server", error),
        "422": answer("Not a chest radiograph, or no Study Instance UID", error),
        "503": answer("The FHIR server could not be read, or the queue is full", error),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "CXR CDS analyses",
            "version": "1",
            "description": (
                "Queue the AI analysis of a chest radiograph held by an EHR, and read its "
                "state and result. Results are AI-generated and preliminary. Authenticate "
                "with the same signed JWT as CDS Hooks: a trusted issuer's key, aud = the "
                "URL called; a caller may name only the FHIR servers its configuration lists."
            ),
        },
        "servers": [{"url": public_url or "/"}],
        "components": {
            "securitySchemes": {
                "issuerJwt": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {
                        "error": {"type": "string"},
                        "error_description": {"type": "string"},
                    },
                },
                "AnalysisRequest": {
                    "type": "object",
                    "required": ["fhirServer", "imagingStudy"],
                    "properties": {
                        "fhirServer": {"type": "string", "format": "uri"},
                        "imagingStudy": {"type": "string", "examples": ["ImagingStudy/123"]},
                    },
                },
                "Analysis": {
                    "type": "object",
                    "required": ["id", "fhirServer", "status", "model"],
                    "properties": {
                        "id": {"type": "integer"},
                        "fhirServer": {"type": "string"},
                        "status": {"enum": ["queued", "waiting", "running", "done", "failed"]},
                        "reason": {"type": "string"},
                        "model": {"type": "object"},
                        "result": {"type": "object"},
                    },
                },
            },
        },
        "security": [{"issuerJwt": []}],
        "paths": {
            "/api/analyses": {
                "post": {
                    "summary": "Analyse a study (idempotent: a known study gives its analysis)",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/AnalysisRequest"}
                            }
                        },
                    },
                    "responses": {
                        "201": answer("Queued", analysis),
                        "200": answer("Already queued or analysed", analysis),
                        **errors,
                    },
                }
            },
            "/api/analyses/{id}": {
                "get": {
                    "summary": "An analysis and, when done, its result",
                    "parameters": [
                        {
                            "name": "id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "integer"},
                        }
                    ],
                    "responses": {"200": answer("The analysis", analysis), "404": errors["404"]},
                }
            },
        },
    }
