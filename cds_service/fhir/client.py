"""A small FHIR R4 REST client: bearer auth, timeouts, size cap, same-origin paging only."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from http.cookiejar import DefaultCookiePolicy
from typing import Any
from urllib.parse import unquote, urlsplit

import requests

from cds_service.fhir.shapes import as_dict, as_str, dicts

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
MAX_RESPONSE_BYTES = 16 * 1024 * 1024


class FhirError(Exception):
    """The FHIR server could not give us what we asked for."""


class FhirUnavailable(FhirError):
    """Network failure, timeout, 5xx, or an answer that is not FHIR JSON."""


class FhirAccessDenied(FhirError):
    """401 or 403 from the FHIR server, or a URL outside the FHIR base."""


class FhirNotFound(FhirUnavailable):
    """404 or 410: no such resource (kept a FhirUnavailable for callers that retry)."""


class FhirRejected(FhirUnavailable):
    """400 from the FHIR server: it does not support something we asked (e.g. `_sort`)."""


def new_session() -> requests.Session:
    """A session for outbound FHIR calls. It keeps no cookies: a session may be reused for
    many callers, and one caller's cookies must never reach another's request."""
    session = requests.Session()
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    return session


class FhirClient:
    """Talks to one FHIR base URL; never follows a link or redirect to another origin."""

    def __init__(
        self,
        base_url: str,
        access_token: str | None = None,
        *,
        timeout: tuple[float, float] = (2.0, 5.0),
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._base = urlsplit(self.base_url)
        self._timeout = timeout
        self._session = session or new_session()
        self._headers = {"Accept": FHIR_JSON}
        if access_token:
            self._headers["Authorization"] = f"Bearer {access_token}"

    def owns(self, url: str) -> bool:
        """True when `url` lies under this client's base URL (guards paging against SSRF):
        same scheme, host and port, and a path under the base path with no dot segments."""
        parts = urlsplit(url)
        if (parts.scheme, parts.netloc.lower()) != (self._base.scheme, self._base.netloc.lower()):
            return False
        segments = unquote(parts.path).split("/")
        if any(segment in (".", "..") for segment in segments):
            return False
        base_path = self._base.path.rstrip("/")
        return parts.path == base_path or parts.path.startswith(base_path + "/")

    def get_json(self, url_or_path: str, params: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
        return self._send("GET", url_or_path, params=params)

    def post_json(self, url_or_path: str, resource: dict[str, Any]) -> dict[str, Any]:
        """POST a resource (e.g. a transaction Bundle to the base) and return the answer."""
        return self._send("POST", url_or_path, body=resource)

    def put_json(self, url_or_path: str, resource: dict[str, Any]) -> dict[str, Any]:
        """PUT (update) a resource and return the answer."""
        return self._send("PUT", url_or_path, body=resource)

    def _send(
        self,
        method: str,
        url_or_path: str,
        *,
        params: Sequence[tuple[str, str]] = (),
        body: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        url = url_or_path if "://" in url_or_path else f"{self.base_url}/{url_or_path.lstrip('/')}"
        url = url.rstrip("/") if url_or_path in ("", "/") else url
        if not self.owns(url):
            raise FhirAccessDenied("refusing to follow a URL outside the FHIR base")
        headers = dict(self._headers)
        data = None
        if body is not None:
            headers["Content-Type"] = FHIR_JSON
            data = json.dumps(body).encode("utf-8")
        try:
            response = self._session.request(
                method,
                url,
                params=list(params),
                data=data,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
                stream=True,
            )
            raw = response.raw.read(MAX_RESPONSE_BYTES + 1, decode_content=True)
            response.close()
        except (requests.RequestException, ValueError) as exc:
            # ValueError: requests refuses some malformed URLs and timeouts before sending.
            raise FhirUnavailable(f"FHIR server unreachable: {type(exc).__name__}") from exc
        if response.status_code in (401, 403):
            raise FhirAccessDenied(f"FHIR server answered {response.status_code}")
        if response.status_code == 400:
            raise FhirRejected("FHIR server answered 400")
        if response.status_code in (404, 410):
            raise FhirNotFound(f"FHIR server answered {response.status_code}")
        if response.status_code not in (200, 201):
            raise FhirUnavailable(f"FHIR server answered {response.status_code}")
        if len(raw) > MAX_RESPONSE_BYTES:
            raise FhirUnavailable("FHIR response larger than the configured limit")
        try:
            parsed = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise FhirUnavailable("FHIR server answered something that is not JSON") from exc
        if not isinstance(parsed, dict) or "resourceType" not in parsed:
            raise FhirUnavailable("FHIR server answered JSON that is not a resource")
        return parsed


def next_link(bundle: dict[str, Any]) -> str | None:
    for link in dicts(bundle.get("link")):
        if link.get("relation") == "next" and as_str(link.get("url")):
            return str(link["url"])
    return None


def bundle_resources(bundle: dict[str, Any], resource_type: str) -> list[dict[str, Any]]:
    """The entries of `resource_type` in a Bundle (anything malformed is skipped)."""
    resources = (as_dict(entry.get("resource")) for entry in dicts(bundle.get("entry")))
    return [r for r in resources if r.get("resourceType") == resource_type]
