"""Every JWT attack named in the Foundation issue is answered 401 with no detail."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import requests
from joserfc.jwk import ECKey

from cds_service.config import TrustedIssuer
from tests.conftest import (
    SandboxHandle,
    ServiceHandle,
    claims_for,
    make_service,
    patient_view_body,
    sign,
    start_stub,
)

SERVICE = "cxr-ai-patient-view"
BARE_401 = {"error": "unauthorized", "error_description": "unauthorized"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def post(service: ServiceHandle, token: str | None, sandbox: SandboxHandle) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    body = patient_view_body(fhirServer=sandbox.fhir, fhirAuthorization=sandbox.authorization())
    return requests.post(service.url(SERVICE), json=body, headers=headers, timeout=10)


def valid_claims(service: ServiceHandle, sandbox: SandboxHandle, **changes: Any) -> dict[str, Any]:
    claims = claims_for(sandbox.base, service.url(SERVICE))
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def test_valid_token_is_accepted(service: ServiceHandle, sandbox: SandboxHandle) -> None:
    token = sign(sandbox.sandbox.key.key, valid_claims(service, sandbox))
    response = post(service, token, sandbox)
    assert response.status_code == 200, response.text
    assert response.json()["cards"], "a seeded patient with studies gets cards"


def test_aud_as_array_is_accepted(service: ServiceHandle, sandbox: SandboxHandle) -> None:
    claims = valid_claims(service, sandbox, aud=["https://other.example", service.url(SERVICE)])
    assert post(service, sign(sandbox.sandbox.key.key, claims), sandbox).status_code == 200


def test_extra_claims_sub_and_nbf_are_accepted(
    service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    claims = valid_claims(service, sandbox, sub="some-ehr", nbf=int(time.time()), tenant="t1")
    assert post(service, sign(sandbox.sandbox.key.key, claims), sandbox).status_code == 200


def attack_tokens(service: ServiceHandle, sandbox: SandboxHandle) -> dict[str, str | None]:
    key = sandbox.sandbox.key.key
    kid = sandbox.sandbox.key.kid
    good = valid_claims(service, sandbox)
    payload = b64(json.dumps(good).encode())

    none_header = b64(json.dumps({"alg": "none", "typ": "JWT", "kid": kid}).encode())
    alg_none = f"{none_header}.{payload}."

    # Key confusion: HS256 with the issuer's public key (PEM) as the HMAC secret.
    public_pem = key.as_pem(private=False)
    hs_header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    mac = hmac.new(public_pem, f"{hs_header}.{payload}".encode(), hashlib.sha256).digest()
    hs256 = f"{hs_header}.{payload}.{b64(mac)}"

    valid = sign(key, valid_claims(service, sandbox))
    head, body, signature = valid.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    tampered_signature = f"{head}.{body}.{flipped}"
    tampered_payload = (
        f"{head}.{b64(json.dumps({**good, 'iss': sandbox.base + '/x'}).encode())}.{signature}"
    )

    attacker = ECKey.generate_key("P-384", auto_kid=True)
    now = int(time.time())
    return {
        "alg none": alg_none,
        "HS256 with the public key as secret": hs256,
        "wrong aud": sign(key, valid_claims(service, sandbox, aud=service.base + "/cds-services")),
        "expired": sign(key, valid_claims(service, sandbox, iat=now - 900, exp=now - 600)),
        "iat in the future": sign(
            key, valid_claims(service, sandbox, iat=now + 600, exp=now + 900)
        ),
        "unknown iss": sign(key, valid_claims(service, sandbox, iss="https://evil.example")),
        "unknown kid": sign(key, good, header={"alg": "ES384", "typ": "JWT", "kid": "nope"}),
        "jku not allowlisted": sign(
            key,
            good,
            header={
                "alg": "ES384",
                "typ": "JWT",
                "kid": kid,
                "jku": "http://127.0.0.1:9/jwks.json",
            },
        ),
        "tampered signature": tampered_signature,
        "tampered payload": tampered_payload,
        "attacker key with the issuer's kid": sign(
            attacker, good, header={"alg": "ES384", "typ": "JWT", "kid": kid}
        ),
        "missing jti": sign(key, valid_claims(service, sandbox, jti=None)),
        "alg as a list": f"{b64(json.dumps({'alg': ['ES384'], 'kid': kid}).encode())}.{payload}.",
        "deeply nested payload": f"{none_header}.{b64(b'[' * 5000)}.",
        "exp not finite": sign(key, {**good, "exp": float("inf")}),
        "exp years ahead": sign(key, valid_claims(service, sandbox, exp=now + 10 * 365 * 86400)),
        "nbf not a number": sign(key, valid_claims(service, sandbox, nbf="soon")),
        "nbf in the future": sign(key, valid_claims(service, sandbox, nbf=now + 600)),
        "missing exp": sign(key, valid_claims(service, sandbox, exp=None)),
        "garbage token": "not.a.jwt",
        "missing header": None,
    }


ATTACKS = [
    "alg none",
    "HS256 with the public key as secret",
    "wrong aud",
    "expired",
    "iat in the future",
    "unknown iss",
    "unknown kid",
    "jku not allowlisted",
    "tampered signature",
    "tampered payload",
    "attacker key with the issuer's kid",
    "missing jti",
    "alg as a list",
    "deeply nested payload",
    "exp not finite",
    "exp years ahead",
    "nbf not a number",
    "nbf in the future",
    "missing exp",
    "garbage token",
    "missing header",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_is_rejected_with_bare_401(
    attack: str, service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    token = attack_tokens(service, sandbox)[attack]
    response = post(service, token, sandbox)
    assert response.status_code == 401
    assert response.json() == BARE_401


def test_replayed_jti_is_rejected(service: ServiceHandle, sandbox: SandboxHandle) -> None:
    token = sign(sandbox.sandbox.key.key, valid_claims(service, sandbox))
    assert post(service, token, sandbox).status_code == 200
    replay = post(service, token, sandbox)
    assert replay.status_code == 401
    assert replay.json() == BARE_401


def test_clock_skew_within_60s_is_tolerated(service: ServiceHandle, sandbox: SandboxHandle) -> None:
    now = int(time.time())
    claims = valid_claims(service, sandbox, iat=now + 30, exp=now - 30 + 300)
    assert post(service, sign(sandbox.sandbox.key.key, claims), sandbox).status_code == 200
    expired_recently = valid_claims(service, sandbox, iat=now - 400, exp=now - 30)
    assert (
        post(service, sign(sandbox.sandbox.key.key, expired_recently), sandbox).status_code == 200
    )


def test_feedback_endpoint_needs_a_token_too(service: ServiceHandle) -> None:
    response = requests.post(
        service.url(SERVICE) + "/feedback",
        json={
            "feedback": [
                {"card": "x", "outcome": "accepted", "outcomeTimestamp": "2026-01-01T00:00:00Z"}
            ]
        },
        timeout=10,
    )
    assert response.status_code == 401


def test_remote_jwks_and_allowlisted_jku_are_used(tmp_path: Path, sandbox: SandboxHandle) -> None:
    """Keys fetched from the issuer's jwks_url, and from a jku on its allowlist."""
    jwks_url = f"{sandbox.base}/.well-known/jwks.json"
    remote = TrustedIssuer(
        iss=sandbox.base, jwks_url=jwks_url, allowed_jku=(jwks_url,), fhir_servers=(sandbox.fhir,)
    )
    handle, server = make_service(tmp_path, sandbox, trusted_issuers=(remote,))
    try:
        key = sandbox.sandbox.key
        plain = sign(key.key, valid_claims(handle, sandbox))
        assert post(handle, plain, sandbox).status_code == 200
        with_jku = sign(
            key.key,
            valid_claims(handle, sandbox),
            header={"alg": "ES384", "typ": "JWT", "kid": key.kid, "jku": jwks_url},
        )
        assert post(handle, with_jku, sandbox).status_code == 200
    finally:
        server.stop()


@pytest.mark.parametrize("alg", ["RS384", "RS256", "ES256"])
def test_other_allowed_algorithms_are_accepted(
    alg: str, tmp_path: Path, sandbox: SandboxHandle
) -> None:
    """ES384 and RS384 are recommended (Req 205); ES256 and RS256 are also allowed."""
    from joserfc.jwk import RSAKey

    key = (
        RSAKey.generate_key(2048, auto_kid=True)
        if alg.startswith("RS")
        else ECKey.generate_key("P-256", auto_kid=True)
    )
    jwks = {"keys": [{**key.as_dict(private=False), "kid": key.kid}]}
    issuer = TrustedIssuer(iss="https://rsa-ehr.example", jwks=jwks, fhir_servers=(sandbox.fhir,))
    handle, server = make_service(tmp_path, sandbox, trusted_issuers=(issuer,))
    try:
        claims = claims_for("https://rsa-ehr.example", handle.url(SERVICE))
        token = sign(key, claims, header={"alg": alg, "typ": "JWT", "kid": key.kid}, alg=alg)
        assert post(handle, token, sandbox).status_code == 200
        # The same key under an algorithm outside the allowlist (PS384) is refused.
        if alg.startswith("RS"):
            bad = sign(
                key,
                claims_for("https://rsa-ehr.example", handle.url(SERVICE)),
                header={"alg": "PS384", "typ": "JWT", "kid": key.kid},
                alg="PS384",
            )
            assert post(handle, bad, sandbox).status_code == 401
    finally:
        server.stop()


class FailingJwks(BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        FailingJwks.hits += 1
        self.send_response(503)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_forged_tokens_cannot_drive_jwks_fetches(tmp_path: Path, sandbox: SandboxHandle) -> None:
    """An unreachable JWKS is tried once per 30 s, not twice per forged token."""
    stub, stub_base = start_stub(FailingJwks)
    jwks_url = f"{stub_base}/jwks.json"
    issuer = TrustedIssuer(iss="https://remote.example", jwks_url=jwks_url)
    handle, server = make_service(tmp_path, sandbox, trusted_issuers=(issuer,))
    FailingJwks.hits = 0
    try:
        forger = ECKey.generate_key("P-384", auto_kid=True)
        for _ in range(5):
            token = sign(forger, claims_for(issuer.iss, handle.url(SERVICE)))
            assert post(handle, token, sandbox).status_code == 401
        assert FailingJwks.hits == 1
    finally:
        server.stop()
        stub.shutdown()
