"""A CDS Hooks 2.0 client: signs ES384 JWTs, computes prefetch from discovery, calls any service."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from joserfc import jwt
from joserfc.jwk import ECKey

from ehr_sandbox.secret_files import load_or_create

log = logging.getLogger(__name__)

TOKEN_PATTERN = re.compile(r"\{\{\s*([A-Za-z0-9_.]+)\s*\}\}")
JWT_LIFETIME_S = 300


class CdsClientError(Exception):
    """The service could not be reached or answered with something that is not CDS Hooks."""


class SigningKey:
    """The client's ES384 key, kept as a JWK file (created on first use, mode 0600)."""

    def __init__(self, key: ECKey) -> None:
        self.key = key

    @property
    def kid(self) -> str:
        return str(self.key.kid)

    @classmethod
    def load_or_create(cls, path: str | Path) -> SigningKey:
        def new_key() -> bytes:
            key = ECKey.generate_key("P-384", auto_kid=True)
            return json.dumps(key.as_dict(private=True)).encode("utf-8")

        # Worker processes starting together share one key (made once, never half-written).
        stored = load_or_create(Path(path), new_key)
        return cls(ECKey.import_key(json.loads(stored)))

    def public_jwks(self) -> dict[str, Any]:
        public = self.key.as_dict(private=False)
        public.update({"use": "sig", "alg": "ES384", "kid": self.kid})
        return {"keys": [public]}

    def sign(self, issuer: str, audience: str, jku: str | None = None) -> str:
        """A CDS Hooks client JWT for one call: aud is exactly the URL called."""
        now = int(time.time())
        header: dict[str, Any] = {"alg": "ES384", "typ": "JWT", "kid": self.kid}
        if jku:
            header["jku"] = jku
        claims = {
            "iss": issuer,
            "aud": audience,
            "exp": now + JWT_LIFETIME_S,
            "iat": now,
            "jti": str(uuid.uuid4()),
        }
        return jwt.encode(header, claims, self.key, algorithms=["ES384"])


@dataclass
class HookCall:
    """What a hook call sent and got back, for printing and for tests."""

    service_url: str
    request: dict[str, Any]
    status: int
    response: Any


def _token_values(context: dict[str, Any]) -> dict[str, str]:
    values = {f"context.{k}": v for k, v in context.items() if isinstance(v, str | int | float)}
    user = str(context.get("userId", ""))
    for prefix, name in (
        ("Practitioner/", "userPractitionerId"),
        ("PractitionerRole/", "userPractitionerRoleId"),
        ("Patient/", "userPatientId"),
        ("RelatedPerson/", "userRelatedPersonId"),
    ):
        if user.startswith(prefix):
            values[name] = user[len(prefix) :]
    return {k: str(v) for k, v in values.items()}


def render_template(template: str, context: dict[str, Any]) -> str | None:
    """Fill {{tokens}} in a prefetch template; None when a token has no value (2.0 rules)."""
    values = _token_values(context)
    missing = False

    def substitute(match: re.Match[str]) -> str:
        nonlocal missing
        value = values.get(match.group(1))
        if value is None:
            missing = True
            return ""
        return value

    rendered = TOKEN_PATTERN.sub(substitute, template)
    return None if missing else rendered


class CdsHooksClient:
    """Calls CDS services the way an EHR does."""

    def __init__(
        self,
        issuer: str,
        key: SigningKey,
        *,
        jku: str | None = None,
        timeout: tuple[float, float] = (3.0, 30.0),
        session: requests.Session | None = None,
    ) -> None:
        self.issuer = issuer
        self.key = key
        self.jku = jku
        self.timeout = timeout
        self.session = session or requests.Session()

    def discover(self, base_url: str) -> list[dict[str, Any]]:
        url = f"{base_url.rstrip('/')}/cds-services"
        try:
            response = self.session.get(url, timeout=self.timeout)
            body = response.json()
        except (requests.RequestException, ValueError) as exc:
            raise CdsClientError(f"discovery at {url} failed: {exc}") from exc
        if (
            response.status_code != 200
            or not isinstance(body, dict)
            or not isinstance(body.get("services"), list)
        ):
            raise CdsClientError(f"discovery at {url} answered {response.status_code}")
        return [s for s in body["services"] if isinstance(s, dict) and isinstance(s.get("id"), str)]

    def prefetch(
        self,
        templates: dict[str, str],
        context: dict[str, Any],
        fhir_server: str,
        access_token: str | None,
    ) -> dict[str, Any]:
        """Run each template against the FHIR server: a resource, null, or an OperationOutcome."""
        headers = {"Accept": "application/fhir+json"}
        if access_token:
            headers["Authorization"] = f"Bearer {access_token}"
        result: dict[str, Any] = {}
        for key, template in templates.items():
            query = render_template(template, context)
            if query is None:
                continue  # a token we cannot fill: leave the key out (the service may fetch)
            try:
                response = self.session.get(
                    f"{fhir_server.rstrip('/')}/{query}", headers=headers, timeout=self.timeout
                )
                body = response.json()
            except (requests.RequestException, ValueError):
                continue
            if response.status_code == 404:
                result[key] = None
            elif isinstance(body, dict) and (
                response.status_code == 200 or body.get("resourceType") == "OperationOutcome"
            ):
                result[key] = body  # a result, or the error as an OperationOutcome
        return result

    def build_request(
        self,
        service: dict[str, Any],
        context: dict[str, Any],
        fhir_server: str | None,
        fhir_authorization: dict[str, Any] | None,
        *,
        with_prefetch: bool = True,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "hook": service["hook"],
            "hookInstance": str(uuid.uuid4()),
            "context": context,
        }
        if fhir_server:
            body["fhirServer"] = fhir_server
        if fhir_authorization:
            body["fhirAuthorization"] = fhir_authorization
        templates = service.get("prefetch") or {}
        if with_prefetch and templates and fhir_server:
            token = (fhir_authorization or {}).get("access_token")
            prefetched = self.prefetch(templates, context, fhir_server, token)
            if prefetched:
                body["prefetch"] = prefetched
        return body

    def call(self, base_url: str, service_id: str, body: dict[str, Any]) -> HookCall:
        url = f"{base_url.rstrip('/')}/cds-services/{service_id}"
        token = self.key.sign(self.issuer, url, self.jku)
        try:
            response = self.session.post(
                url,
                json=body,
                headers={"Authorization": f"Bearer {token}"},
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            raise CdsClientError(f"calling {url} failed: {exc}") from exc
        try:
            parsed: Any = response.json()
        except ValueError:
            parsed = response.text
        return HookCall(service_url=url, request=body, status=response.status_code, response=parsed)

    def fire(
        self,
        base_url: str,
        hook: str,
        context: dict[str, Any],
        fhir_server: str | None,
        fhir_authorization: dict[str, Any] | None,
        *,
        with_prefetch: bool = True,
    ) -> list[HookCall]:
        """Call every service of `base_url` that answers `hook`."""
        calls = []
        for service in self.discover(base_url):
            if service.get("hook") != hook:
                continue
            body = self.build_request(
                service, context, fhir_server, fhir_authorization, with_prefetch=with_prefetch
            )
            calls.append(self.call(base_url, str(service["id"]), body))
        return calls


def hook_context(
    hook: str, patient_id: str, user_id: str, order: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The context object of patient-view, order-select or order-sign (CDS Hooks 2.0 hooks)."""
    context: dict[str, Any] = {"userId": user_id, "patientId": patient_id}
    if hook in ("order-select", "order-sign"):
        if order is None:
            raise ValueError(f"{hook} needs a draft order")
        context["draftOrders"] = {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": order}],
        }
        if hook == "order-select":
            context["selections"] = [f"{order['resourceType']}/{order['id']}"]
    return context


def draft_imaging_order(patient_id: str, code: str, system: str, display: str) -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "id": f"draft-{uuid.uuid4().hex[:12]}",
        "status": "draft",
        "intent": "order",
        "code": {"coding": [{"system": system, "code": code, "display": display}], "text": display},
        "subject": {"reference": f"Patient/{patient_id}"},
    }


def format_cards(call: HookCall) -> str:
    """A human-readable rendering of a hook answer; tolerant of services that break the spec."""
    lines = [f"== {call.service_url} -> HTTP {call.status}"]
    cards = call.response.get("cards") if isinstance(call.response, dict) else None
    if call.status != 200 or not isinstance(cards, list):
        lines.append(f"   {str(call.response)[:2000]}")
        return "\n".join(lines)
    if not cards:
        lines.append("   (no cards)")
    for item in cards:
        card: dict[str, Any] = item if isinstance(item, dict) else {}
        source = card["source"] if isinstance(card.get("source"), dict) else {}
        lines.append(f"   [{str(card.get('indicator', '?')).upper():8}] {card.get('summary', '?')}")
        lines.append(f"              source: {source.get('label', '?')}")
        links = card["links"] if isinstance(card.get("links"), list) else []
        for link in links:
            if isinstance(link, dict):
                lines.append(
                    f"              link ({link.get('type', '?')}): {link.get('label', '?')} -> "
                    f"{link.get('url', '?')}"
                )
    return "\n".join(lines)
