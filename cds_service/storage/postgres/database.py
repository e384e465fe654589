"""One PostgreSQL database shared by every PostgreSQL adapter: its connections, reads and the
transaction helper. Safe across threads, processes and machines.

Connections: one per thread, as the SQLite adapter has (the default), or with
``pooled=True`` from a psycopg_pool pool (``psycopg[pool]``), which bounds them per process
but answers worse when the server is down or back (see `PostgresDatabase`). Every connection
is in autocommit mode: a read is one statement; a write is `transaction()` (BEGIN ... COMMIT).

A connection the server dropped since its last use (PostgreSQL restarted) fails on its first
statement, a read or the BEGIN: nothing was done on it yet, so it is replaced and that
statement sent again. Callers see a restart only while the server is really down, as one of
`DATABASE_DOWN`; nothing is retried once a transaction has done anything.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg import conninfo

from cds_service.storage.postgres.schema import migrate

# "The database did not answer": the server is down, restarting or unreachable, the
# connection dropped, the pool had no connection in time, a statement was cancelled or gave
# up on a lock or a serialisation conflict. These are what /readyz reports as "unreachable"
# and what the worker waits out. Not ProgrammingError, IntegrityError or DataError: those are
# bugs, which must neither pass for an outage nor be retried forever.
DATABASE_DOWN: tuple[type[Exception], ...] = (psycopg.OperationalError, psycopg.InterfaceError)

Row = tuple[Any, ...]
T = TypeVar("T")


class _Connections(Protocol):
    def get(self) -> psycopg.Connection[Row]: ...

    def put(self, conn: psycopg.Connection[Row]) -> None: ...

    def close(self) -> None: ...


class _Held:
    """A thread's connection; closed when its thread ends (in the process that opened it:
    after a fork the parent's connection is left to the parent)."""

    def __init__(self, conn: psycopg.Connection[Row]) -> None:
        self.conn = conn
        self.pid = os.getpid()

    def __del__(self) -> None:
        if self.pid == os.getpid():
            with suppress(Exception):
                self.conn.close()


class _ThreadConnections:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._local = threading.local()
        self._all: weakref.WeakSet[psycopg.Connection[Row]] = weakref.WeakSet()
        self._lock = threading.Lock()

    def get(self) -> psycopg.Connection[Row]:
        held: _Held | None = getattr(self._local, "held", None)
        if held is None or held.pid != os.getpid() or held.conn.closed or held.conn.broken:
            if held is not None and held.pid == os.getpid():
                held.conn.close()
            conn = psycopg.connect(self.dsn, autocommit=True)
            held = self._local.held = _Held(conn)
            with self._lock:
                self._all.add(conn)
        return held.conn

    def put(self, conn: psycopg.Connection[Row]) -> None:
        if conn.broken and not conn.closed:
            conn.close()  # the next get() of this thread connects afresh

    def close(self) -> None:
        with self._lock:
            conns = list(self._all)
        for conn in conns:
            with suppress(Exception):
                conn.close()


class _PooledConnections:
    def __init__(self, dsn: str, size: int, timeout_s: float) -> None:
        try:
            from psycopg_pool import ConnectionPool
        except ImportError as exc:
            raise ImportError("pooled connections need psycopg_pool: psycopg[pool]") from exc

        # timeout: how long a call waits for a connection (all busy, or the server down:
        # then that is how long "database down" takes).
        self.pool: ConnectionPool[psycopg.Connection[Row]] = ConnectionPool(
            dsn,
            min_size=1,
            max_size=size,
            kwargs={"autocommit": True},
            timeout=timeout_s,
            name="cxr-cds",
            open=True,
        )

    def get(self) -> psycopg.Connection[Row]:
        return self.pool.getconn()

    def put(self, conn: psycopg.Connection[Row]) -> None:
        self.pool.putconn(conn)  # the pool replaces a broken one

    def close(self) -> None:
        self.pool.close()


class PostgresDatabase:
    """The database at ``dsn`` (a libpq connection string or postgresql:// URI), brought up
    to the current schema on opening.

    Connections: one per thread (a thread's first call connects; a dropped one is replaced
    on the next call). While the server is down a call fails at once (refused) or after
    ``connect_timeout_s`` (no answer); once it is back, the next call works.

    ``pooled=True``: from psycopg_pool instead, at most ``pool_size`` per process, a call
    waiting up to ``pool_wait_s`` for one. The pool connects in the background with its own
    backoff, so while the server is down every call takes ``pool_wait_s`` to fail, and once
    it is back calls keep failing until the pool's next attempt (seconds; longer after a
    long outage). ``connect_timeout_s`` and ``application_name`` apply unless the DSN sets
    them."""

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 10,
        pooled: bool = False,
        connect_timeout_s: int = 5,
        pool_wait_s: float = 2.0,
    ) -> None:
        given = conninfo.conninfo_to_dict(dsn)
        defaults: dict[str, str | int] = {
            "connect_timeout": connect_timeout_s,
            "application_name": "cxr-cds",
        }
        self.dsn = conninfo.make_conninfo(
            dsn, **{k: v for k, v in defaults.items() if k not in given}
        )
        self.pooled = pooled
        self.pool_size = pool_size
        self.pool_wait_s = pool_wait_s
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._connections = self._open_connections()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            migrate(conn)

    def _open_connections(self) -> _Connections:
        if self.pooled:
            return _PooledConnections(self.dsn, self.pool_size, self.pool_wait_s)
        return _ThreadConnections(self.dsn)

    def _source(self) -> _Connections:
        if self._pid != os.getpid():  # a forked child never uses its parent's connections
            with self._lock:
                if self._pid != os.getpid():
                    self._connections = self._open_connections()
                    self._pid = os.getpid()
        return self._connections

    def _first(
        self, statement: Callable[[psycopg.Connection[Row]], T]
    ) -> tuple[psycopg.Connection[Row], T]:
        """A connection and the result of its first statement; a connection found dropped
        by that statement is handed back (to be replaced) and the statement sent again on
        another. A pool may hold several dropped ones: as many tries as it has connections."""
        source = self._source()
        tries = (self.pool_size if self.pooled else 1) + 1
        for attempt in range(tries):
            conn = source.get()
            try:
                return conn, statement(conn)
            except BaseException as exc:
                dropped = isinstance(exc, DATABASE_DOWN) and (conn.closed or conn.broken)
                source.put(conn)
                if not dropped or attempt == tries - 1:
                    raise
        raise AssertionError("unreachable")

    def read(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> list[Row]:
        """Every row of one statement (outside any transaction)."""
        conn, rows = self._first(lambda c: c.execute(sql, params).fetchall())
        self._source().put(conn)
        return rows

    def read_one(
        self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None
    ) -> Row | None:
        rows = self.read(sql, params)
        return rows[0] if rows else None

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Row]]:
        """A read-committed transaction: committed when the block ends, rolled back when it
        raises."""
        conn, _ = self._first(lambda c: c.execute("BEGIN"))
        try:
            yield conn
        except BaseException:
            if not conn.closed:
                with suppress(*DATABASE_DOWN):
                    conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")
        finally:
            self._source().put(conn)

    def close(self) -> None:
        """Close every connection this process opened (tests, orderly shutdown)."""
        self._source().close()
