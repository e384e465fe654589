"""SQLite adapters for the result store, card log, feedback log, replay cache and arrival
cursors (cds_service.storage.ports)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from typing import Any

from cds_service.results import AnalysisResult, CardRecord, ModelInfo
from cds_service.storage.ports import StoredResult, StudyRef
from cds_service.storage.sqlite.database import SqliteDatabase


def insert_result(
    conn: sqlite3.Connection,
    ref: StudyRef,
    result: AnalysisResult,
    filed_location: str | None = None,
) -> None:
    """Store (or replace) the study's result, inside the caller's transaction."""
    conn.execute(
        "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            ref.source,
            result.study_uid,
            result.model.model_id,
            result.model.version,
            ref.patient_id,
            result.status,
            result.to_json(),
            time.time(),
            filed_location,
        ),
    )


class SqliteResultStore:
    def __init__(self, db: SqliteDatabase) -> None:
        self.db = db

    def put_result(self, ref: StudyRef, result: AnalysisResult) -> None:
        with self.db.transaction() as conn:
            insert_result(conn, ref, result)

    def get_result(self, ref: StudyRef, model: ModelInfo) -> StoredResult | None:
        row = (
            self.db.connection()
            .execute(
                "SELECT body, patient_id, filed_location FROM results WHERE source = ? "
                "AND study_uid = ? AND model_id = ? AND model_version = ?",
                (ref.source, ref.study_uid, model.model_id, model.version),
            )
            .fetchone()
        )
        return StoredResult(AnalysisResult.from_json(row[0]), row[1], row[2]) if row else None

    def mark_filed(self, source: str, study_uid: str, model: ModelInfo, location: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE results SET filed_location = ? WHERE source = ? AND study_uid = ? "
                "AND model_id = ? AND model_version = ?",
                (location, source, study_uid, model.model_id, model.version),
            )


class SqliteCardLog:
    def __init__(self, db: SqliteDatabase) -> None:
        self.db = db

    def record_cards(self, records: Iterable[CardRecord]) -> None:
        now = time.time()
        with self.db.transaction() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO cards VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        r.uuid,
                        r.source,
                        r.study_uid,
                        r.finding,
                        r.ai_state,
                        r.model_id,
                        r.model_version,
                        now,
                    )
                    for r in records
                ],
            )

    def card_record(self, card_uuid: str) -> CardRecord | None:
        row = (
            self.db.connection()
            .execute(
                "SELECT uuid, source, study_uid, finding, ai_state, model_id, model_version "
                "FROM cards WHERE uuid = ?",
                (card_uuid,),
            )
            .fetchone()
        )
        return CardRecord(*row) if row else None


class SqliteFeedbackLog:
    def __init__(self, db: SqliteDatabase) -> None:
        self.db = db

    def store_feedback(self, service_id: str, item: dict[str, Any]) -> bool:
        body = json.dumps(item, sort_keys=True, separators=(",", ":"))
        fingerprint = hashlib.sha256(f"{service_id}\n{body}".encode()).hexdigest()
        with self.db.transaction() as conn:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO feedback VALUES (?, ?, ?, ?, ?, ?)",
                (fingerprint, service_id, item["card"], item["outcome"], body, time.time()),
            )
            return cursor.rowcount == 1

    def feedback_rows(self) -> Iterator[dict[str, Any]]:
        cursor = self.db.connection().execute(
            "SELECT f.received_at, f.service_id, f.card_uuid, f.outcome, f.body, c.source, "
            "c.study_uid, c.finding, c.ai_state, c.model_id, c.model_version "
            "FROM feedback f LEFT JOIN cards c ON c.uuid = f.card_uuid ORDER BY f.received_at"
        )
        columns = [d[0] for d in cursor.description]
        for row in cursor:
            yield dict(zip(columns, row, strict=True))

    def feedback_count(self, service_id: str | None = None) -> int:
        conn = self.db.connection()
        if service_id is None:
            row = conn.execute("SELECT count(*) FROM feedback").fetchone()
        else:
            row = conn.execute(
                "SELECT count(*) FROM feedback WHERE service_id = ?", (service_id,)
            ).fetchone()
        return int(row[0])


class SqliteReplayCache:
    def __init__(self, db: SqliteDatabase) -> None:
        self.db = db

    def remember_jti(self, iss: str, jti: str, expires_at: int) -> bool:
        now = int(time.time())
        with self.db.transaction() as conn:
            # Purge entries long expired (exp plus a generous skew) so the table stays small.
            conn.execute("DELETE FROM jwt_jti WHERE expires_at < ?", (now - 600,))
            cursor = conn.execute(
                "INSERT OR IGNORE INTO jwt_jti (iss, jti, expires_at) VALUES (?, ?, ?)",
                (iss, jti, max(expires_at, now)),
            )
            return cursor.rowcount == 1


class SqliteArrivalCursors:
    def __init__(self, db: SqliteDatabase) -> None:
        self.db = db

    def watch_cursor(self, source: str) -> str | None:
        row = (
            self.db.connection()
            .execute("SELECT last_updated FROM watch_cursors WHERE source = ?", (source,))
            .fetchone()
        )
        return str(row[0]) if row else None

    def set_watch_cursor(self, source: str, last_updated: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO watch_cursors VALUES (?, ?, ?) ON CONFLICT(source) DO UPDATE SET "
                "last_updated = max(last_updated, excluded.last_updated), "
                "polled_at = excluded.polled_at",
                (source, last_updated, time.time()),
            )
