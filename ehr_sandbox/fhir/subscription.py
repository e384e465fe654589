"""FHIR R4 Subscription resources in the sandbox: what is accepted, and which writes match.

A Subscription's ``criteria`` is parsed with the same search parameters and matcher the
sandbox's search uses, so "would a search with these criteria find this resource" and "does
this write notify" always agree. Only the ``rest-hook`` channel is offered.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from .search import (
    RESOURCE_TYPE_RE,
    JsonDict,
    ParsedSearch,
    SearchParameterError,
    parse_search,
    registered_resource_types,
)

__all__ = [
    "CAPABILITY_DOCUMENTATION",
    "CHANNEL_TYPES",
    "PAYLOAD_CONTENT_URL",
    "STATUSES",
    "PayloadContent",
    "RestHook",
    "SubscriptionError",
    "SubscriptionRule",
    "accept_subscription",
    "parse_subscription",
    "watchable_types",
]

PayloadContent = Literal["empty", "id-only", "full-resource"]

STATUSES = ("requested", "active", "error", "off")
CHANNEL_TYPES = ("rest-hook",)
PAYLOAD_MIME_TYPES = ("application/fhir+json",)
PAYLOAD_CONTENT_URL = (
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content"
)
PAYLOAD_CONTENTS: tuple[PayloadContent, ...] = ("empty", "id-only", "full-resource")
# A Subscription's own status changes (error, cleared error) must never notify anyone, or a
# failing endpoint could feed itself a notification about each failure.
_UNWATCHABLE = frozenset({"Subscription"})
# Headers the delivery sets itself; a subscription replacing them would break the request.
_RESERVED_HEADERS = frozenset(
    {"content-type", "content-length", "transfer-encoding", "host", "connection"}
)
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

CAPABILITY_DOCUMENTATION = (
    "FHIR R4 Subscriptions with the rest-hook channel only. criteria is a search on one of "
    "the listed resource types (its search parameters); channel.header entries are "
    "'Name: value' HTTP headers sent with every notification. Without channel.payload the "
    "endpoint gets an empty POST; with payload application/fhir+json it gets a PUT of the "
    "resource to {endpoint}/{type}/{id}, or, with the backport-payload-content extension "
    "'id-only', a POST of a history Bundle (SubscriptionStatus Parameters, then the "
    "resource's fullUrl). Failed deliveries are retried; after the last one the "
    "Subscription's status is 'error'."
)


class SubscriptionError(ValueError):
    """The Subscription is not acceptable; the message says which element and why."""


@dataclass(frozen=True)
class RestHook:
    """Where and how notifications go."""

    endpoint: str
    headers: tuple[tuple[str, str], ...]
    payload: PayloadContent


@dataclass(frozen=True)
class SubscriptionRule:
    """A parsed Subscription: its status, what it watches and its channel."""

    id: str | None
    status: str
    resource_type: str
    search: ParsedSearch
    channel: RestHook

    def matches(self, resource: Mapping[str, Any]) -> bool:
        """True when a search with the subscription's criteria would find ``resource``."""
        return resource.get("resourceType") == self.resource_type and self.search.matches(resource)


def watchable_types() -> list[str]:
    """Resource types a subscription's criteria may name: those with search parameters."""
    return [t for t in registered_resource_types() if t not in _UNWATCHABLE]


def _criteria(value: Any) -> tuple[str, ParsedSearch]:
    if not isinstance(value, str) or not value.strip():
        raise SubscriptionError("Subscription.criteria is required (e.g. ImagingStudy?modality=DX)")
    rtype, _, query = value.strip().partition("?")
    if not RESOURCE_TYPE_RE.match(rtype):
        raise SubscriptionError(
            f"Subscription.criteria {value!r} must be a relative search such as "
            "ImagingStudy?modality=DX"
        )
    if rtype not in watchable_types():
        raise SubscriptionError(
            f"Subscription.criteria: {rtype} cannot be subscribed to; supported types: "
            + ", ".join(watchable_types())
        )
    pairs = parse_qsl(query, keep_blank_values=True)
    try:
        search = parse_search(rtype, pairs)
    except SearchParameterError as exc:
        raise SubscriptionError(f"Subscription.criteria: {exc}") from None
    # A parameter the search would ignore (unknown, empty, paging or sorting) would make the
    # subscription match more than its author meant, so it is refused instead.
    used = {f.name for f in search.filters}
    ignored = [name for name, _ in pairs if name not in used]
    if ignored:
        raise SubscriptionError(
            f"Subscription.criteria: parameters not usable as {rtype} filters: "
            + ", ".join(dict.fromkeys(ignored))
        )
    return rtype, search


def _endpoint(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SubscriptionError("Subscription.channel.endpoint is required for rest-hook")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises ValueError for a malformed port)
    except ValueError:
        raise SubscriptionError(f"Subscription.channel.endpoint {value!r} is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or _CONTROL_RE.search(value):
        raise SubscriptionError(
            f"Subscription.channel.endpoint {value!r} must be an absolute http(s) URL"
        )
    if parts.fragment or " " in value:
        raise SubscriptionError(
            f"Subscription.channel.endpoint {value!r} must not hold spaces or a fragment"
        )
    return value


def _header(index: int, item: Any) -> tuple[str, str]:
    where = f"Subscription.channel.header[{index}]"
    if not isinstance(item, str):
        raise SubscriptionError(f"{where} must be a string 'Name: value'")
    name, colon, value = item.partition(":")
    name, value = name.strip(), value.strip()
    if not colon or not _HEADER_NAME_RE.match(name):
        raise SubscriptionError(f"{where} must be an HTTP header 'Name: value'")
    if _CONTROL_RE.search(value):
        raise SubscriptionError(f"{where} holds control characters")
    if name.lower() in _RESERVED_HEADERS:
        raise SubscriptionError(f"{where}: {name} is set by the server and cannot be replaced")
    return name, value


def _headers(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise SubscriptionError("Subscription.channel.header must be a list of strings")
    return tuple(_header(i, item) for i, item in enumerate(value))


def _content_extension(element: Any) -> str | None:
    """The backport-payload-content code from ``channel._payload`` (R4 JSON puts a
    primitive's extensions there), or None."""
    if element is None:
        return None
    extensions = element.get("extension") if isinstance(element, dict) else None
    if not isinstance(extensions, list):
        raise SubscriptionError("Subscription.channel._payload must hold an extension list")
    for extension in extensions:
        if isinstance(extension, dict) and extension.get("url") == PAYLOAD_CONTENT_URL:
            code = extension.get("valueCode")
            if code not in PAYLOAD_CONTENTS:
                raise SubscriptionError(
                    f"backport-payload-content {code!r} is not supported; use one of "
                    + ", ".join(PAYLOAD_CONTENTS)
                )
            return str(code)
    return None


def _payload(channel: Mapping[str, Any]) -> PayloadContent:
    mime = channel.get("payload")
    if mime is not None and (
        not isinstance(mime, str) or mime.split(";", 1)[0].strip().lower() not in PAYLOAD_MIME_TYPES
    ):
        raise SubscriptionError(
            f"Subscription.channel.payload {mime!r} is not supported; supported: "
            + ", ".join(PAYLOAD_MIME_TYPES)
        )
    code = _content_extension(channel.get("_payload"))
    for content in PAYLOAD_CONTENTS:
        if code == content:
            return content
    # R4 without the extension: a mime type means the whole resource, none an empty POST.
    return "full-resource" if mime is not None else "empty"


def _channel(value: Any) -> RestHook:
    if not isinstance(value, dict):
        raise SubscriptionError("Subscription.channel is required")
    kind = value.get("type")
    if kind not in CHANNEL_TYPES:
        raise SubscriptionError(
            f"Subscription.channel.type {kind!r} is not supported; supported: "
            + ", ".join(CHANNEL_TYPES)
        )
    return RestHook(
        endpoint=_endpoint(value.get("endpoint")),
        headers=_headers(value.get("header")),
        payload=_payload(value),
    )


def parse_subscription(resource: Mapping[str, Any]) -> SubscriptionRule:
    """Check a Subscription and return what it asks for; raises ``SubscriptionError``."""
    status = resource.get("status")
    if status not in STATUSES:
        raise SubscriptionError(
            f"Subscription.status {status!r} is not valid; use one of " + ", ".join(STATUSES)
        )
    rtype, search = _criteria(resource.get("criteria"))
    resource_id = resource.get("id")
    return SubscriptionRule(
        id=resource_id if isinstance(resource_id, str) else None,
        status=str(status),
        resource_type=rtype,
        search=search,
        channel=_channel(resource.get("channel")),
    )


def accept_subscription(resource: JsonDict) -> JsonDict:
    """The Subscription as the sandbox stores it: checked, and a ``requested`` one made
    ``active`` at once (R4 lets a server accept a subscription synchronously)."""
    parse_subscription(resource)
    if resource.get("status") == "requested":
        return {**resource, "status": "active"}
    return resource
