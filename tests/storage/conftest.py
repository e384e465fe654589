"""Each storage adapter behind the same fixture: a fresh Storage per test (SQLite in
tmp_path; PostgreSQL in a fresh database on the session's real server)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest

from cds_service.storage.ports import Storage
from cds_service.storage.postgres import open_postgres_storage
from cds_service.storage.postgres.queue import PostgresJobQueue
from cds_service.storage.sqlite import open_sqlite_storage

POOL_INSTALLED = importlib.util.find_spec("psycopg_pool") is not None
# The PostgreSQL adapter with one connection per thread, and with psycopg_pool when that is
# installed (psycopg[pool]); each variant runs the whole contract.
ADAPTERS = ["sqlite", "postgres"] + (["postgres-pool"] if POOL_INSTALLED else [])

OpenStorage = Callable[..., Storage]  # (max_queue=10_000) -> a new Storage on the same database


def close(storage: Storage) -> None:
    """Close a PostgreSQL storage's connections (SQLite's close with their threads)."""
    if isinstance(storage.jobs, PostgresJobQueue):
        cast(PostgresJobQueue, storage.jobs).db.close()


@pytest.fixture(params=ADAPTERS)
def adapter(request: pytest.FixtureRequest) -> str:
    return cast(str, request.param)


@pytest.fixture
def open_storage(
    adapter: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[OpenStorage]:
    opened: list[Storage] = []
    if adapter == "sqlite":
        path = tmp_path / "storage.sqlite3"

        def open_one(max_queue: int = 10_000) -> Storage:
            return open_sqlite_storage(path, max_queue)

    else:
        dsn = cast(str, request.getfixturevalue("postgres_dsn"))
        pooled = adapter == "postgres-pool"

        def open_one(max_queue: int = 10_000) -> Storage:
            storage = open_postgres_storage(dsn, max_queue, pooled=pooled)
            opened.append(storage)
            return storage

    yield open_one
    for storage in opened:
        close(storage)


@pytest.fixture
def storage(open_storage: OpenStorage) -> Storage:
    return open_storage()
