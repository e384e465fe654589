"""PostgreSQL adapters for the result store, card log, feedback log, replay cache and
arrival cursors (cds_service.storage.ports). Same behaviour as the SQLite ones."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from typing import Any

import psycopg

from cds_service.results import AnalysisResult, CardRecord, ModelInfo
from cds_service.storage.ports import StoredResult, StudyRef
from cds_service.storage.postgres.database import PostgresDatabase, Row
from cds_service.storage.postgres.schema import NOW

FEEDBACK_PAGE = 500  # feedback_rows reads this many rows per query (holds no connection)
FEEDBACK_COLUMNS = (
    "received_at",
    "service_id",
    "card_uuid",
    "outcome",
    "body",
    "source",
    "study_uid",
    "finding",
    "ai_state",
    "model_id",
    "model_version",
)


def insert_result(
    conn: psycopg.Connection[Row],
    ref: StudyRef,
    result: AnalysisResult,
    filed_location: str | None = None,
) -> None:
    """Store (or replace, whole) the study's result, inside the caller's transaction."""
    conn.execute(
        "INSERT INTO results (source, study_uid, model_id, model_version, patient_id, status, "
        "reason, body, created_at, filed_location) "
        f"VALUES (%s, %s, %s, %s, %s, %s, %s, %s, {NOW}, %s) "
        "ON CONFLICT (source, study_uid, model_id, model_version) DO UPDATE SET "
        "patient_id = excluded.patient_id, status = excluded.status, "
        "reason = excluded.reason, body = excluded.body, created_at = excluded.created_at, "
        "filed_location = excluded.filed_location",
        (
            ref.source,
            result.study_uid,
            result.model.model_id,
            result.model.version,
            ref.patient_id,
            result.status,
            result.reason or "",
            result.to_json(),
            filed_location,
        ),
    )


class PostgresResultStore:
    def __init__(self, db: PostgresDatabase) -> None:
        self.db = db

    def put_result(self, ref: StudyRef, result: AnalysisResult) -> None:
        with self.db.transaction() as conn:
            insert_result(conn, ref, result)

    def get_result(self, ref: StudyRef, model: ModelInfo) -> StoredResult | None:
        row = self.db.read_one(
            "SELECT body, patient_id, filed_location FROM results WHERE source = %s "
            "AND study_uid = %s AND model_id = %s AND model_version = %s",
            (ref.source, ref.study_uid, model.model_id, model.version),
        )
        return StoredResult(AnalysisResult.from_json(row[0]), row[1], row[2]) if row else None

    def mark_filed(self, source: str, study_uid: str, model: ModelInfo, location: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE results SET filed_location = %s WHERE source = %s AND study_uid = %s "
                "AND model_id = %s AND model_version = %s",
                (location, source, study_uid, model.model_id, model.version),
            )


class PostgresCardLog:
    def __init__(self, db: PostgresDatabase) -> None:
        self.db = db

    def record_cards(self, records: Iterable[CardRecord]) -> None:
        rows = [
            (r.uuid, r.source, r.study_uid, r.finding, r.ai_state, r.model_id, r.model_version)
            for r in records
        ]
        if not rows:
            return
        with self.db.transaction() as conn, conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO cards (uuid, source, study_uid, finding, ai_state, model_id, "
                f"model_version, first_shown) VALUES (%s, %s, %s, %s, %s, %s, %s, {NOW}) "
                "ON CONFLICT (uuid) DO NOTHING",
                rows,
            )

    def card_record(self, card_uuid: str) -> CardRecord | None:
        row = self.db.read_one(
            "SELECT uuid, source, study_uid, finding, ai_state, model_id, model_version "
            "FROM cards WHERE uuid = %s",
            (card_uuid,),
        )
        return CardRecord(*row) if row else None


class PostgresFeedbackLog:
    def __init__(self, db: PostgresDatabase) -> None:
        self.db = db

    def store_feedback(self, service_id: str, item: dict[str, Any]) -> bool:
        body = json.dumps(item, sort_keys=True, separators=(",", ":"))
        fingerprint = hashlib.sha256(f"{service_id}\n{body}".encode()).hexdigest()
        with self.db.transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO feedback (fingerprint, service_id, card_uuid, outcome, body, "
                f"received_at) VALUES (%s, %s, %s, %s, %s, {NOW}) "
                "ON CONFLICT (fingerprint) DO NOTHING",
                (fingerprint, service_id, item["card"], item["outcome"], body),
            )
            return cursor.rowcount == 1

    def feedback_rows(self) -> Iterator[dict[str, Any]]:
        select = (
            "SELECT f.received_at, f.service_id, f.card_uuid, f.outcome, f.body, c.source, "
            "c.study_uid, c.finding, c.ai_state, c.model_id, c.model_version, f.seq "
            "FROM feedback f LEFT JOIN cards c ON c.uuid = f.card_uuid "
        )
        order = "ORDER BY f.received_at, f.seq LIMIT %s"
        rows = self.db.read(select + order, (FEEDBACK_PAGE,))
        while rows:
            for row in rows:
                yield dict(zip(FEEDBACK_COLUMNS, row[:-1], strict=True))
            last = rows[-1]
            rows = self.db.read(
                select + "WHERE (f.received_at, f.seq) > (%s, %s) " + order,
                (last[0], last[-1], FEEDBACK_PAGE),
            )

    def feedback_count(self, service_id: str | None = None) -> int:
        if service_id is None:
            row = self.db.read_one("SELECT count(*) FROM feedback")
        else:
            row = self.db.read_one(
                "SELECT count(*) FROM feedback WHERE service_id = %s", (service_id,)
            )
        return int(row[0]) if row else 0


class PostgresReplayCache:
    def __init__(self, db: PostgresDatabase) -> None:
        self.db = db

    def remember_jti(self, iss: str, jti: str, expires_at: int) -> bool:
        now = "floor(extract(epoch FROM now()))::bigint"
        with self.db.transaction() as conn:
            # Purge entries long expired (exp plus a generous skew) so the table stays small;
            # rows another replica is purging right now are left to it (no waits, no deadlock).
            conn.execute(
                "DELETE FROM jwt_jti WHERE (iss, jti) IN (SELECT iss, jti FROM jwt_jti "
                f"WHERE expires_at < {now} - 600 LIMIT 1000 FOR UPDATE SKIP LOCKED)"
            )
            cursor = conn.execute(
                f"INSERT INTO jwt_jti (iss, jti, expires_at) VALUES (%s, %s, GREATEST(%s, {now})) "
                "ON CONFLICT (iss, jti) DO NOTHING",
                (iss, jti, int(expires_at)),
            )
            return cursor.rowcount == 1


class PostgresArrivalCursors:
    def __init__(self, db: PostgresDatabase) -> None:
        self.db = db

    def watch_cursor(self, source: str) -> str | None:
        row = self.db.read_one(
            "SELECT last_updated FROM watch_cursors WHERE source = %s", (source,)
        )
        return str(row[0]) if row else None

    def set_watch_cursor(self, source: str, last_updated: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO watch_cursors (source, last_updated, polled_at) "
                f"VALUES (%s, %s, {NOW}) ON CONFLICT (source) DO UPDATE SET "
                "last_updated = GREATEST(watch_cursors.last_updated, excluded.last_updated), "
                "polled_at = excluded.polled_at",
                (source, last_updated),
            )
