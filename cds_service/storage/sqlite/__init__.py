"""The embedded deployment's adapters: every storage port in one SQLite (WAL) file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cds_service.storage.ports import Storage
from cds_service.storage.sqlite.database import SqliteDatabase
from cds_service.storage.sqlite.queue import SqliteJobQueue, SqliteWorkerRegistry
from cds_service.storage.sqlite.records import (
    SqliteArrivalCursors,
    SqliteCardLog,
    SqliteFeedbackLog,
    SqliteReplayCache,
    SqliteResultStore,
)


def open_sqlite_storage(path: str | Path, max_queue: int = 10_000) -> Storage:
    """Every port on the file at ``path`` (created, or brought up to the current schema)."""
    db = SqliteDatabase(path)
    return Storage(
        jobs=SqliteJobQueue(db, max_queue),
        workers=SqliteWorkerRegistry(db),
        results=SqliteResultStore(db),
        cards=SqliteCardLog(db),
        feedback=SqliteFeedbackLog(db),
        replay=SqliteReplayCache(db),
        cursors=SqliteArrivalCursors(db),
        errors=(sqlite3.Error,),
    )
