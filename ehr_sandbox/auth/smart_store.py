"""The SMART authorization server's state in the sandbox's SQLite file: registered apps,
EHR launch contexts, authorization codes and refresh tokens."""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS smart_apps (
    client_id TEXT PRIMARY KEY, name TEXT NOT NULL, redirect_uris TEXT NOT NULL,
    launch_url TEXT NOT NULL, scope TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS smart_launches (
    launch TEXT PRIMARY KEY, client_id TEXT NOT NULL, context TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS smart_codes (
    code TEXT PRIMARY KEY, client_id TEXT NOT NULL, redirect_uri TEXT NOT NULL,
    scope TEXT NOT NULL, challenge TEXT NOT NULL, challenge_method TEXT NOT NULL,
    context TEXT NOT NULL, expires_at REAL NOT NULL, used INTEGER NOT NULL DEFAULT 0,
    issued TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS smart_refresh_tokens (
    token TEXT PRIMARY KEY, client_id TEXT NOT NULL, scope TEXT NOT NULL,
    context TEXT NOT NULL, expires_at REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0
);
"""
LAUNCH_LIFETIME_S = 600
CODE_LIFETIME_S = 120
REFRESH_LIFETIME_S = 24 * 3600


@dataclass(frozen=True)
class SmartApp:
    """A registered public SMART app (PKCE, no client secret)."""

    client_id: str
    name: str
    redirect_uris: tuple[str, ...]
    launch_url: str
    scope: str


@dataclass(frozen=True)
class LaunchContext:
    """Who launched the app and on what: sent back beside the access token."""

    user: str  # the fhirUser, e.g. Practitioner/sandbox-clinician
    patient: str | None = None
    encounter: str | None = None
    fhir_context: list[dict[str, str]] = field(default_factory=list)
    need_patient_banner: bool = True
    app_context: str | None = None  # a CDS Hooks card link's appContext, passed through

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LaunchContext:
        return cls(**json.loads(text))

    def token_fields(self) -> dict[str, Any]:
        """The SMART launch-context fields of a token response (only those that are set)."""
        fields: dict[str, Any] = {"need_patient_banner": self.need_patient_banner}
        if self.patient:
            fields["patient"] = self.patient
        if self.encounter:
            fields["encounter"] = self.encounter
        if self.fhir_context:
            fields["fhirContext"] = self.fhir_context
        if self.app_context:
            fields["appContext"] = self.app_context
        return fields


@dataclass(frozen=True)
class AuthorizationCode:
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    challenge: str
    challenge_method: str
    context: LaunchContext
    expires_at: float
    used: bool


@dataclass(frozen=True)
class RefreshToken:
    token: str
    client_id: str
    scope: str
    context: LaunchContext
    expires_at: float
    revoked: bool


class SmartStore:
    def __init__(self, database: str | Path) -> None:
        self.database = Path(database)
        with self._connect() as conn:
            conn.executescript(SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(smart_codes)")}
            if "issued" not in columns:  # files made before replay revocation existed
                conn.execute("ALTER TABLE smart_codes ADD COLUMN issued TEXT NOT NULL DEFAULT '[]'")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.database, timeout=10.0)
        try:
            with conn:
                yield conn
        finally:
            conn.close()

    # -- apps -------------------------------------------------------------------------------
    def register_app(self, app: SmartApp) -> None:
        with self._connect() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO smart_apps VALUES (?, ?, ?, ?, ?)",
                (app.client_id, app.name, json.dumps(app.redirect_uris), app.launch_url, app.scope),
            )

    def app(self, client_id: str) -> SmartApp | None:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT client_id, name, redirect_uris, launch_url, scope FROM smart_apps "
                "WHERE client_id = ?",
                (client_id,),
            ).fetchone()
        if row is None:
            return None
        return SmartApp(row[0], row[1], tuple(json.loads(row[2])), row[3], row[4])

    def apps(self) -> list[SmartApp]:
        with self._connect() as conn:
            ids = [r[0] for r in conn.execute("SELECT client_id FROM smart_apps ORDER BY name")]
        return [app for client_id in ids if (app := self.app(client_id)) is not None]

    # -- EHR launches -----------------------------------------------------------------------
    def create_launch(self, client_id: str, context: LaunchContext) -> str:
        launch = secrets.token_urlsafe(24)
        with self._connect() as conn:
            conn.execute("DELETE FROM smart_launches WHERE expires_at < ?", (time.time(),))
            conn.execute(
                "INSERT INTO smart_launches VALUES (?, ?, ?, ?)",
                (launch, client_id, context.to_json(), time.time() + LAUNCH_LIFETIME_S),
            )
        return launch

    def launch(self, launch: str, client_id: str) -> LaunchContext | None:
        """The context of a live launch made for this client."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT context FROM smart_launches WHERE launch = ? AND client_id = ? "
                "AND expires_at >= ?",
                (launch, client_id, time.time()),
            ).fetchone()
        return LaunchContext.from_json(row[0]) if row else None

    # -- authorization codes ----------------------------------------------------------------
    def save_code(self, code: AuthorizationCode) -> None:
        with self._connect() as conn:
            conn.execute("DELETE FROM smart_codes WHERE expires_at < ?", (time.time() - 3600,))
            conn.execute(
                "INSERT INTO smart_codes (code, client_id, redirect_uri, scope, challenge, "
                "challenge_method, context, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    code.code,
                    code.client_id,
                    code.redirect_uri,
                    code.scope,
                    code.challenge,
                    code.challenge_method,
                    code.context.to_json(),
                    code.expires_at,
                ),
            )

    def code(self, code: str) -> AuthorizationCode | None:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT code, client_id, redirect_uri, scope, challenge, challenge_method, "
                "context, expires_at, used FROM smart_codes WHERE code = ?",
                (code,),
            ).fetchone()
        if row is None:
            return None
        return AuthorizationCode(
            code=row[0],
            client_id=row[1],
            redirect_uri=row[2],
            scope=row[3],
            challenge=row[4],
            challenge_method=row[5],
            context=LaunchContext.from_json(row[6]),
            expires_at=float(row[7]),
            used=bool(row[8]),
        )

    def use_code(self, code: str) -> bool:
        """Mark a code used; False when it was used already (a replay)."""
        with self._connect() as conn:
            cursor = conn.execute(
                "UPDATE smart_codes SET used = 1 WHERE code = ? AND used = 0", (code,)
            )
            return cursor.rowcount == 1

    def record_issued(self, code: str, tokens: list[str]) -> None:
        """Remember the tokens a code was exchanged for (revoked if the code is replayed)."""
        with self._connect() as conn:
            conn.execute(
                "UPDATE smart_codes SET issued = ? WHERE code = ?", (json.dumps(tokens), code)
            )

    def issued_for(self, code: str) -> list[str]:
        with self._connect() as conn:
            row = conn.execute("SELECT issued FROM smart_codes WHERE code = ?", (code,)).fetchone()
        return [str(t) for t in json.loads(row[0])] if row else []

    # -- refresh tokens ---------------------------------------------------------------------
    def save_refresh_token(
        self, token: str, client_id: str, scope: str, context: LaunchContext
    ) -> None:
        with self._connect() as conn:
            conn.execute(
                "DELETE FROM smart_refresh_tokens WHERE expires_at < ?", (time.time() - 3600,)
            )
            conn.execute(
                "INSERT INTO smart_refresh_tokens VALUES (?, ?, ?, ?, ?, 0)",
                (token, client_id, scope, context.to_json(), time.time() + REFRESH_LIFETIME_S),
            )

    def refresh_token(self, token: str) -> RefreshToken | None:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT token, client_id, scope, context, expires_at, revoked "
                "FROM smart_refresh_tokens WHERE token = ?",
                (token,),
            ).fetchone()
        if row is None:
            return None
        return RefreshToken(
            row[0], row[1], row[2], LaunchContext.from_json(row[3]), float(row[4]), bool(row[5])
        )

    def use_refresh_token(self, token: str) -> bool:
        """Revoke a refresh token as it is used (it rotates); False when it already was."""
        with self._connect() as conn:
            cursor = conn.execute(
                "UPDATE smart_refresh_tokens SET revoked = 1 WHERE token = ? AND revoked = 0",
                (token,),
            )
            return cursor.rowcount == 1

    def revoke_refresh_token(self, token: str) -> None:
        with self._connect() as conn:
            conn.execute("UPDATE smart_refresh_tokens SET revoked = 1 WHERE token = ?", (token,))
