"""Flask blueprint serving the EHR sandbox's FHIR R4 REST API from a FhirStore."""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import json
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

from flask import Blueprint, Response, current_app, g, request
from werkzeug.exceptions import HTTPException
from werkzeug.http import http_date

from ehr_sandbox.fhir.search import (
    RESOURCE_TYPE_RE,
    JsonDict,
    SearchParameterError,
    capability_search_params,
    registered_resource_types,
    request_search_pairs,
)
from ehr_sandbox.fhir.store import (
    ID_RE,
    FhirStore,
    InvalidResourceError,
    MultipleMatchesError,
    SearchResult,
    VersionConflictError,
    now_instant,
)
from ehr_sandbox.fhir.subscription import CAPABILITY_DOCUMENTATION as SUBSCRIPTION_DOCUMENTATION
from ehr_sandbox.fhir.transaction import TransactionError, process_transaction

__all__ = [
    "FHIR_CONTENT_TYPE",
    "MAX_BODY_BYTES",
    "FhirError",
    "create_fhir_blueprint",
    "restrict_results",
]

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
FHIR_CONTENT_TYPE = "application/fhir+json; charset=utf-8"
FHIR_VERSION = "4.0.1"
MAX_BODY_BYTES = 32 * 1024 * 1024
_JSON_MIMETYPES = frozenset({FHIR_JSON, "application/json", "application/json+fhir", "text/json"})
_FORM_MIMETYPE = "application/x-www-form-urlencoded"
_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH"]
_READ_METHODS = ("GET", "HEAD")
_INTERACTIONS = (
    "read",
    "vread",
    "update",
    "delete",
    "history-instance",
    "create",
    "search-type",
)
# CapabilityStatement.rest.resource.documentation for types that need more than their list
# of search parameters (R4 has no element naming a server's Subscription channel types).
_TYPE_DOCUMENTATION = {"Subscription": SUBSCRIPTION_DOCUMENTATION}
_ISSUE_CODES = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    410: "deleted",
    412: "conflict",
    413: "too-long",
    415: "not-supported",
    422: "processing",
    429: "throttled",
}


class FhirError(Exception):
    """An error answered with an OperationOutcome."""

    def __init__(
        self,
        status: int,
        code: str,
        diagnostics: str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.code = code
        self.diagnostics = diagnostics
        self.headers = dict(headers or {})


def operation_outcome(code: str, diagnostics: str, severity: str = "error") -> JsonDict:
    """A single-issue OperationOutcome."""
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


# ---------------------------------------------------------------------------- request helpers


def restrict_results(keep: Callable[[JsonDict], bool]) -> None:
    """Limit what this request may return to the resources `keep` accepts (an access policy
    calls this before the request is served, e.g. for a patient-scoped token)."""
    g.fhir_result_filter = keep


def _visible(resource: JsonDict) -> bool:
    keep: Callable[[JsonDict], bool] | None = g.get("fhir_result_filter")
    return keep is None or keep(resource)


def _outside_restriction(rtype: str, rid: str) -> FhirError:
    return FhirError(403, "forbidden", f"{rtype}/{rid} is outside what this token may read")


def _base_url() -> str:
    configured = current_app.config.get("FHIR_BASE_URL")
    if configured:
        return str(configured).rstrip("/")
    return request.url_root + "fhir"


def _pretty() -> bool:
    return request.args.get("_pretty", "") == "true"


def _query_pairs() -> list[tuple[str, str]]:
    return parse_qsl(request.query_string.decode("utf-8", "replace"), keep_blank_values=True)


def _prefer() -> dict[str, str]:
    prefs: dict[str, str] = {}
    for part in request.headers.get("Prefer", "").replace(";", ",").split(","):
        key, _, value = part.strip().partition("=")
        if key:
            prefs[key.strip().lower()] = value.strip().strip('"').lower()
    return prefs


def _read_body() -> bytes:
    """The request body, refusing anything over ``MAX_BODY_BYTES``. Read through Werkzeug's
    cache, so that a before_request hook may have looked at it first; apps should also set
    ``MAX_CONTENT_LENGTH`` so that a chunked body is cut off while it is read."""
    declared = request.content_length
    if declared is not None and declared > MAX_BODY_BYTES:
        raise FhirError(413, "too-long", f"Request body exceeds {MAX_BODY_BYTES} bytes")
    body = request.get_data(cache=True)
    if len(body) > MAX_BODY_BYTES:
        raise FhirError(413, "too-long", f"Request body exceeds {MAX_BODY_BYTES} bytes")
    return body


def _parse_json_resource(body: bytes, expected_type: str) -> JsonDict:
    if not body.strip():
        raise FhirError(400, "required", "The request body is empty")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise FhirError(400, "structure", f"Malformed JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise FhirError(400, "structure", "The request body must be a JSON object")
    rtype = data.get("resourceType")
    if rtype is None:
        raise FhirError(400, "required", "The resource has no resourceType")
    if rtype != expected_type:
        raise FhirError(
            400, "invalid", f"resourceType {rtype!r} does not match the URL type {expected_type!r}"
        )
    if rtype == "Binary" and isinstance(data.get("data"), str):
        try:
            base64.b64decode("".join(data["data"].split()), validate=True)
        except (binascii.Error, ValueError):
            raise FhirError(400, "value", "Binary.data is not valid base64") from None
    return data


def _body_resource(rtype: str, resource_id: str | None = None) -> JsonDict:
    """The resource in the request body; raw (non-JSON) bodies become a Binary."""
    body = _read_body()
    mimetype = request.mimetype
    if rtype == "Binary" and mimetype and mimetype not in _JSON_MIMETYPES:
        resource: JsonDict = {
            "resourceType": "Binary",
            "contentType": request.headers.get("Content-Type", mimetype),
            "data": base64.b64encode(body).decode("ascii"),
        }
        if resource_id is not None:
            resource["id"] = resource_id
        return resource
    return _parse_json_resource(body, rtype)


def _etag_version(header: str | None) -> str | None:
    if header is None or not header.strip():
        return None
    value = header.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"')


def _require_type(rtype: str) -> None:
    if not RESOURCE_TYPE_RE.match(rtype):
        raise FhirError(404, "not-supported", f"Unknown resource type {rtype!r}")


def _not_allowed(*methods: str) -> FhirError:
    return FhirError(
        405,
        "not-supported",
        f"Method {request.method} is not supported here",
        headers={"Allow": ", ".join(methods)},
    )


# ---------------------------------------------------------------------------- responses


def _json_response(
    body: JsonDict, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    if _pretty():
        text = json.dumps(body, ensure_ascii=False, indent=2)
    else:
        text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    response = Response(text.encode("utf-8"), status=status, content_type=FHIR_CONTENT_TYPE)
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def _outcome_response(
    status: int, code: str, diagnostics: str, headers: Mapping[str, str] | None = None
) -> Response:
    return _json_response(operation_outcome(code, diagnostics), status, headers)


def _version_headers(resource: JsonDict) -> dict[str, str]:
    headers: dict[str, str] = {}
    meta = resource.get("meta") or {}
    if meta.get("versionId"):
        headers["ETag"] = f'W/"{meta["versionId"]}"'
    last_updated = meta.get("lastUpdated")
    if isinstance(last_updated, str):
        with contextlib.suppress(ValueError):
            headers["Last-Modified"] = http_date(
                datetime.fromisoformat(last_updated.replace("Z", "+00:00"))
            )
    return headers


def _resource_response(
    resource: JsonDict, status: int = 200, *, location: bool = False
) -> Response:
    headers = _version_headers(resource)
    if location:
        meta = resource.get("meta") or {}
        headers["Location"] = (
            f"{_base_url()}/{resource['resourceType']}/{resource['id']}"
            f"/_history/{meta.get('versionId', '1')}"
        )
    wanted = _prefer().get("return")
    if wanted == "minimal" and request.method in ("POST", "PUT"):
        response = Response(b"", status=status)
        for key, value in headers.items():
            response.headers[key] = value
        return response
    if wanted == "operationoutcome" and request.method in ("POST", "PUT"):
        outcome = operation_outcome(
            "informational",
            f"{resource['resourceType']}/{resource['id']} stored",
            "information",
        )
        return _json_response(outcome, status, headers)
    return _json_response(resource, status, headers)


def _binary_wants_raw(content_type: str) -> bool:
    """Content negotiation for Binary reads: raw bytes or the Binary resource as JSON."""
    binary_mime = content_type.split(";", 1)[0].strip().lower()
    requested_format = request.args.get("_format")
    if requested_format:
        return requested_format.lower() == binary_mime and binary_mime not in _JSON_MIMETYPES
    if not request.headers.get("Accept", "").strip():
        return False
    best = request.accept_mimetypes.best_match([FHIR_JSON, "application/json", binary_mime])
    if best is None:
        raise FhirError(
            406,
            "not-supported",
            f"This Binary is {binary_mime}; available as that or {FHIR_JSON}",
        )
    return best == binary_mime and binary_mime not in _JSON_MIMETYPES


def _binary_response(resource: JsonDict) -> Response:
    content_type = str(resource.get("contentType") or "application/octet-stream")
    if not _binary_wants_raw(content_type):
        return _resource_response(resource)
    try:
        raw = base64.b64decode(str(resource.get("data", "")))
    except (binascii.Error, ValueError):
        raise FhirError(500, "exception", "Stored Binary data is not valid base64") from None
    response = Response(raw, status=200, content_type=content_type)
    for key, value in _version_headers(resource).items():
        response.headers[key] = value
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = "sandbox"
    return response


def _search_bundle(rtype: str, result: SearchResult) -> JsonDict:
    base = _base_url()

    def page_url(offset: int) -> str:
        pairs = [*result.applied, ("_count", str(result.count))]
        if offset > 0:
            pairs.append(("_offset", str(offset)))
        return f"{base}/{rtype}?{urlencode(pairs, quote_via=quote, safe='|:,/')}"

    links = [{"relation": "self", "url": page_url(result.offset)}]
    if result.has_next:
        links.append({"relation": "next", "url": page_url(result.offset + result.count)})
    if result.offset > 0 and result.count > 0 and result.summary != "count":
        links.append(
            {"relation": "previous", "url": page_url(max(0, result.offset - result.count))}
        )
    bundle: JsonDict = {
        "resourceType": "Bundle",
        "id": uuid.uuid4().hex,
        "meta": {"lastUpdated": now_instant()},
        "type": "searchset",
        "total": result.total,
        "link": links,
    }
    if result.resources:
        bundle["entry"] = [
            {
                "fullUrl": f"{base}/{res['resourceType']}/{res['id']}",
                "resource": res,
                "search": {"mode": "match"},
            }
            for res in result.resources
        ]
    return bundle


def _capability_statement(security: JsonDict | None) -> JsonDict:
    resources = []
    for rtype in registered_resource_types():
        resource: JsonDict = {"type": rtype}
        if rtype in _TYPE_DOCUMENTATION:
            resource["documentation"] = _TYPE_DOCUMENTATION[rtype]
        resource.update(
            {
                "interaction": [{"code": code} for code in _INTERACTIONS],
                "versioning": "versioned",
                "readHistory": True,
                "updateCreate": True,
                "conditionalCreate": True,
                "conditionalRead": "not-supported",
                "conditionalUpdate": False,
                "conditionalDelete": "not-supported",
                "searchParam": capability_search_params(rtype),
            }
        )
        resources.append(resource)
    rest: JsonDict = {
        "mode": "server",
        "documentation": (
            "EHR sandbox FHIR R4 server. Any resource type matching ^[A-Z][A-Za-z]+$ is "
            "stored; the types listed have search parameters beyond _id and _lastUpdated. "
            "Search supports _count, _offset, _sort, _summary and _elements."
        ),
    }
    if security is not None:
        rest["security"] = copy.deepcopy(security)
    rest["resource"] = resources
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": now_instant(),
        "publisher": "cxr-cds EHR sandbox",
        "kind": "instance",
        "software": {"name": "cxr-cds EHR sandbox FHIR server"},
        "implementation": {"description": "cxr-cds EHR sandbox", "url": _base_url()},
        "fhirVersion": FHIR_VERSION,
        "format": [FHIR_JSON, "json"],
        "rest": [rest],
    }


# ---------------------------------------------------------------------------- blueprint


def create_fhir_blueprint(
    store: FhirStore,
    capability_security: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
    *,
    name: str = "fhir",
) -> Blueprint:
    """Build the FHIR REST blueprint over ``store``; register it with ``url_prefix="/fhir"``.

    ``capability_security`` (e.g. SMART on FHIR OAuth URIs) is placed into the
    CapabilityStatement's ``rest[0].security`` when given; a callable is asked on each
    ``/metadata`` request (its URLs can then follow the base the request came to).

    Absolute URLs (Location, fullUrl, Bundle.link, implementation.url) use the app's
    ``FHIR_BASE_URL`` when configured, else the base the request came to.
    """
    bp = Blueprint(name, __name__)

    def security() -> JsonDict | None:
        if capability_security is None:
            return None
        found = capability_security() if callable(capability_security) else capability_security
        return dict(found)

    # -- errors: every failure is an OperationOutcome, never a stack trace

    def handle_fhir_error(exc: FhirError) -> Response:
        return _outcome_response(exc.status, exc.code, exc.diagnostics, exc.headers)

    def handle_invalid(exc: InvalidResourceError) -> Response:
        return _outcome_response(400, "invalid", str(exc))

    def handle_search_parameter(exc: SearchParameterError) -> Response:
        return _outcome_response(400, "invalid", str(exc))

    def handle_multiple(exc: MultipleMatchesError) -> Response:
        return _outcome_response(412, "multiple-matches", str(exc))

    def handle_conflict(exc: VersionConflictError) -> Response:
        return _outcome_response(412, "conflict", str(exc))

    def handle_http(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = _ISSUE_CODES.get(status, "exception" if status >= 500 else "invalid")
        headers: dict[str, str] = {}
        valid_methods = getattr(exc, "valid_methods", None)
        if status == 405 and valid_methods:
            headers["Allow"] = ", ".join(valid_methods)
        return _outcome_response(status, code, exc.description or exc.name, headers)

    def handle_unexpected(exc: Exception) -> Response:
        log.exception("Unhandled error in FHIR API: %s %s", request.method, request.path)
        return _outcome_response(500, "exception", "Internal server error")

    bp.register_error_handler(FhirError, handle_fhir_error)
    bp.register_error_handler(InvalidResourceError, handle_invalid)
    bp.register_error_handler(SearchParameterError, handle_search_parameter)
    bp.register_error_handler(MultipleMatchesError, handle_multiple)
    bp.register_error_handler(VersionConflictError, handle_conflict)
    bp.register_error_handler(HTTPException, handle_http)
    bp.register_error_handler(Exception, handle_unexpected)

    # -- interactions

    def do_search(rtype: str, params: Sequence[tuple[str, str]]) -> Response:
        result = store.search(rtype, params, keep=g.get("fhir_result_filter"))
        if result.unknown and _prefer().get("handling") == "strict":
            raise FhirError(
                400, "not-supported", f"Unsupported search parameters: {', '.join(result.unknown)}"
            )
        return _json_response(_search_bundle(rtype, result))

    def do_create(rtype: str) -> Response:
        resource = _body_resource(rtype)
        if_none_exist = request.headers.get("If-None-Exist", "").strip()
        if if_none_exist:
            stored, created = store.conditional_create(
                resource, if_none_exist, keep=g.get("fhir_result_filter")
            )
        else:
            stored, created = store.create(resource), True
        return _resource_response(stored, 201 if created else 200, location=True)

    def do_read(rtype: str, rid: str) -> Response:
        resource = store.read(rtype, rid) if ID_RE.match(rid) else None
        if resource is None:
            if ID_RE.match(rid) and store.is_deleted(rtype, rid):
                raise FhirError(410, "deleted", f"{rtype}/{rid} has been deleted")
            raise FhirError(404, "not-found", f"{rtype}/{rid} is not known")
        if not _visible(resource):
            raise _outside_restriction(rtype, rid)
        etag = _version_headers(resource).get("ETag")
        if etag and request.headers.get("If-None-Match", "").strip() == etag:
            response = Response(b"", status=304)
            response.headers["ETag"] = etag
            return response
        if rtype == "Binary":
            return _binary_response(resource)
        return _resource_response(resource)

    def do_update(rtype: str, rid: str) -> Response:
        if not ID_RE.match(rid):
            raise FhirError(400, "invalid", f"Invalid resource id {rid!r}")
        resource = _body_resource(rtype, rid)
        body_id = resource.get("id")
        if body_id is None:
            raise FhirError(400, "required", "An update must carry the resource id in the body")
        if body_id != rid:
            raise FhirError(
                400, "invalid", f"Body id {body_id!r} does not match the URL id {rid!r}"
            )
        if_match = _etag_version(request.headers.get("If-Match"))
        stored, created = store.update(resource, if_match=if_match)
        return _resource_response(stored, 201 if created else 200, location=created)

    def do_delete(rtype: str, rid: str) -> Response:
        if ID_RE.match(rid):
            store.delete(rtype, rid)
        return Response(b"", status=204)

    # -- routes (every method is routed here so that 405s are OperationOutcomes too)

    @bp.route("/metadata", methods=_METHODS)
    def metadata() -> Response:
        if request.method not in _READ_METHODS:
            raise _not_allowed("GET")
        return _json_response(_capability_statement(security()))

    @bp.route("/<rtype>", methods=_METHODS)
    @bp.route("/<rtype>/", methods=_METHODS)  # `GET [type]/?...` (the SMART launcher sends it)
    def type_level(rtype: str) -> Response:
        _require_type(rtype)
        if request.method in _READ_METHODS:
            return do_search(rtype, _query_pairs())
        if request.method == "POST":
            return do_create(rtype)
        raise _not_allowed("GET", "POST")

    @bp.route("/<rtype>/_search", methods=_METHODS)
    def search_post(rtype: str) -> Response:
        _require_type(rtype)
        if request.method in _READ_METHODS:
            return do_search(rtype, _query_pairs())
        if request.method != "POST":
            raise _not_allowed("GET", "POST")
        if request.mimetype not in ("", _FORM_MIMETYPE):
            raise FhirError(415, "not-supported", f"_search expects {_FORM_MIMETYPE}")
        return do_search(rtype, request_search_pairs(request.query_string, _read_body()))

    @bp.route("/<rtype>/<rid>", methods=_METHODS)
    def instance(rtype: str, rid: str) -> Response:
        _require_type(rtype)
        if request.method in _READ_METHODS:
            return do_read(rtype, rid)
        if request.method == "PUT":
            return do_update(rtype, rid)
        if request.method == "DELETE":
            return do_delete(rtype, rid)
        raise _not_allowed("GET", "PUT", "DELETE")

    @bp.route("/<rtype>/<rid>/_history", methods=_METHODS)
    def history(rtype: str, rid: str) -> Response:
        _require_type(rtype)
        if request.method not in _READ_METHODS:
            raise _not_allowed("GET")
        entries = store.history(rtype, rid) if ID_RE.match(rid) else []
        if not entries:
            raise FhirError(404, "not-found", f"{rtype}/{rid} is not known")
        if not all(e.resource is None or _visible(e.resource) for e in entries):
            raise _outside_restriction(rtype, rid)
        base = _base_url()
        bundle_entries: list[JsonDict] = []
        for entry in entries:
            item: JsonDict = {"fullUrl": f"{base}/{rtype}/{rid}"}
            if entry.resource is not None:
                item["resource"] = entry.resource
            item["request"] = {
                "method": "DELETE" if entry.resource is None else "PUT",
                "url": f"{rtype}/{rid}",
            }
            item["response"] = {
                "status": "204" if entry.resource is None else "200",
                "etag": f'W/"{entry.version_id}"',
                "lastModified": entry.last_updated,
            }
            bundle_entries.append(item)
        bundle: JsonDict = {
            "resourceType": "Bundle",
            "id": uuid.uuid4().hex,
            "type": "history",
            "total": len(bundle_entries),
            "link": [{"relation": "self", "url": f"{base}/{rtype}/{rid}/_history"}],
            "entry": bundle_entries,
        }
        return _json_response(bundle)

    @bp.route("/<rtype>/<rid>/_history/<vid>", methods=_METHODS)
    def vread(rtype: str, rid: str, vid: str) -> Response:
        _require_type(rtype)
        if request.method not in _READ_METHODS:
            raise _not_allowed("GET")
        resource = store.vread(rtype, rid, vid) if ID_RE.match(rid) else None
        if resource is None:
            deleted = any(
                e.resource is None and str(e.version_id) == vid
                for e in (store.history(rtype, rid) if ID_RE.match(rid) else [])
            )
            if deleted:
                raise FhirError(410, "deleted", f"{rtype}/{rid} version {vid} is a deletion")
            raise FhirError(404, "not-found", f"{rtype}/{rid}/_history/{vid} is not known")
        if not _visible(resource):
            raise _outside_restriction(rtype, rid)
        if rtype == "Binary":
            return _binary_response(resource)
        return _resource_response(resource)

    @bp.route("/", methods=_METHODS, strict_slashes=False)
    def base_endpoint() -> Response:
        # POST [base] with a transaction Bundle (FHIR R4 3.1.0.11); nothing else lives here.
        if request.method != "POST":
            raise FhirError(405, "not-supported", "Only POST of a transaction Bundle is allowed")
        bundle = _parse_json_resource(_read_body(), "Bundle")
        try:
            answer = process_transaction(
                store, bundle, _base_url(), keep=g.get("fhir_result_filter")
            )
            return _json_response(answer)
        except TransactionError as exc:
            raise FhirError(400, "invalid", str(exc)) from None

    @bp.route("/<path:rest>", methods=_METHODS)
    def unknown_endpoint(rest: str = "") -> Response:
        raise FhirError(404, "not-found", f"No FHIR endpoint at /{rest}")

    return bp
