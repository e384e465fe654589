"""SQLite-backed FHIR R4 resource store (WAL mode, one connection per thread and process)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .search import (
    DEFAULT_COUNT,
    RESOURCE_TYPE_RE,
    JsonDict,
    SearchParameterError,
    parse_query_string,
    parse_search,
    shape_resource,
    sort_resources,
)
from .subscription import SubscriptionError, accept_subscription

__all__ = [
    "ChangeListener",
    "FhirStore",
    "FhirStoreError",
    "HistoryEntry",
    "InvalidResourceError",
    "MultipleMatchesError",
    "SearchParameterError",
    "SearchResult",
    "VersionConflictError",
]

log = logging.getLogger(__name__)

ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS resources (
        type TEXT NOT NULL,
        id TEXT NOT NULL,
        version_id INTEGER NOT NULL,
        last_updated TEXT NOT NULL,
        json TEXT NOT NULL,
        PRIMARY KEY (type, id)
    )""",
    "CREATE INDEX IF NOT EXISTS resources_by_type ON resources (type)",
    """CREATE TABLE IF NOT EXISTS resource_history (
        type TEXT NOT NULL,
        id TEXT NOT NULL,
        version_id INTEGER NOT NULL,
        last_updated TEXT NOT NULL,
        json TEXT,
        PRIMARY KEY (type, id, version_id)
    )""",
    # Bumped by every write of a type; lets each process reuse parsed resources safely.
    "CREATE TABLE IF NOT EXISTS type_state (type TEXT PRIMARY KEY, seq INTEGER NOT NULL)",
)
_BUMP_SEQ = (
    "INSERT INTO type_state (type, seq) VALUES (?, 1) "
    "ON CONFLICT (type) DO UPDATE SET seq = seq + 1"
)
# Types whose parsed resources are not kept in memory between searches (large payloads).
_UNCACHED_TYPES = frozenset({"Binary"})

# Told about every committed create or update: (the stored resource, whether it was created).
# Listeners run in the writing thread after the commit, so they must be quick and must not
# change the resource (subscription delivery hands the work to its own threads).
ChangeListener = Callable[[JsonDict, bool], None]


class FhirStoreError(Exception):
    """Base class of the store's errors."""


class InvalidResourceError(FhirStoreError, ValueError):
    """The resource (or a type/id) is not acceptable (maps to HTTP 400)."""


class MultipleMatchesError(FhirStoreError):
    """Conditional create criteria matched more than one resource (maps to HTTP 412)."""


class VersionConflictError(FhirStoreError):
    """An update's expected version does not match the current one (maps to HTTP 412)."""


@dataclass
class SearchResult:
    """One page of search results plus what the search applied."""

    resources: list[JsonDict]
    total: int
    offset: int = 0
    count: int = DEFAULT_COUNT
    applied: list[tuple[str, str]] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    summary: str | None = None

    @property
    def has_next(self) -> bool:
        """Whether a further page exists after this one."""
        return self.summary != "count" and self.count > 0 and self.offset + self.count < self.total


@dataclass(frozen=True)
class HistoryEntry:
    """One stored version of a resource; ``resource`` is None for a deletion."""

    version_id: int
    last_updated: str
    resource: JsonDict | None


def now_instant() -> str:
    """The current time as a FHIR instant in UTC with millisecond precision."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _clean(value: Any, key: str = "") -> Any:
    """Deep-copy JSON data, dropping null object members and rejecting non-JSON values."""
    if isinstance(value, Mapping):
        out: JsonDict = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidResourceError("JSON object keys must be strings")
            if v is not None:
                out[k] = _clean(v, k)
        return out
    if isinstance(value, list | tuple):
        if key.startswith("_"):  # primitive-extension arrays keep null placeholders
            return [None if v is None else _clean(v) for v in value]
        return [_clean(v) for v in value if v is not None]
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidResourceError("Numbers must be finite")
        return value
    raise InvalidResourceError(f"Unsupported JSON value of type {type(value).__name__}")


def _check_type(resource_type: str) -> None:
    if not isinstance(resource_type, str) or not RESOURCE_TYPE_RE.match(resource_type):
        raise InvalidResourceError(f"Invalid resource type {resource_type!r}")


def _check_id(resource_id: Any) -> None:
    if not isinstance(resource_id, str) or not ID_RE.match(resource_id):
        raise InvalidResourceError(f"Invalid resource id {resource_id!r}")


def _dump(resource: JsonDict) -> str:
    return json.dumps(resource, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class _TypeSnapshot:
    """Parsed resources of one type as of a ``type_state.seq`` (shared; never mutated)."""

    seq: int
    resources: list[JsonDict]
    texts: dict[str, str]  # id -> stored JSON, to hand out private copies


class FhirStore:
    """FHIR resources in one SQLite file.

    Safe to share between threads (each thread, and each process after a fork, opens its own
    connection) and between processes using the same file (WAL journal, writes serialized by
    ``BEGIN IMMEDIATE``). Searches filter the resources of one type in Python, which suits
    sandbox-sized data (thousands of resources); parsed resources are cached per type and
    invalidated through a per-type write counter kept in the database.
    """

    def __init__(self, path: str | Path, *, timeout: float = 30.0) -> None:
        self._path = Path(path)
        if str(path) == ":memory:":
            raise ValueError("FhirStore needs a file path (connections are per thread)")
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._timeout = timeout
        self._local = threading.local()
        self._inherited: list[sqlite3.Connection] = []  # from a parent process; never touched
        self._snapshots: dict[str, _TypeSnapshot] = {}
        self._listeners: list[ChangeListener] = []
        self._init_schema()

    @property
    def path(self) -> Path:
        return self._path

    def __repr__(self) -> str:
        return f"FhirStore({str(self._path)!r})"

    # ------------------------------------------------------------------ connections

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self._path), timeout=self._timeout, isolation_level=None)
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _conn(self) -> sqlite3.Connection:
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        pid = os.getpid()
        if conn is not None and getattr(local, "pid", None) != pid:
            # Inherited through fork: SQLite connections must not cross processes, and even
            # closing it here could disturb the parent's WAL, so keep it referenced and unused.
            self._inherited.append(conn)
            conn = None
        if conn is None:
            conn = self._connect()
            local.conn = conn
            local.pid = pid
        return conn

    def close(self) -> None:
        """Close the calling thread's connection (a later call opens a new one)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            conn.close()
        self._local.conn = None

    def _init_schema(self) -> None:
        conn = self._conn()
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL").fetchone()
                break
            except sqlite3.OperationalError as exc:  # another process is switching modes
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with self._write() as c:
            for statement in _SCHEMA:
                c.execute(statement)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding SQLite's reserved lock from the start."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # ------------------------------------------------------------------ change listeners

    def add_listener(self, listener: ChangeListener) -> None:
        """Call ``listener`` after every create or update this store object commits (writes
        made by other processes on the same file are not seen)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: ChangeListener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    @contextmanager
    def held_changes(self) -> Iterator[None]:
        """Tell the listeners about this thread's writes only when the block ends without an
        exception: a transaction that is rolled back (its creations deleted again) announces
        nothing. Nested blocks are part of the outermost one."""
        if getattr(self._local, "held", None) is not None:
            yield
            return
        held: list[tuple[JsonDict, bool]] = []
        self._local.held = held
        try:
            yield
        finally:
            self._local.held = None
        for resource, created in held:
            self._announce(resource, created)

    def _changed(self, resource: JsonDict, created: bool) -> JsonDict:
        held: list[tuple[JsonDict, bool]] | None = getattr(self._local, "held", None)
        if held is not None:
            held.append((resource, created))
        else:
            self._announce(resource, created)
        return resource

    def _announce(self, resource: JsonDict, created: bool) -> None:
        for listener in list(self._listeners):
            try:
                listener(resource, created)
            except Exception:  # a listener's bug must not fail a write that is committed
                log.exception("change listener failed for %s", resource.get("resourceType"))

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _prepare(resource: Mapping[str, Any]) -> JsonDict:
        if not isinstance(resource, Mapping):
            raise InvalidResourceError("A resource must be a JSON object")
        cleaned: JsonDict = _clean(resource)
        rtype = cleaned.get("resourceType")
        if not isinstance(rtype, str):
            raise InvalidResourceError("Missing resourceType")
        _check_type(rtype)
        meta = cleaned.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise InvalidResourceError("meta must be a JSON object")
        if rtype == "Binary":
            if not isinstance(cleaned.get("contentType"), str):
                raise InvalidResourceError("Binary.contentType is required")
            if "data" in cleaned and not isinstance(cleaned["data"], str):
                raise InvalidResourceError("Binary.data must be a base64 string")
        if rtype == "Subscription":
            # Checked here so that every way in (REST, transactions, seeding) is checked.
            try:
                cleaned = accept_subscription(cleaned)
            except SubscriptionError as exc:
                raise InvalidResourceError(str(exc)) from None
        return cleaned

    @staticmethod
    def _stamp(resource: JsonDict, resource_id: str, version: int, now: str) -> JsonDict:
        meta = dict(resource.get("meta") or {})
        meta["versionId"] = str(version)
        meta["lastUpdated"] = now
        stamped: JsonDict = {"resourceType": resource["resourceType"], "id": resource_id}
        stamped["meta"] = meta
        for key, value in resource.items():
            if key not in stamped:
                stamped[key] = value
        return stamped

    def _store_version(
        self,
        conn: sqlite3.Connection,
        resource: JsonDict,
        resource_id: str,
        version: int,
        *,
        insert: bool,
    ) -> JsonDict:
        now = now_instant()
        stamped = self._stamp(resource, resource_id, version, now)
        text = _dump(stamped)
        rtype = stamped["resourceType"]
        if insert:
            conn.execute(
                "INSERT INTO resources (type, id, version_id, last_updated, json) "
                "VALUES (?, ?, ?, ?, ?)",
                (rtype, resource_id, version, now, text),
            )
        else:
            conn.execute(
                "UPDATE resources SET version_id = ?, last_updated = ?, json = ? "
                "WHERE type = ? AND id = ?",
                (version, now, text, rtype, resource_id),
            )
        conn.execute(
            "INSERT INTO resource_history (type, id, version_id, last_updated, json) "
            "VALUES (?, ?, ?, ?, ?)",
            (rtype, resource_id, version, now, text),
        )
        conn.execute(_BUMP_SEQ, (rtype,))
        return stamped

    def _snapshot(self, conn: sqlite3.Connection, resource_type: str) -> _TypeSnapshot:
        """All current resources of a type in creation order (shared: do not mutate)."""
        # Read the counter before the rows: a write in between only makes the cache stale-tagged
        # (reloaded next time), never stale data under a current tag.
        row = conn.execute("SELECT seq FROM type_state WHERE type = ?", (resource_type,)).fetchone()
        seq = int(row[0]) if row else 0
        cached = self._snapshots.get(resource_type)
        if cached is not None and cached.seq == seq:
            return cached
        rows = conn.execute(
            "SELECT id, json FROM resources WHERE type = ? ORDER BY rowid", (resource_type,)
        ).fetchall()
        snapshot = _TypeSnapshot(
            seq, [json.loads(text) for _, text in rows], {rid: text for rid, text in rows}
        )
        if resource_type not in _UNCACHED_TYPES:
            self._snapshots[resource_type] = snapshot
        return snapshot

    # ------------------------------------------------------------------ interactions

    def create(self, resource: Mapping[str, Any]) -> JsonDict:
        """Store a new resource under a server-assigned id (any ``id`` given is ignored)."""
        prepared = self._prepare(resource)
        with self._write() as conn:
            stored = self._store_version(conn, prepared, uuid.uuid4().hex, 1, insert=True)
        return self._changed(stored, True)

    def update(
        self, resource: Mapping[str, Any], *, if_match: str | None = None
    ) -> tuple[JsonDict, bool]:
        """Create or replace the resource with the given ``id``; returns (stored, created).

        ``if_match`` is an expected current version id; a mismatch (or a missing resource)
        raises ``VersionConflictError``.
        """
        prepared = self._prepare(resource)
        resource_id = prepared.get("id")
        _check_id(resource_id)
        assert isinstance(resource_id, str)
        rtype = prepared["resourceType"]
        with self._write() as conn:
            row = conn.execute(
                "SELECT version_id FROM resources WHERE type = ? AND id = ?", (rtype, resource_id)
            ).fetchone()
            if if_match is not None and (row is None or str(row[0]) != if_match.strip()):
                current = "none" if row is None else str(row[0])
                raise VersionConflictError(
                    f"{rtype}/{resource_id}: expected version {if_match}, current is {current}"
                )
            if row is not None:
                stored = self._store_version(conn, prepared, resource_id, row[0] + 1, insert=False)
            else:
                previous = conn.execute(
                    "SELECT MAX(version_id) FROM resource_history WHERE type = ? AND id = ?",
                    (rtype, resource_id),
                ).fetchone()[0]
                version = (previous or 0) + 1
                stored = self._store_version(conn, prepared, resource_id, version, insert=True)
        created = row is None
        return self._changed(stored, created), created

    def conditional_create(
        self,
        resource: Mapping[str, Any],
        if_none_exist_query: str,
        keep: Callable[[JsonDict], bool] | None = None,
    ) -> tuple[JsonDict, bool]:
        """Create unless the search ``if_none_exist_query`` already matches (atomically);
        only resources ``keep`` accepts can match (what the caller's token may read).

        Returns (resource, created): the new resource, or the single existing match. Raises
        ``MultipleMatchesError`` for several matches and ``SearchParameterError`` for criteria
        that are empty or not supported.
        """
        prepared = self._prepare(resource)
        rtype = prepared["resourceType"]
        parsed = parse_search(rtype, parse_query_string(if_none_exist_query))
        if parsed.unknown:
            raise SearchParameterError(
                f"Unsupported criteria in If-None-Exist: {', '.join(parsed.unknown)}"
            )
        if not parsed.filters:
            raise SearchParameterError("If-None-Exist has no search criteria")
        with self._write() as conn:
            snapshot = self._snapshot(conn, rtype)
            matches = [
                r for r in snapshot.resources if parsed.matches(r) and (keep is None or keep(r))
            ]
            if len(matches) > 1:
                raise MultipleMatchesError(
                    f"If-None-Exist {if_none_exist_query!r} matched {len(matches)} resources"
                )
            if matches:
                return json.loads(snapshot.texts[matches[0]["id"]]), False
            stored = self._store_version(conn, prepared, uuid.uuid4().hex, 1, insert=True)
        return self._changed(stored, True), True

    def read(self, resource_type: str, resource_id: str) -> JsonDict | None:
        """The current version of a resource, or None."""
        row = (
            self._conn()
            .execute(
                "SELECT json FROM resources WHERE type = ? AND id = ?",
                (resource_type, resource_id),
            )
            .fetchone()
        )
        return None if row is None else json.loads(row[0])

    def vread(self, resource_type: str, resource_id: str, version_id: str | int) -> JsonDict | None:
        """A specific version of a resource, or None (unknown version or a deletion)."""
        try:
            version = int(version_id)
        except (TypeError, ValueError):
            return None
        row = (
            self._conn()
            .execute(
                "SELECT json FROM resource_history WHERE type = ? AND id = ? AND version_id = ?",
                (resource_type, resource_id, version),
            )
            .fetchone()
        )
        return None if row is None or row[0] is None else json.loads(row[0])

    def history(self, resource_type: str, resource_id: str) -> list[HistoryEntry]:
        """All versions of a resource, newest first (empty if it never existed)."""
        rows = (
            self._conn()
            .execute(
                "SELECT version_id, last_updated, json FROM resource_history "
                "WHERE type = ? AND id = ? ORDER BY version_id DESC",
                (resource_type, resource_id),
            )
            .fetchall()
        )
        return [
            HistoryEntry(row[0], row[1], None if row[2] is None else json.loads(row[2]))
            for row in rows
        ]

    def is_deleted(self, resource_type: str, resource_id: str) -> bool:
        """True when the resource existed but its latest version is a deletion."""
        row = (
            self._conn()
            .execute(
                "SELECT json IS NULL FROM resource_history WHERE type = ? AND id = ? "
                "ORDER BY version_id DESC LIMIT 1",
                (resource_type, resource_id),
            )
            .fetchone()
        )
        return bool(row and row[0])

    def delete(self, resource_type: str, resource_id: str) -> bool:
        """Delete a resource (history is kept); False when there was nothing to delete."""
        with self._write() as conn:
            row = conn.execute(
                "SELECT version_id FROM resources WHERE type = ? AND id = ?",
                (resource_type, resource_id),
            ).fetchone()
            if row is None:
                return False
            conn.execute(
                "DELETE FROM resources WHERE type = ? AND id = ?", (resource_type, resource_id)
            )
            conn.execute(
                "INSERT INTO resource_history (type, id, version_id, last_updated, json) "
                "VALUES (?, ?, ?, ?, NULL)",
                (resource_type, resource_id, row[0] + 1, now_instant()),
            )
            conn.execute(_BUMP_SEQ, (resource_type,))
            return True

    def count(self, resource_type: str) -> int:
        """Number of current resources of a type."""
        row = (
            self._conn()
            .execute("SELECT COUNT(*) FROM resources WHERE type = ?", (resource_type,))
            .fetchone()
        )
        return int(row[0])

    def search(
        self,
        resource_type: str,
        params: Sequence[tuple[str, str]],
        keep: Callable[[JsonDict], bool] | None = None,
    ) -> SearchResult:
        """Search resources of one type; ``_count``/``_offset`` in ``params`` select the page.
        Only resources ``keep`` accepts (when given) are matched, counted and paged.

        Raises ``InvalidResourceError`` for a malformed type and ``SearchParameterError`` for
        malformed parameter values; unsupported parameters are ignored and reported in
        ``SearchResult.unknown``.
        """
        _check_type(resource_type)
        parsed = parse_search(resource_type, params)
        snapshot = self._snapshot(self._conn(), resource_type)
        matched = [r for r in snapshot.resources if parsed.matches(r) and (keep is None or keep(r))]
        if parsed.sort:
            matched = sort_resources(matched, parsed.sort)
        page: list[JsonDict] = []
        if parsed.summary != "count" and parsed.count > 0:
            page = [
                shape_resource(json.loads(snapshot.texts[r["id"]]), parsed.summary, parsed.elements)
                for r in matched[parsed.offset : parsed.offset + parsed.count]
            ]
        return SearchResult(
            resources=page,
            total=len(matched),
            offset=parsed.offset,
            count=parsed.count,
            applied=parsed.applied,
            unknown=parsed.unknown,
            summary=parsed.summary,
        )
