"""Opaque access tokens the sandbox issues (for fhirAuthorization), kept in its SQLite file."""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS access_tokens (
    token TEXT PRIMARY KEY, client_id TEXT NOT NULL, scope TEXT NOT NULL,
    patient TEXT, expires_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class AccessToken:
    token: str
    client_id: str
    scope: str
    patient: str | None
    expires_at: float

    @property
    def expires_in(self) -> int:
        return max(0, int(self.expires_at - time.time()))


class TokenStore:
    """Issues and checks bearer tokens (ehr_sandbox.auth.policy enforces their scopes)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with self._connect() as conn:
            conn.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=10.0)
        try:
            with conn:  # commits on success, rolls back on error
                yield conn
        finally:
            conn.close()

    def issue(
        self, client_id: str, scope: str, patient: str | None = None, lifetime_s: int = 300
    ) -> AccessToken:
        return self.save(secrets.token_urlsafe(32), client_id, scope, patient, lifetime_s)

    def save(
        self, value: str, client_id: str, scope: str, patient: str | None, lifetime_s: int
    ) -> AccessToken:
        """Store a token made elsewhere (the SMART authorization server's bearer tokens)."""
        token = AccessToken(
            token=value,
            client_id=client_id,
            scope=scope,
            patient=patient,
            expires_at=time.time() + lifetime_s,
        )
        with self._connect() as conn:
            conn.execute("DELETE FROM access_tokens WHERE expires_at < ?", (time.time() - 3600,))
            conn.execute(
                "INSERT INTO access_tokens VALUES (?, ?, ?, ?, ?)",
                (token.token, client_id, scope, patient, token.expires_at),
            )
        return token

    def lookup(self, token: str) -> AccessToken | None:
        """The token when it exists and has not expired."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT token, client_id, scope, patient, expires_at FROM access_tokens "
                "WHERE token = ?",
                (token,),
            ).fetchone()
        if row is None or row[4] < time.time():
            return None
        return AccessToken(*row)

    def revoke(self, token: str) -> None:
        with self._connect() as conn:
            conn.execute("DELETE FROM access_tokens WHERE token = ?", (token,))
