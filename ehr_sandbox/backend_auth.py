"""SMART Backend Services for the sandbox: registered clients and the client_credentials grant."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from ehr_sandbox.access_tokens import TokenStore

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# SMART App Launch 2.x, Backend Services: the client signs with RS384 or ES384.
ASSERTION_ALGORITHMS = frozenset({"RS384", "ES384"})
MAX_ASSERTION_LIFETIME_S = 300
CLOCK_SKEW_S = 60
TOKEN_LIFETIME_S = 300

SCHEMA = """
CREATE TABLE IF NOT EXISTS backend_clients (
    client_id TEXT PRIMARY KEY, jwks TEXT NOT NULL, scope TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS used_assertions (
    client_id TEXT NOT NULL, jti TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (client_id, jti)
);
"""


class TokenError(Exception):
    """An OAuth 2.0 error answer (RFC 6749 section 5.2)."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.status = status
        self.error = error
        self.description = description


class BackendServices:
    """Client registry plus token endpoint logic; the web layer only forwards the form."""

    def __init__(self, database: str | Path, tokens: TokenStore) -> None:
        self.database = Path(database)
        self.tokens = tokens
        with self._connect() as conn:
            conn.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.database, timeout=10.0)
        try:
            with conn:
                yield conn
        finally:
            conn.close()

    def register(self, client_id: str, jwks: Mapping[str, Any], scope: str) -> None:
        """Register (or replace) a backend client's public keys and allowed scopes."""
        KeySet.import_key_set(json.loads(json.dumps(jwks)))  # refuse a bad key set now
        with self._connect() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO backend_clients VALUES (?, ?, ?)",
                (client_id, json.dumps(jwks), scope),
            )

    def _client(self, client_id: str) -> tuple[dict[str, Any], set[str]] | None:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT jwks, scope FROM backend_clients WHERE client_id = ?", (client_id,)
            ).fetchone()
        return (json.loads(row[0]), set(row[1].split())) if row else None

    def token(self, form: Mapping[str, str], token_url: str) -> dict[str, Any]:
        """Answer a client_credentials request with private_key_jwt, or raise TokenError."""
        if form.get("grant_type") != "client_credentials":
            raise TokenError(400, "unsupported_grant_type", "only client_credentials")
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise TokenError(400, "invalid_request", "client_assertion_type must be jwt-bearer")
        client_id, claims = self._verify_assertion(form.get("client_assertion", ""), token_url)
        registered = self._client(client_id)
        assert registered is not None  # checked in _verify_assertion
        requested = form.get("scope", "").split()
        granted = [s for s in requested if s in registered[1]]
        if not granted:
            raise TokenError(400, "invalid_scope", "none of the requested scopes is allowed")
        self._remember_jti(client_id, str(claims["jti"]), float(claims["exp"]))
        token = self.tokens.issue(client_id, " ".join(granted), None, TOKEN_LIFETIME_S)
        return {
            "access_token": token.token,
            "token_type": "bearer",
            "expires_in": TOKEN_LIFETIME_S,
            "scope": token.scope,
        }

    def _verify_assertion(self, assertion: str, token_url: str) -> tuple[str, dict[str, Any]]:
        try:
            header = jws.extract_compact(assertion.encode("ascii")).headers()
            unverified = json.loads(jws.extract_compact(assertion.encode("ascii")).payload)
        except (JoseError, ValueError, UnicodeError, RecursionError, TypeError):
            raise TokenError(401, "invalid_client", "malformed client assertion") from None
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in ASSERTION_ALGORITHMS or not isinstance(kid, str):
            raise TokenError(401, "invalid_client", "assertion must be RS384/ES384 with a kid")
        client_id = unverified.get("iss") if isinstance(unverified, dict) else None
        registered = self._client(client_id) if isinstance(client_id, str) else None
        if registered is None or client_id is None:
            raise TokenError(401, "invalid_client", "unknown client")
        keys = [k for k in registered[0].get("keys", []) if k.get("kid") == kid]
        if not keys:
            raise TokenError(401, "invalid_client", "unknown kid")
        try:
            key = KeySet.import_key_set({"keys": keys}).keys[0]
            claims = jwt.decode(assertion, key, algorithms=[alg]).claims
        except (JoseError, ValueError):
            raise TokenError(401, "invalid_client", "bad assertion signature") from None
        now = time.time()
        exp = claims.get("exp")
        if isinstance(exp, bool) or (isinstance(exp, float) and not math.isfinite(exp)):
            raise TokenError(401, "invalid_client", "exp is not a number")
        if claims.get("sub") != client_id:
            raise TokenError(401, "invalid_client", "sub must equal iss (the client_id)")
        aud = claims.get("aud")
        if not (aud == token_url or (isinstance(aud, list) and token_url in aud)):
            raise TokenError(401, "invalid_client", "aud must be the token URL")
        if not isinstance(exp, int | float) or exp < now - CLOCK_SKEW_S:
            raise TokenError(401, "invalid_client", "assertion expired")
        if exp > now + MAX_ASSERTION_LIFETIME_S + CLOCK_SKEW_S:
            raise TokenError(401, "invalid_client", "assertion lives longer than 5 minutes")
        if not isinstance(claims.get("jti"), str) or not claims["jti"]:
            raise TokenError(401, "invalid_client", "assertion has no jti")
        return client_id, dict(claims)

    def _remember_jti(self, client_id: str, jti: str, expires_at: float) -> None:
        with self._connect() as conn:
            conn.execute("DELETE FROM used_assertions WHERE expires_at < ?", (time.time() - 600,))
            cursor = conn.execute(
                "INSERT OR IGNORE INTO used_assertions VALUES (?, ?, ?)",
                (client_id, jti, expires_at),
            )
            if cursor.rowcount != 1:
                raise TokenError(401, "invalid_client", "assertion jti already used")
