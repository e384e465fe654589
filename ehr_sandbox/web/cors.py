"""CORS for the sandbox's browser-facing API: the FHIR API (everything under /fhir, /metadata
and .well-known/smart-configuration included) and the token endpoint.

Browser apps (the CDS Hooks sandbox, SMART apps written in JavaScript) call the FHIR server
from another origin. Tokens travel in the Authorization header, never in cookies, so every
response may say ``Access-Control-Allow-Origin: *`` (no ``Allow-Credentials``): a page can only
send what it already holds. A preflight (any OPTIONS) is answered 204 here, before the token
check, since a browser never sends credentials with it. Error answers (401, 404, ...) carry
the headers as well, so the calling page can read the OperationOutcome.
"""

from __future__ import annotations

from flask import Flask, Response, request

__all__ = ["ALLOW_HEADERS", "ALLOW_METHODS", "CORS_PATHS", "EXPOSE_HEADERS", "install_cors"]

# Path prefixes (the prefix itself, or below it) whose responses carry CORS headers.
CORS_PATHS = ("/fhir", "/auth/token")
ALLOW_METHODS = "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"
ALLOW_HEADERS = (
    "Authorization, Content-Type, Accept, If-None-Exist, If-Match, If-None-Match, "
    "If-Modified-Since, Prefer, X-Requested-With"
)
EXPOSE_HEADERS = "Location, ETag, Content-Location, Last-Modified"
MAX_AGE_S = 600  # how long a browser may reuse a preflight (Chromium caps it at 7200)


def _covered(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in CORS_PATHS)


def _preflight() -> Response | None:
    if request.method != "OPTIONS" or not _covered(request.path):
        return None
    response = Response(b"", status=204)
    response.headers["Allow"] = ALLOW_METHODS
    response.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
    response.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
    response.headers["Access-Control-Max-Age"] = str(MAX_AGE_S)
    # Chromium's Private/Local Network Access: a public https page (the hosted CDS Hooks
    # sandbox) calling this loopback server asks first, and needs this answer.
    if request.headers.get("Access-Control-Request-Private-Network", "").lower() == "true":
        response.headers["Access-Control-Allow-Private-Network"] = "true"
    return response


def _add_headers(response: Response) -> Response:
    if _covered(request.path):
        response.headers["Access-Control-Allow-Origin"] = "*"
        response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
    return response


def install_cors(app: Flask) -> None:
    """Answer preflights and add CORS headers to every answer under ``CORS_PATHS``.

    The preflight hook goes first among the app's ``before_request`` hooks, whenever this is
    called: they run in order, and a preflight must never reach the token check.
    """
    app.before_request_funcs.setdefault(None, []).insert(0, _preflight)
    app.after_request(_add_headers)
