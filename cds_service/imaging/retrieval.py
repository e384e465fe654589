"""Fetch DICOM bytes over HTTP with limits: WADO-RS (multipart/related), FHIR Binary, and
Media / DocumentReference attachments (url or inline data).

Every fetch has connect/read timeouts and an overall deadline, a byte cap, no redirect to
another host, and a content-type check. A bearer token goes only to URLs under the bases the
caller names (the EHR's own FHIR base path and the image servers listed for that EHR): an
Endpoint address is data, not a credential holder.
"""

from __future__ import annotations

import base64
import binascii
import email.message
import email.parser
import email.policy
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.cookiejar import DefaultCookiePolicy
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import requests
from pydicom.dataset import Dataset

from cds_service.imaging.errors import ImageFetchError, NotAnalysable, UnsupportedImage
from cds_service.imaging.limits import DEFAULT_LIMITS, ImageLimits

log = logging.getLogger(__name__)

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
# "transfer-syntax=*": send the instance as stored, no transcoding (PS3.18 8.7.3.5).
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
WADO_ACCEPT_DEFAULT = 'multipart/related; type="application/dicom"'
MAX_REDIRECTS = 3
_CHUNK = 1 << 16


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def url_under(url: str, base: str) -> bool:
    """True when `url` is `base` or below it: same scheme, host, port, path prefix, no '..'."""
    if _origin(url) != _origin(base):
        return False
    path = unquote(urlsplit(url).path)
    if any(segment in (".", "..") for segment in path.split("/")):
        return False
    base_path = unquote(urlsplit(base).path).rstrip("/")
    return path == base_path or path.startswith(base_path + "/")


@dataclass(frozen=True)
class Fetched:
    content_type: str
    body: bytes


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


@dataclass
class ImageFetcher:
    """HTTP GETs for image bytes, bounded and careful with credentials."""

    limits: ImageLimits = DEFAULT_LIMITS
    token_servers: Sequence[str] = ()
    session: requests.Session = field(default_factory=requests.Session)

    def __post_init__(self) -> None:
        self.session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))

    def may_receive_token(self, url: str, extra_bases: Sequence[str] = ()) -> bool:
        return any(url_under(url, base) for base in (*self.token_servers, *extra_bases))

    def get(
        self,
        url: str,
        accept: str,
        *,
        token: str | None = None,
        token_bases: Sequence[str] = (),
    ) -> Fetched:
        """GET `url`; the token is sent only where `may_receive_token` allows it."""
        if urlsplit(url).scheme not in ("http", "https"):
            raise UnsupportedImage("image URLs must be http(s)")
        start_origin = _origin(url)
        deadline = time.monotonic() + self.limits.read_timeout_s * 2
        for _ in range(MAX_REDIRECTS + 1):
            headers = {"Accept": accept}
            if token and self.may_receive_token(url, token_bases):
                headers["Authorization"] = f"Bearer {token}"
            response = self._request(url, headers)
            if response.status_code in (301, 302, 303, 307, 308):
                location = response.headers.get("Location", "")
                response.close()
                url = urljoin(url, location)
                if _origin(url) != start_origin:
                    raise ImageFetchError("image server redirected to another host: refused")
                continue
            return self._read(response, deadline)
        raise ImageFetchError("too many redirects from the image server")

    def _request(self, url: str, headers: dict[str, str]) -> requests.Response:
        try:
            return self.session.get(
                url,
                headers=headers,
                timeout=self.limits.timeout,
                allow_redirects=False,
                stream=True,
            )
        except (requests.RequestException, ValueError) as exc:
            raise ImageFetchError(f"image server unreachable ({type(exc).__name__})") from exc

    def _read(self, response: requests.Response, deadline: float) -> Fetched:
        with response:
            status = response.status_code
            if status in (404, 410):
                raise NotAnalysable("image not found on the image server")
            if status in (401, 403):
                raise ImageFetchError(f"image server refused access ({status})")
            if status == 406:
                raise ImageFetchError("image server cannot send the requested type (406)")
            if status != 200:
                raise ImageFetchError(f"image server answered {status}")
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > self.limits.max_bytes:
                raise UnsupportedImage(f"image larger than the {self.limits.max_bytes} byte limit")
            chunks: list[bytes] = []
            total = 0
            try:
                for chunk in response.iter_content(_CHUNK):
                    total += len(chunk)
                    if total > self.limits.max_bytes:
                        raise UnsupportedImage(
                            f"image larger than the {self.limits.max_bytes} byte limit"
                        )
                    if time.monotonic() > deadline:
                        raise ImageFetchError("image download took too long")
                    chunks.append(chunk)
            except requests.RequestException as exc:
                raise ImageFetchError(f"image download failed ({type(exc).__name__})") from exc
            return Fetched(response.headers.get("Content-Type", ""), b"".join(chunks))


def multipart_parts(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(content type, bytes) of each part of a multipart/related body (RFC 2387)."""
    if media_type(content_type) != "multipart/related":
        raise UnsupportedImage(f"expected multipart/related, got {media_type(content_type)!r}")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    try:
        message = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(head + body)
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedImage("malformed multipart response") from exc
    if not message.is_multipart() or message.defects:
        raise UnsupportedImage("malformed multipart response (no boundary or no parts)")
    parts: list[tuple[str, bytes]] = []
    for part in message.get_payload():
        if not isinstance(part, email.message.Message):
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            parts.append((part.get_content_type(), payload))
    return parts


def wado_instance_url(address: str, study: str, series: str, instance: str) -> str:
    return f"{address.rstrip('/')}/studies/{study}/series/{series}/instances/{instance}"


def fetch_wado_instance(
    fetcher: ImageFetcher,
    address: str,
    study: str,
    series: str,
    instance: str,
    token: str | None = None,
    token_bases: Sequence[str] = (),
) -> bytes:
    """One instance's DICOM Part 10 bytes through WADO-RS; the token goes only to the
    fetcher's token servers and `token_bases`."""
    url = wado_instance_url(address, study, series, instance)
    try:
        fetched = fetcher.get(url, WADO_ACCEPT, token=token, token_bases=token_bases)
    except ImageFetchError as exc:
        if "406" not in str(exc):
            raise
        fetched = fetcher.get(url, WADO_ACCEPT_DEFAULT, token=token, token_bases=token_bases)
    dicom_parts = [
        data for kind, data in multipart_parts(fetched.content_type, fetched.body) if kind == DICOM
    ]
    if len(dicom_parts) != 1:
        raise UnsupportedImage(f"WADO-RS answered {len(dicom_parts)} DICOM parts for one instance")
    return dicom_parts[0]


def fetch_wado_metadata(
    fetcher: ImageFetcher,
    address: str,
    study: str,
    series: str,
    instance: str,
    token: str | None = None,
    token_bases: Sequence[str] = (),
) -> Dataset:
    """One instance's header alone, through WADO-RS metadata (DICOM JSON, PS3.18 F.2): enough
    to decide whether the instance is worth downloading. Bulk data are not fetched."""
    url = wado_instance_url(address, study, series, instance) + "/metadata"
    accept = f"{DICOM_JSON}, application/json;q=0.9"
    fetched = fetcher.get(url, accept, token=token, token_bases=token_bases)
    if media_type(fetched.content_type) not in (DICOM_JSON, "application/json"):
        raise UnsupportedImage(f"expected {DICOM_JSON}, got {media_type(fetched.content_type)!r}")
    try:
        items = json.loads(fetched.body)
        if not isinstance(items, list) or len(items) != 1 or not isinstance(items[0], dict):
            raise ValueError("not one DICOM JSON object")
        return Dataset.from_json(items[0], bulk_data_uri_handler=_no_bulk_data)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on malformed JSON
        raise UnsupportedImage("malformed DICOM JSON metadata") from exc


def _no_bulk_data(tag: str, vr: str, uri: str) -> None:
    """Bulk data (pixels, large values) are not needed to read a header."""
    return None


def decode_inline_data(data: str, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """An attachment's base64 `data`, refused before decoding when it is too large."""
    if len(data) * 3 // 4 > limits.max_bytes:
        raise UnsupportedImage(f"inline image larger than the {limits.max_bytes} byte limit")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UnsupportedImage("attachment data are not valid base64") from exc


def fetch_binary(
    fetcher: ImageFetcher, url: str, fhir_base: str, token: str | None = None
) -> bytes:
    """A FHIR Binary's raw bytes (Accept: application/dicom); a JSON Binary is unwrapped."""
    fetched = fetcher.get(
        url, f"{DICOM}, application/fhir+json;q=0.5", token=token, token_bases=(fhir_base,)
    )
    kind = media_type(fetched.content_type)
    if kind == DICOM:
        return fetched.body
    if kind in ("application/fhir+json", "application/json"):
        try:
            resource = json.loads(fetched.body)
        except ValueError as exc:
            raise UnsupportedImage("the Binary is neither DICOM nor FHIR JSON") from exc
        if (
            isinstance(resource, dict)
            and resource.get("resourceType") == "Binary"
            and media_type(str(resource.get("contentType", ""))) == DICOM
            and isinstance(resource.get("data"), str)
        ):
            return decode_inline_data(resource["data"], fetcher.limits)
        raise UnsupportedImage("the Binary does not hold application/dicom data")
    raise UnsupportedImage(f"expected application/dicom, got {kind or 'no content type'}")


def attachment_bytes(
    fetcher: ImageFetcher, attachment: dict[str, Any], fhir_base: str, token: str | None = None
) -> bytes:
    """The DICOM bytes of a Media.content / DocumentReference.content.attachment."""
    declared = media_type(str(attachment.get("contentType", "")))
    if declared and declared != DICOM:
        raise UnsupportedImage(f"attachment is {declared}, not application/dicom")
    data = attachment.get("data")
    if isinstance(data, str) and data:
        return decode_inline_data(data, fetcher.limits)
    url = attachment.get("url")
    if not isinstance(url, str) or not url:
        raise UnsupportedImage("attachment has neither data nor url")
    return fetch_binary(fetcher, attachment_url(url, fhir_base), fhir_base, token)


def attachment_url(url: str, fhir_base: str) -> str:
    """An attachment's url made absolute (a relative one is under the FHIR base)."""
    return url if "://" in url else f"{fhir_base.rstrip('/')}/{url.lstrip('/')}"
