"""A small FHIR R4 REST client: bearer auth, timeouts, size cap, same-origin paging only."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import requests

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
MAX_RESPONSE_BYTES = 16 * 1024 * 1024


class FhirError(Exception):
    """The FHIR server could not give us what we asked for."""


class FhirUnavailable(FhirError):
    """Network failure, timeout, 5xx, or an answer that is not FHIR JSON."""


class FhirAccessDenied(FhirError):
    """401 or 403 from the FHIR server."""


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
        self._timeout = timeout
        self._session = session or requests.Session()
        self._headers = {"Accept": FHIR_JSON}
        if access_token:
            self._headers["Authorization"] = f"Bearer {access_token}"

    def owns(self, url: str) -> bool:
        """True when `url` lies under this client's base URL (guards paging against SSRF)."""
        return url == self.base_url or url.startswith(self.base_url + "/")

    def get_json(self, url_or_path: str, params: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
        url = url_or_path if "://" in url_or_path else f"{self.base_url}/{url_or_path.lstrip('/')}"
        if not self.owns(url):
            raise FhirAccessDenied("refusing to follow a URL outside the FHIR base")
        try:
            response = self._session.get(
                url,
                params=list(params),
                headers=self._headers,
                timeout=self._timeout,
                allow_redirects=False,
                stream=True,
            )
            body = response.raw.read(MAX_RESPONSE_BYTES + 1, decode_content=True)
            response.close()
        except requests.RequestException as exc:
            raise FhirUnavailable(f"FHIR server unreachable: {type(exc).__name__}") from exc
        if response.status_code in (401, 403):
            raise FhirAccessDenied(f"FHIR server answered {response.status_code}")
        if response.status_code != 200:
            raise FhirUnavailable(f"FHIR server answered {response.status_code}")
        if len(body) > MAX_RESPONSE_BYTES:
            raise FhirUnavailable("FHIR response larger than the configured limit")
        try:
            parsed = json.loads(body)
        except ValueError as exc:
            raise FhirUnavailable("FHIR server answered something that is not JSON") from exc
        if not isinstance(parsed, dict) or "resourceType" not in parsed:
            raise FhirUnavailable("FHIR server answered JSON that is not a resource")
        return parsed

    def search_pages(
        self, resource_type: str, params: Sequence[tuple[str, str]], max_pages: int
    ) -> Iterator[dict[str, Any]]:
        """Yield searchset Bundles, following `next` links within this base, at most max_pages."""
        bundle = self.get_json(resource_type, params)
        yield bundle
        yield from self.follow_next(bundle, max_pages - 1)

    def follow_next(self, bundle: dict[str, Any], max_pages: int) -> Iterator[dict[str, Any]]:
        for _ in range(max_pages):
            next_url = next_link(bundle)
            if next_url is None:
                return
            if not self.owns(next_url):
                log.warning("ignoring a next link outside the FHIR base")
                return
            bundle = self.get_json(next_url)
            if bundle.get("resourceType") != "Bundle":
                raise FhirUnavailable("a next link did not return a Bundle")
            yield bundle


def next_link(bundle: dict[str, Any]) -> str | None:
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
            return str(link["url"])
    return None


def bundle_resources(bundle: dict[str, Any], resource_type: str) -> list[dict[str, Any]]:
    """The entries of `resource_type` in a Bundle (search.mode include/outcome skipped)."""
    found = []
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") == resource_type:
            found.append(resource)
    return found
