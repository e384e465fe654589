"""Verification of the CDS client's bearer JWT (CDS Hooks 2.0, "Trusting CDS Clients")."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import requests
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, RSAKey

from cds_service.config import ALLOWED_JWT_ALGORITHMS, TrustedIssuer
from cds_service.errors import Unauthorized
from cds_service.storage.ports import ReplayCache

log = logging.getLogger(__name__)

JWKS_CACHE_SECONDS = 300.0
JWKS_MIN_REFRESH_SECONDS = 30.0
JWKS_MAX_BYTES = 256 * 1024
MAX_TOKEN_CHARS = 16 * 1024
# CDS clients sign a token per call (the public sandbox: 300 s); refuse long-lived ones so
# that a stolen token is short-lived and the replay cache stays small.
MAX_TOKEN_LIFETIME_S = 3600
_PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


@dataclass(frozen=True)
class VerifiedClient:
    """A CDS client whose JWT passed every check."""

    issuer: TrustedIssuer
    claims: Mapping[str, Any]


class JwksFetcher:
    """Fetches remote JWK Sets with timeouts, a size cap and a cache. Only allowlisted URLs."""

    def __init__(
        self,
        session: requests.Session | None = None,
        timeout: tuple[float, float] = (2.0, 3.0),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session or requests.Session()
        self._timeout = timeout
        self._clock = clock
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._attempts: dict[str, float] = {}
        self._lock = threading.Lock()

    def get(self, url: str, *, refresh: bool = False) -> dict[str, Any] | None:
        """The key set at `url`: cached for 5 minutes; a refresh (unknown kid) or a retry after
        a failure happens at most every 30 s, so forged tokens cannot drive outbound calls."""
        now = self._clock()
        with self._lock:
            cached = self._cache.get(url)
            if cached is not None and now - cached[0] < JWKS_CACHE_SECONDS and not refresh:
                return cached[1]
            last_try = self._attempts.get(url)
            if last_try is not None and now - last_try < JWKS_MIN_REFRESH_SECONDS:
                return cached[1] if cached else None
            self._attempts[url] = now
        keyset = self._fetch(url)
        if keyset is None:
            return cached[1] if cached else None
        with self._lock:
            self._cache[url] = (now, keyset)
        return keyset

    def _fetch(self, url: str) -> dict[str, Any] | None:
        try:
            response = self._session.get(
                url, timeout=self._timeout, allow_redirects=False, stream=True
            )
            body = response.raw.read(JWKS_MAX_BYTES + 1, decode_content=True)
            response.close()
            if response.status_code != 200 or len(body) > JWKS_MAX_BYTES:
                log.warning("JWKS fetch from %s answered %s", url, response.status_code)
                return None
            keyset = json.loads(body)
        except (requests.RequestException, ValueError, RecursionError) as exc:
            log.warning("JWKS fetch from %s failed: %s", url, type(exc).__name__)
            return None
        if not isinstance(keyset, dict) or not isinstance(keyset.get("keys"), list):
            return None
        return keyset


def _is_instant(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _deny(reason: str, *args: object) -> Unauthorized:
    # The reason is logged for the operator; the caller only ever sees a bare 401.
    log.info("client JWT rejected: " + reason, *args)
    return Unauthorized()


class ClientJwtVerifier:
    """Checks issuer allowlist, key, algorithm, signature, aud, exp/iat and jti replay."""

    def __init__(
        self,
        issuers: tuple[TrustedIssuer, ...],
        jti_store: ReplayCache,
        jwks_fetcher: JwksFetcher | None = None,
        leeway_s: int = 60,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._issuers = {issuer.iss: issuer for issuer in issuers}
        self._jti_store = jti_store
        self._fetcher = jwks_fetcher or JwksFetcher()
        self._leeway = leeway_s
        self._clock = clock
        self._key_cache: dict[str, ECKey | RSAKey | None] = {}

    def verify(self, authorization: str | None, audience: str) -> VerifiedClient:
        """Return the verified client or raise Unauthorized (with no detail for the caller)."""
        if not authorization or not authorization.startswith("Bearer "):
            raise _deny("no bearer token")
        token = authorization[len("Bearer ") :].strip()
        if len(token) > MAX_TOKEN_CHARS:
            raise _deny("token too long")
        try:
            unverified = jws.extract_compact(token.encode("ascii"))
            header = unverified.headers()
            payload = json.loads(unverified.payload)
        except (JoseError, ValueError, UnicodeError, RecursionError, TypeError) as exc:
            raise _deny("malformed token: %s", type(exc).__name__) from exc
        if not isinstance(header, dict):
            raise _deny("header is not an object")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_JWT_ALGORITHMS:
            raise _deny("algorithm %r not allowed", alg)
        if header.get("typ") not in (None, "JWT", "jwt"):
            raise _deny("typ %r", header.get("typ"))
        if not isinstance(payload, dict) or not isinstance(payload.get("iss"), str):
            raise _deny("no iss claim")
        issuer = self._issuers.get(payload["iss"])
        if issuer is None:
            raise _deny("issuer not trusted")
        key = self._find_key(issuer, header)
        try:
            token_obj = jwt.decode(token, key, algorithms=[alg])
        except (JoseError, ValueError) as exc:
            raise _deny("signature: %s", type(exc).__name__) from exc
        claims = token_obj.claims
        self._check_claims(claims, audience)
        if not self._jti_store.remember_jti(issuer.iss, claims["jti"], int(claims["exp"])):
            raise _deny("jti replayed")
        return VerifiedClient(issuer=issuer, claims=claims)

    def _find_key(self, issuer: TrustedIssuer, header: Mapping[str, Any]) -> ECKey | RSAKey:
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _deny("no kid")
        jku = None if issuer.ignore_jku else header.get("jku")
        if jku is not None:
            # Fetching an arbitrary jku is a server-side request forgery hole: allowlist only.
            if jku not in issuer.allowed_jku:
                raise _deny("jku not on the issuer's allowlist")
            source: str | None = jku
        elif issuer.jwks is not None:
            source = None
        else:
            source = issuer.jwks_url
        keyset = self._keyset(issuer, source, refresh=False)
        key = self._pick(keyset, kid)
        if key is None and source is not None:
            key = self._pick(self._keyset(issuer, source, refresh=True), kid)
        if key is None:
            raise _deny("unknown kid")
        if key.get("alg") not in (None, header.get("alg")):
            raise _deny("key alg does not match header alg")
        return key

    def _keyset(
        self, issuer: TrustedIssuer, source: str | None, *, refresh: bool
    ) -> Mapping[str, Any] | None:
        if source is None:
            return issuer.jwks
        return self._fetcher.get(source, refresh=refresh)

    def _pick(self, keyset: Mapping[str, Any] | None, kid: str) -> ECKey | RSAKey | None:
        if keyset is None:
            return None
        for jwk_dict in keyset.get("keys", []):
            if isinstance(jwk_dict, dict) and jwk_dict.get("kid") == kid:
                return self._import_public(jwk_dict)
        return None

    def _import_public(self, jwk_dict: Mapping[str, Any]) -> ECKey | RSAKey | None:
        """Import a public EC/RSA JWK once; cached by content, so a rotated key re-imports."""
        if jwk_dict.get("kty") not in ("EC", "RSA"):
            return None
        public = {k: v for k, v in jwk_dict.items() if k not in _PRIVATE_JWK_MEMBERS}
        cache_key = json.dumps(public, sort_keys=True)
        if cache_key in self._key_cache:
            return self._key_cache[cache_key]
        try:
            imported = KeySet.import_key_set({"keys": [public]}).keys[0]
        except (JoseError, ValueError, TypeError, KeyError):
            return None
        key = imported if isinstance(imported, ECKey | RSAKey) else None
        if len(self._key_cache) < 256:
            self._key_cache[cache_key] = key
        return key

    def _check_claims(self, claims: Mapping[str, Any], audience: str) -> None:
        now = self._clock()
        for name in ("aud", "exp", "iat", "jti"):
            if name not in claims:
                raise _deny("missing claim %s", name)
        aud = claims["aud"]
        audiences = [aud] if isinstance(aud, str) else aud
        if not isinstance(audiences, list) or audience not in audiences:
            raise _deny("aud does not name this endpoint")
        exp, iat, nbf = claims["exp"], claims["iat"], claims.get("nbf", now)
        if not all(_is_instant(value) for value in (exp, iat, nbf)):
            raise _deny("exp/iat/nbf not finite numbers")
        if exp < now - self._leeway:
            raise _deny("expired")
        if exp > now + MAX_TOKEN_LIFETIME_S + self._leeway:
            raise _deny("exp too far in the future")
        if iat > now + self._leeway:
            raise _deny("iat in the future")
        if nbf > now + self._leeway:
            raise _deny("not yet valid")
        if not isinstance(claims["jti"], str) or not claims["jti"]:
            raise _deny("jti empty")
