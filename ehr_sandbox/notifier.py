"""Rest-hook delivery of the sandbox's FHIR R4 Subscription notifications.

The store tells the notifier about every committed create and update, in the writing thread;
the notifier matches the resource against the active subscriptions there (a quick in-memory
search) and queues one event per match. Each subscription has its own delivery thread, started
when it has something to send and ended when its queue is empty: a write never waits for a
subscriber, one subscription's notifications arrive in order, and a slow or dead endpoint only
delays its own (every request has a timeout).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from flask import current_app, has_request_context, request

from ehr_sandbox.fhir.search import MAX_COUNT, JsonDict
from ehr_sandbox.fhir.store import (
    FhirStore,
    InvalidResourceError,
    VersionConflictError,
    now_instant,
)
from ehr_sandbox.fhir.subscription import (
    RestHook,
    SubscriptionError,
    SubscriptionRule,
    parse_subscription,
)

__all__ = [
    "NOTIFICATION_PROFILE",
    "STATUS_PROFILE",
    "DeliveryFailed",
    "DeliverySettings",
    "SubscriptionNotifier",
    "id_only_bundle",
]

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
_BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
NOTIFICATION_PROFILE = f"{_BACKPORT}/backport-subscription-notification-r4"
STATUS_PROFILE = f"{_BACKPORT}/backport-subscription-status-r4"


@dataclass(frozen=True)
class DeliverySettings:
    """How hard the sandbox tries to reach a subscriber."""

    attempts: int = 3  # tries per notification before the subscription is set to error
    retry_delay_s: float = 1.0  # wait before the first retry; doubled before each further one
    timeout_s: float = 5.0  # per request, so that a stalled endpoint cannot hold its queue


class DeliveryFailed(Exception):
    """Why one delivery attempt failed, in words fit for ``Subscription.error``: the HTTP
    status or the kind of connection failure, never a header (they carry secrets)."""


@dataclass(frozen=True)
class _Event:
    """One notification owed to one subscription."""

    subscription_id: str
    number: int  # events since the subscription started, this one included
    resource: JsonDict  # the version that matched (a private copy)
    created: bool
    fhir_base: str  # for absolute fullUrls; "" when unknown
    timestamp: str


def _absolute(base: str, path: str) -> str:
    return f"{base}/{path}" if base else path


def id_only_bundle(event: _Event, status: str = "active") -> JsonDict:
    """An R4 backport ``id-only`` notification: a history Bundle whose first entry is the
    SubscriptionStatus (as Parameters) and whose second names the changed resource."""
    rtype, rid = event.resource["resourceType"], event.resource["id"]
    subscription = _absolute(event.fhir_base, f"Subscription/{event.subscription_id}")
    focus = _absolute(event.fhir_base, f"{rtype}/{rid}")
    status_id = str(uuid.uuid4())
    number = str(event.number)
    parameters: JsonDict = {
        "resourceType": "Parameters",
        "id": status_id,
        "meta": {"profile": [STATUS_PROFILE]},
        "parameter": [
            {"name": "subscription", "valueReference": {"reference": subscription}},
            {"name": "status", "valueCode": status},
            {"name": "type", "valueCode": "event-notification"},
            {"name": "events-since-subscription-start", "valueString": number},
            {
                "name": "notification-event",
                "part": [
                    {"name": "event-number", "valueString": number},
                    {"name": "timestamp", "valueInstant": event.timestamp},
                    {"name": "focus", "valueReference": {"reference": focus}},
                ],
            },
        ],
    }
    return {
        "resourceType": "Bundle",
        "id": uuid.uuid4().hex,
        "meta": {"profile": [NOTIFICATION_PROFILE]},
        "type": "history",
        "timestamp": event.timestamp,
        "entry": [
            {
                "fullUrl": f"urn:uuid:{status_id}",
                "resource": parameters,
                "request": {"method": "GET", "url": f"{subscription}/$status"},
                "response": {"status": "200"},
            },
            {
                "fullUrl": focus,
                "request": {
                    "method": "POST" if event.created else "PUT",
                    "url": rtype if event.created else f"{rtype}/{rid}",
                },
                # R4 bdl-4: every entry of a history Bundle carries a response.
                "response": {"status": "201" if event.created else "200"},
            },
        ],
    }


def _request_fhir_base() -> str:
    """The FHIR base of the request being served, for a sandbox without a base_url."""
    if not has_request_context():
        return ""
    configured = current_app.config.get("FHIR_BASE_URL")
    return str(configured or request.url_root + "fhir").rstrip("/")


def _resource_url(endpoint: str, resource: JsonDict) -> str:
    """``{endpoint}/{type}/{id}``, keeping any query string of the endpoint."""
    parts = urlsplit(endpoint)
    path = f"{parts.path.rstrip('/')}/{resource['resourceType']}/{resource['id']}"
    return parts._replace(path=path).geturl()


def _dump(body: JsonDict) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class SubscriptionNotifier:
    """Matches the store's writes against active Subscriptions and delivers rest-hook
    notifications from background threads; ``flush`` waits for them, ``close`` stops them."""

    def __init__(
        self,
        store: FhirStore,
        *,
        fhir_base: str | None = None,
        delivery: DeliverySettings | None = None,
    ) -> None:
        self.store = store
        self.fhir_base = fhir_base.rstrip("/") if fhir_base else None
        self.delivery = delivery or DeliverySettings()
        self._lock = threading.Condition()
        self._queues: dict[str, collections.deque[_Event]] = {}
        self._lanes: dict[str, threading.Thread] = {}  # subscription id -> its running thread
        self._threads: list[threading.Thread] = []  # started and not yet seen to have ended
        self._counts: dict[str, int] = {}
        self._stop = threading.Event()
        store.add_listener(self._on_change)

    # ------------------------------------------------------------------ lifecycle

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued notification is delivered or given up on (retries
        included) and the delivery threads have ended; False when that did not happen within
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if not self._lock.wait_for(lambda: not self._lanes, timeout):
                return False
        return self._join(deadline)

    def close(self, timeout: float = 10.0) -> None:
        """Stop listening and delivering: waits for requests in flight (at most the request
        timeout each), drops what is still queued."""
        self._stop.set()
        self.store.remove_listener(self._on_change)
        self._join(time.monotonic() + timeout)

    def _join(self, deadline: float) -> bool:
        """Join the delivery threads started so far; True when all of them have ended."""
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
        return not any(t.is_alive() for t in threads)

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    # ------------------------------------------------------------------ matching (writer)

    def _active_rules(self) -> list[SubscriptionRule]:
        rules: list[SubscriptionRule] = []
        offset = 0
        while True:
            page = self.store.search(
                "Subscription",
                [("status", "active"), ("_count", str(MAX_COUNT)), ("_offset", str(offset))],
            )
            for resource in page.resources:
                try:
                    rules.append(parse_subscription(resource))
                except SubscriptionError as exc:  # stored before it was checked
                    log.warning("ignoring Subscription/%s: %s", resource.get("id"), exc)
            if not page.has_next:
                return rules
            offset += MAX_COUNT

    def _on_change(self, resource: JsonDict, created: bool) -> None:
        if self.closed or resource.get("resourceType") == "Subscription":
            return
        matching = [r for r in self._active_rules() if r.id and r.matches(resource)]
        if not matching:
            return
        copy: JsonDict = json.loads(_dump(resource))
        base = self.fhir_base or _request_fhir_base()
        timestamp = now_instant()
        for rule in matching:
            assert rule.id is not None
            self._enqueue(rule.id, copy, created, base, timestamp)

    def _enqueue(
        self, subscription_id: str, resource: JsonDict, created: bool, base: str, timestamp: str
    ) -> None:
        with self._lock:
            number = self._counts.get(subscription_id, 0) + 1
            self._counts[subscription_id] = number
            event = _Event(subscription_id, number, resource, created, base, timestamp)
            self._queues.setdefault(subscription_id, collections.deque()).append(event)
            if subscription_id in self._lanes:
                return
            lane = threading.Thread(
                target=self._run_lane,
                args=(subscription_id,),
                name=f"subscription-{subscription_id[:12]}",
                daemon=True,  # never keeps the process alive; close() stops it cleanly
            )
            self._lanes[subscription_id] = lane
            self._threads.append(lane)
            lane.start()

    # ------------------------------------------------------------------ delivery (lane)

    def _run_lane(self, subscription_id: str) -> None:
        while True:
            with self._lock:
                queue = self._queues.get(subscription_id)
                if not queue or self.closed:
                    self._queues.pop(subscription_id, None)
                    del self._lanes[subscription_id]
                    self._lock.notify_all()
                    return
                event = queue[0]  # left queued while it is delivered, so flush() waits
            try:
                self._deliver(event)
            except Exception:
                log.exception("notification for Subscription/%s failed", subscription_id)
            with self._lock:
                queue.popleft()

    def _current(self, subscription_id: str) -> SubscriptionRule | None:
        """The subscription as stored now, when it still wants notifications: deleting it or
        setting it off (or error) also drops what was queued for it."""
        resource = self.store.read("Subscription", subscription_id)
        if resource is None or resource.get("status") != "active":
            return None
        try:
            return parse_subscription(resource)
        except SubscriptionError:
            return None

    def _deliver(self, event: _Event) -> None:
        settings = self.delivery
        attempts = max(1, settings.attempts)
        for attempt in range(1, attempts + 1):
            rule = self._current(event.subscription_id)
            if rule is None:
                return
            try:
                self._send(rule.channel, event)
            except DeliveryFailed as exc:
                log.info(
                    "Subscription/%s: attempt %d of %d failed: %s",
                    event.subscription_id,
                    attempt,
                    attempts,
                    exc,
                )
                if attempt == attempts:
                    rtype, rid = event.resource["resourceType"], event.resource["id"]
                    self._record(
                        event.subscription_id,
                        f"{now_instant()}: notification of {rtype}/{rid} failed after "
                        f"{attempts} attempt{'s' if attempts > 1 else ''}: {exc}",
                    )
                    return
                if self._stop.wait(settings.retry_delay_s * 2 ** (attempt - 1)):
                    return
                continue
            self._record(event.subscription_id, None)
            return

    def _send(self, hook: RestHook, event: _Event) -> None:
        headers = dict(hook.headers)
        if hook.payload == "full-resource":
            method, url, body = "PUT", _resource_url(hook.endpoint, event.resource), event.resource
        elif hook.payload == "id-only":
            method, url, body = "POST", hook.endpoint, id_only_bundle(event)
        else:
            method, url, body = "POST", hook.endpoint, None
        if body is not None:
            headers["Content-Type"] = FHIR_JSON
        timeout = self.delivery.timeout_s
        try:
            response = requests.request(
                method,
                url,
                data=_dump(body) if body is not None else b"",
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
                stream=True,  # the answer's body is not needed, only its status
            )
        except requests.Timeout:
            raise DeliveryFailed(f"the endpoint did not answer within {timeout:g} s") from None
        except requests.ConnectionError:
            raise DeliveryFailed("could not connect to the endpoint") from None
        except requests.RequestException as exc:
            raise DeliveryFailed(f"the request failed ({type(exc).__name__})") from None
        response.close()
        if not 200 <= response.status_code < 300:
            raise DeliveryFailed(f"the endpoint answered HTTP {response.status_code}")

    def _record(self, subscription_id: str, error: str | None) -> None:
        """Set the subscription to ``error`` with the reason, or (``error`` None, after a
        delivery succeeded) clear the reason an earlier failure left. Only an active
        subscription is touched: one its owner changed meanwhile is left as they made it."""
        for _ in range(3):
            current = self.store.read("Subscription", subscription_id)
            if current is None or current.get("status") != "active":
                return
            if error is None and "error" not in current:
                return
            updated: dict[str, Any] = {k: v for k, v in current.items() if k != "error"}
            if error is not None:
                updated["status"] = "error"
                updated["error"] = error
            version = str((current.get("meta") or {}).get("versionId", ""))
            try:
                self.store.update(updated, if_match=version or None)
                return
            except VersionConflictError:
                continue  # written meanwhile: look again
            except InvalidResourceError as exc:
                log.warning("cannot record delivery state of %s: %s", subscription_id, exc)
                return
