"""The scale-out deployment's adapters: every storage port in one PostgreSQL database, shared
by any number of web replicas and workers on any number of machines (psycopg 3)."""

from __future__ import annotations

from cds_service.storage.ports import Storage
from cds_service.storage.postgres.database import DATABASE_DOWN, PostgresDatabase
from cds_service.storage.postgres.queue import PostgresJobQueue, PostgresWorkerRegistry
from cds_service.storage.postgres.records import (
    PostgresArrivalCursors,
    PostgresCardLog,
    PostgresFeedbackLog,
    PostgresReplayCache,
    PostgresResultStore,
)

__all__ = ["DATABASE_DOWN", "PostgresDatabase", "open_postgres_storage"]


def open_postgres_storage(
    dsn: str,
    max_queue: int = 10_000,
    *,
    pool_size: int = 10,
    pooled: bool = False,
    pool_wait_s: float = 2.0,
) -> Storage:
    """Every port on the database at ``dsn`` (brought up to the current schema first).
    Connections: one per thread, or with ``pooled`` psycopg_pool's, at most ``pool_size``
    per process (trade-offs in `PostgresDatabase`)."""
    db = PostgresDatabase(dsn, pool_size=pool_size, pooled=pooled, pool_wait_s=pool_wait_s)
    return Storage(
        jobs=PostgresJobQueue(db, max_queue),
        workers=PostgresWorkerRegistry(db),
        results=PostgresResultStore(db),
        cards=PostgresCardLog(db),
        feedback=PostgresFeedbackLog(db),
        replay=PostgresReplayCache(db),
        cursors=PostgresArrivalCursors(db),
        errors=DATABASE_DOWN,
    )
