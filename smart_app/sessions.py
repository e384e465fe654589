"""Server-side state of the SMART app (SQLite): pending launches keyed by `state`, and
sessions keyed by an opaque handle that travels in the URL (works in an EHR iframe where
third-party cookies are dropped). Tokens never leave the server."""

from __future__ import annotations

import fcntl
import hashlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cds_service.security.secret_compare import same_secret
from cds_service.sources import canonical_fhir_base

SCHEMA = """
CREATE TABLE IF NOT EXISTS smart_launches (
    state TEXT PRIMARY KEY, iss TEXT NOT NULL, source TEXT NOT NULL,
    token_endpoint TEXT NOT NULL, code_verifier TEXT NOT NULL, redirect_uri TEXT NOT NULL,
    browser_binding TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS smart_sessions (
    sid TEXT PRIMARY KEY, body TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS smart_confirmations (
    id TEXT PRIMARY KEY, csrf TEXT NOT NULL, body TEXT NOT NULL, created_at REAL NOT NULL
);
"""
LAUNCH_LIFETIME_S = 600
CONFIRMATION_LIFETIME_S = 600
SESSION_LIFETIME_S = 12 * 3600
STATE_BYTES = 32  # 256 bits of entropy (SMART asks for at least 122)


@dataclass(frozen=True)
class PendingLaunch:
    state: str
    iss: str
    source: str
    token_endpoint: str
    code_verifier: str
    redirect_uri: str
    browser_binding: str  # sha256 of the cookie value set at launch ("" when none)


@dataclass(frozen=True)
class PendingConfirmation:
    """A sign-in whose browser could not be proven (no launch cookie inside an EHR frame):
    the session is only created when the user confirms it on the app's own page."""

    id: str
    csrf: str


@dataclass(frozen=True)
class Session:
    """One authorised app session: the user's tokens and launch context."""

    sid: str
    iss: str
    source: str
    token_endpoint: str
    access_token: str
    expires_at: float
    scope: str
    csrf: str
    refresh_token: str | None = None
    patient: str | None = None
    encounter: str | None = None
    fhir_context: list[dict[str, Any]] = field(default_factory=list)
    app_context: str | None = None
    need_patient_banner: bool = True

    @property
    def expired(self) -> bool:
        return self.expires_at <= time.time() + 10  # refresh a little early

    def with_tokens(self, token: dict[str, Any]) -> Session:
        """This session after a token refresh (a new refresh token replaces the old one)."""
        return replace(
            self,
            access_token=str(token["access_token"]),
            expires_at=expiry(token),
            scope=str(token.get("scope") or self.scope),
            refresh_token=str(token.get("refresh_token") or self.refresh_token or "") or None,
        )


def expiry(token: dict[str, Any]) -> float:
    try:
        expires_in = float(token.get("expires_in") or 300)
    except (TypeError, ValueError):
        expires_in = 300.0
    return time.time() + max(0.0, expires_in)


def binding_hash(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest() if value else ""


class SessionStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            columns = {row[1] for row in conn.execute("PRAGMA table_info(smart_launches)")}
            if "tenant" in columns:  # before results were keyed by data source
                conn.execute("ALTER TABLE smart_launches RENAME COLUMN tenant TO source")
            conn.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=10.0)
        try:
            with conn:
                yield conn
        finally:
            conn.close()

    @contextmanager
    def refresh_lock(self) -> Iterator[None]:
        """One token refresh at a time across threads and processes (gunicorn workers): the
        refresh token rotates on every use, so two concurrent refreshes would lose one."""
        with open(self.path.with_name(self.path.name + ".refresh-lock"), "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- launches -----------------------------------------------------------------------------
    def new_launch(
        self,
        *,
        iss: str,
        source: str,
        token_endpoint: str,
        code_verifier: str,
        redirect_uri: str,
        browser_binding: str,
    ) -> PendingLaunch:
        launch = PendingLaunch(
            state=secrets.token_urlsafe(STATE_BYTES),
            iss=iss,
            source=source,
            token_endpoint=token_endpoint,
            code_verifier=code_verifier,
            redirect_uri=redirect_uri,
            browser_binding=binding_hash(browser_binding),
        )
        with self._connect() as conn:
            conn.execute(
                "DELETE FROM smart_launches WHERE created_at < ?",
                (time.time() - LAUNCH_LIFETIME_S,),
            )
            conn.execute(
                "INSERT INTO smart_launches VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    launch.state,
                    iss,
                    source,
                    token_endpoint,
                    code_verifier,
                    redirect_uri,
                    launch.browser_binding,
                    time.time(),
                ),
            )
        return launch

    def take_launch(self, state: str) -> PendingLaunch | None:
        """The pending launch for `state`, removed so that it cannot be used twice."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT state, iss, source, token_endpoint, code_verifier, redirect_uri, "
                "browser_binding, created_at FROM smart_launches WHERE state = ?",
                (state,),
            ).fetchone()
            if row is None:
                return None
            conn.execute("DELETE FROM smart_launches WHERE state = ?", (state,))
        if row[7] < time.time() - LAUNCH_LIFETIME_S:
            return None
        return PendingLaunch(*row[:7])

    # -- sign-ins waiting for the user's confirmation -------------------------------------
    def hold_for_confirmation(self, **fields: Any) -> PendingConfirmation:
        """Keep a session's fields until the user confirms (`confirm`) or cancels."""
        pending = PendingConfirmation(
            id=secrets.token_urlsafe(STATE_BYTES), csrf=secrets.token_urlsafe(STATE_BYTES)
        )
        with self._connect() as conn:
            conn.execute(
                "DELETE FROM smart_confirmations WHERE created_at < ?",
                (time.time() - CONFIRMATION_LIFETIME_S,),
            )
            conn.execute(
                "INSERT INTO smart_confirmations VALUES (?, ?, ?, ?)",
                (pending.id, pending.csrf, json.dumps(fields), time.time()),
            )
        return pending

    def take_confirmation(self, confirmation_id: str, csrf: str) -> dict[str, Any] | None:
        """The held session fields, removed (one answer only), when the form's CSRF token
        matches and the confirmation has not expired; else None."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT csrf, body, created_at FROM smart_confirmations WHERE id = ?",
                (confirmation_id,),
            ).fetchone()
            if row is None:
                return None
            conn.execute("DELETE FROM smart_confirmations WHERE id = ?", (confirmation_id,))
        if not same_secret(row[0], csrf):
            return None
        if row[2] < time.time() - CONFIRMATION_LIFETIME_S:
            return None
        fields: dict[str, Any] = json.loads(row[1])
        return fields

    # -- sessions -----------------------------------------------------------------------------
    def create_session(self, **fields: Any) -> Session:
        session = Session(sid=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32), **fields)
        self.save(session)
        return session

    def save(self, session: Session) -> None:
        body = json.dumps({k: v for k, v in session.__dict__.items() if k != "sid"})
        with self._connect() as conn:
            conn.execute(
                "DELETE FROM smart_sessions WHERE created_at < ?",
                (time.time() - SESSION_LIFETIME_S,),
            )
            conn.execute(
                "INSERT INTO smart_sessions VALUES (?, ?, ?) "
                "ON CONFLICT(sid) DO UPDATE SET body = excluded.body",
                (session.sid, body, time.time()),
            )

    def session(self, sid: str) -> Session | None:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT body, created_at FROM smart_sessions WHERE sid = ?", (sid,)
            ).fetchone()
        if row is None or row[1] < time.time() - SESSION_LIFETIME_S:
            return None
        body = json.loads(row[0])
        if "tenant" in body:  # saved before results were keyed by data source
            body.pop("tenant")
            body["source"] = canonical_fhir_base(body["iss"])
        return Session(sid=sid, **body)
