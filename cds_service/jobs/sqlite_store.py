"""Durable job queue, result store, JWT replay cache and feedback log in one SQLite (WAL) file."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cds_service.config import JOB_LEASE_S
from cds_service.imaging.limits import DEFAULT_MAX_BYTES
from cds_service.results import AnalysisResult, CardRecord, ModelInfo
from cds_service.sources import canonical_fhir_base, same_fhir_base

SCHEMA = """
CREATE TABLE IF NOT EXISTS jwt_jti (
    iss TEXT NOT NULL, jti TEXT NOT NULL, expires_at INTEGER NOT NULL,
    PRIMARY KEY (iss, jti)
);
CREATE INDEX IF NOT EXISTS jwt_jti_expiry ON jwt_jti (expires_at);
-- What each AI-result card said, so feedback on a card uuid can be traced to its finding.
CREATE TABLE IF NOT EXISTS cards (
    uuid TEXT PRIMARY KEY, source TEXT NOT NULL, study_uid TEXT NOT NULL,
    finding TEXT NOT NULL, ai_state TEXT NOT NULL,
    model_id TEXT NOT NULL, model_version TEXT NOT NULL, first_shown REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback (
    fingerprint TEXT PRIMARY KEY, service_id TEXT NOT NULL, card_uuid TEXT NOT NULL,
    outcome TEXT NOT NULL, body TEXT NOT NULL, received_at REAL NOT NULL
);
-- Each inference worker's latest sign of life, for /readyz.
CREATE TABLE IF NOT EXISTS workers (
    name TEXT PRIMARY KEY, model_label TEXT NOT NULL, last_seen REAL NOT NULL, last_error TEXT
);
-- Where the polling watcher (and an empty Subscription notification) got to, per source.
CREATE TABLE IF NOT EXISTS watch_cursors (
    source TEXT PRIMARY KEY, last_updated TEXT NOT NULL, polled_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL, study_uid TEXT NOT NULL, patient_id TEXT,
    model_id TEXT NOT NULL, model_version TEXT NOT NULL,
    fhir_server TEXT, study_resource TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0, error TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL,
    not_before REAL NOT NULL DEFAULT 0,
    lease_owner TEXT
);
-- At most one live job per study and model version: enqueueing twice is a no-op.
CREATE UNIQUE INDEX IF NOT EXISTS jobs_live
    ON jobs (source, study_uid, model_id, model_version)
    WHERE status IN ('queued', 'running');
-- Results belong to the data source (the canonical FHIR base of the EHR holding the study):
-- a Study UID seen by one EHR never reveals another EHR's result, even if a caller sends a
-- copied UID, and every caller configured for the same EHR sees the same result.
CREATE TABLE IF NOT EXISTS results (
    source TEXT NOT NULL, study_uid TEXT NOT NULL,
    model_id TEXT NOT NULL, model_version TEXT NOT NULL, patient_id TEXT,
    status TEXT NOT NULL, body TEXT NOT NULL, created_at REAL NOT NULL,
    filed_location TEXT,
    PRIMARY KEY (source, study_uid, model_id, model_version)
);
-- The DICOM a live job came with (the viewer fetched it with the clinician's token): the
-- worker analyses it instead of fetching the study's images. Gone when the job is closed.
CREATE TABLE IF NOT EXISTS job_dicom (
    job_id INTEGER PRIMARY KEY REFERENCES jobs (id), body BLOB NOT NULL
);
"""


JOB_STATES = ("queued", "waiting", "running", "done", "failed")  # job_counts() keys


@dataclass(frozen=True)
class StudyRef:
    """A study in its data source: the canonical FHIR base of the EHR that holds it (or, for a
    caller that named no FHIR server, the caller's issuer)."""

    source: str
    study_uid: str
    patient_id: str | None = None

    def __post_init__(self) -> None:
        # One spelling per FHIR base, whoever built the reference.
        object.__setattr__(self, "source", canonical_fhir_base(self.source))


@dataclass(frozen=True)
class StoredResult:
    result: AnalysisResult
    patient_id: str | None
    filed_location: str | None = None  # where the EHR keeps the filed DiagnosticReport


@dataclass(frozen=True)
class Job:
    id: int
    ref: StudyRef
    model: ModelInfo
    fhir_server: str | None
    study_resource: dict[str, Any]
    attempts: int
    created_at: float = 0.0  # when the job was queued (time.time()); 0: not known
    dicom: bytes | None = None  # the image the job came with (analysed instead of fetched)


@dataclass(frozen=True)
class Analysis:
    """A job and, once there is one, its result (what the REST API reports)."""

    id: int
    ref: StudyRef
    model_id: str
    model_version: str
    job_status: str  # queued, waiting, running, done, failed
    reason: str | None
    created_at: float
    result: AnalysisResult | None
    filed_location: str | None


class SqliteStore:
    """All durable state of the embedded deployment. Safe across threads and processes."""

    def __init__(self, path: str | Path, max_queue: int = 10_000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_queue = max_queue
        self._local = threading.local()
        conn = self._conn()
        _migrate(conn)  # an older file is brought up to date before the schema names new columns
        conn.executescript(SCHEMA)  # executescript manages its own transaction
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=10000")
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # -- JWT replay cache -------------------------------------------------------------------
    def remember_jti(self, iss: str, jti: str, expires_at: int) -> bool:
        """Record a token id; False when it was seen before (a replay)."""
        now = int(time.time())
        with self._tx() as conn:
            # Purge entries long expired (exp plus a generous skew) so the table stays small.
            conn.execute("DELETE FROM jwt_jti WHERE expires_at < ?", (now - 600,))
            cursor = conn.execute(
                "INSERT OR IGNORE INTO jwt_jti (iss, jti, expires_at) VALUES (?, ?, ?)",
                (iss, jti, max(expires_at, now)),
            )
            return cursor.rowcount == 1

    # -- feedback ---------------------------------------------------------------------------
    def store_feedback(self, service_id: str, item: dict[str, Any]) -> bool:
        """Store one feedback item; False when the identical item was stored before."""
        body = json.dumps(item, sort_keys=True, separators=(",", ":"))
        fingerprint = hashlib.sha256(f"{service_id}\n{body}".encode()).hexdigest()
        with self._tx() as conn:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO feedback VALUES (?, ?, ?, ?, ?, ?)",
                (fingerprint, service_id, item["card"], item["outcome"], body, time.time()),
            )
            return cursor.rowcount == 1

    def record_cards(self, records: Iterable[CardRecord]) -> None:
        now = time.time()
        with self._tx() as conn:
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

    def feedback_rows(self) -> Iterator[dict[str, Any]]:
        """Every stored feedback item with the finding its card stated (for the site's review)."""
        cursor = self._conn().execute(
            "SELECT f.received_at, f.service_id, f.card_uuid, f.outcome, f.body, c.source, "
            "c.study_uid, c.finding, c.ai_state, c.model_id, c.model_version "
            "FROM feedback f LEFT JOIN cards c ON c.uuid = f.card_uuid ORDER BY f.received_at"
        )
        columns = [d[0] for d in cursor.description]
        for row in cursor:
            yield dict(zip(columns, row, strict=True))

    def feedback_count(self, service_id: str | None = None) -> int:
        if service_id is None:
            row = self._conn().execute("SELECT count(*) FROM feedback").fetchone()
        else:
            row = (
                self._conn()
                .execute("SELECT count(*) FROM feedback WHERE service_id = ?", (service_id,))
                .fetchone()
            )
        return int(row[0])

    # -- results ----------------------------------------------------------------------------
    def put_result(self, ref: StudyRef, result: AnalysisResult) -> None:
        with self._tx() as conn:
            _insert_result(conn, ref, result)

    def get_result(self, ref: StudyRef, model: ModelInfo) -> StoredResult | None:
        row = (
            self._conn()
            .execute(
                "SELECT body, patient_id, filed_location FROM results WHERE source = ? "
                "AND study_uid = ? AND model_id = ? AND model_version = ?",
                (ref.source, ref.study_uid, model.model_id, model.version),
            )
            .fetchone()
        )
        return StoredResult(AnalysisResult.from_json(row[0]), row[1], row[2]) if row else None

    def mark_filed(self, source: str, study_uid: str, model: ModelInfo, location: str) -> None:
        """Remember that the report of this analysis is in the EHR (so no more filing offers)."""
        with self._tx() as conn:
            conn.execute(
                "UPDATE results SET filed_location = ? WHERE source = ? AND study_uid = ? "
                "AND model_id = ? AND model_version = ?",
                (location, source, study_uid, model.model_id, model.version),
            )

    def card_record(self, card_uuid: str) -> CardRecord | None:
        row = (
            self._conn()
            .execute(
                "SELECT uuid, source, study_uid, finding, ai_state, model_id, model_version "
                "FROM cards WHERE uuid = ?",
                (card_uuid,),
            )
            .fetchone()
        )
        return CardRecord(*row) if row else None

    # -- watch cursors ----------------------------------------------------------------------
    def watch_cursor(self, source: str) -> str | None:
        """The meta.lastUpdated the watcher of this data source got to (None: never ran)."""
        row = (
            self._conn()
            .execute("SELECT last_updated FROM watch_cursors WHERE source = ?", (source,))
            .fetchone()
        )
        return str(row[0]) if row else None

    def set_watch_cursor(self, source: str, last_updated: str) -> None:
        """Move the cursor forward only: a slow poll never undoes a faster one."""
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO watch_cursors VALUES (?, ?, ?) ON CONFLICT(source) DO UPDATE SET "
                "last_updated = max(last_updated, excluded.last_updated), "
                "polled_at = excluded.polled_at",
                (source, last_updated, time.time()),
            )

    # -- job queue --------------------------------------------------------------------------
    def enqueue(
        self,
        ref: StudyRef,
        model: ModelInfo,
        study_resource: dict[str, Any],
        fhir_server: str | None,
        dicom: bytes | None = None,
        *,
        max_dicom_bytes: int = DEFAULT_MAX_BYTES,
    ) -> bool:
        """Queue an analysis; False when one is already queued/running for this study+model.

        ``dicom``: the study's image, analysed instead of fetching it (the viewer read it
        with the clinician's token), stored with the job in the same transaction. A live
        job without an image gets this one, and waits no longer (it may have been waiting
        for access to its EHR); one that has an image keeps it. ImageTooLarge when the
        bytes exceed ``max_dicom_bytes`` (the image limit)."""
        if dicom is not None and len(dicom) > max_dicom_bytes:
            raise ImageTooLarge(
                f"the image is {len(dicom)} bytes, over the {max_dicom_bytes} byte image limit "
                "(CXR_CDS_IMAGE_MAX_BYTES)"
            )
        now = time.time()
        with self._tx() as conn:
            depth = self._depth(conn, model)
            if depth >= self.max_queue:
                raise QueueFull(f"analysis queue holds {depth} jobs (limit {self.max_queue})")
            cursor = conn.execute(
                "INSERT OR IGNORE INTO jobs (source, study_uid, patient_id, model_id, "
                "model_version, fhir_server, study_resource, status, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?)",
                (
                    ref.source,
                    ref.study_uid,
                    ref.patient_id,
                    model.model_id,
                    model.version,
                    fhir_server,
                    json.dumps(study_resource),
                    now,
                    now,
                ),
            )
            created = cursor.rowcount == 1
            if dicom is not None:
                _attach_dicom(conn, cursor.lastrowid if created else None, ref, model, dicom)
            return created

    def job_state(self, ref: StudyRef, model: ModelInfo) -> str | None:
        """'queued' or 'running' when a live job exists, else None."""
        row = (
            self._conn()
            .execute(
                "SELECT status FROM jobs WHERE source = ? AND study_uid = ? AND model_id = ? "
                "AND model_version = ? AND status IN ('queued', 'running')",
                (ref.source, ref.study_uid, model.model_id, model.version),
            )
            .fetchone()
        )
        return str(row[0]) if row else None

    def claim(self, model: ModelInfo, stale_after_s: float = JOB_LEASE_S) -> Job | None:
        """Take the oldest queued job (or one whose worker died mid-run) for this model."""
        jobs = self.claim_batch(model, 1, stale_after_s)
        return jobs[0] if jobs else None

    def claim_batch(
        self,
        model: ModelInfo,
        limit: int,
        stale_after_s: float = JOB_LEASE_S,
        owner: str | None = None,
    ) -> list[Job]:
        """Take up to ``limit`` of the oldest queued jobs for this model in one transaction,
        with those whose worker died mid-run: a claim is a lease, held by ``owner`` while it
        renews it (`renew_leases`); a job left 'running' unrenewed past ``stale_after_s``
        goes to the next claim, so a dead worker's jobs come back."""
        if limit < 1:
            raise ValueError("claim at least one job")
        now = time.time()
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT id, source, study_uid, patient_id, fhir_server, study_resource, attempts, "
                "created_at, d.body FROM jobs LEFT JOIN job_dicom d ON d.job_id = jobs.id "
                "WHERE model_id = ? AND model_version = ? AND "
                "((status = 'queued' AND not_before <= ?) "
                "OR (status = 'running' AND updated_at < ?)) "
                "ORDER BY id LIMIT ?",
                (model.model_id, model.version, now, now - stale_after_s, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, updated_at = ?, "
                "lease_owner = ? WHERE id = ?",
                [(now, owner, row[0]) for row in rows],
            )
        return [
            Job(
                id=row[0],
                ref=StudyRef(source=row[1], study_uid=row[2], patient_id=row[3]),
                model=model,
                fhir_server=row[4],
                study_resource=json.loads(row[5]),
                attempts=row[6] + 1,
                created_at=row[7],
                dicom=bytes(row[8]) if row[8] is not None else None,
            )
            for row in rows
        ]

    def finish(self, job: Job, result: AnalysisResult, filed_location: str | None = None) -> None:
        """Store the result (and where the EHR filed its report) and close the job in one
        transaction (no lost or double result)."""
        self._close(job, "done", None, result, filed_location)

    def fail(
        self,
        job: Job,
        error: str,
        final: AnalysisResult | None = None,
        retry_in_s: float = 0.0,
    ) -> None:
        """Requeue the job (not claimed again for ``retry_in_s``), or with `final` store that
        failure result and close it, atomically."""
        not_before = time.time() + retry_in_s if final is None and retry_in_s > 0 else 0.0
        self._close(
            job, "queued" if final is None else "failed", error[:500], final, not_before=not_before
        )

    def put_back(self, job: Job, reason: str) -> None:
        """Requeue a job that could not start through no fault of its own (the model was
        unavailable): the attempt its claim counted is given back."""
        self.defer(job, reason, 0.0)

    def defer(self, job: Job, reason: str, delay_s: float) -> None:
        """Requeue a job that cannot run yet through no fault of its study (no access to its
        EHR), uncounted, not to be claimed for ``delay_s`` (0: at once, not waiting);
        ``reason`` says why."""
        now = time.time()
        with self._tx() as conn:
            conn.execute(
                "UPDATE jobs SET status = 'queued', attempts = MAX(attempts - 1, 0), error = ?, "
                "updated_at = ?, not_before = ? WHERE id = ? AND status = 'running'",
                (reason[:500], now, now + delay_s if delay_s > 0 else 0.0, job.id),
            )

    def release_waiting(self) -> int:
        """Make every waiting job claimable now (the settings may have changed: a worker
        calls this when it starts); returns how many there were."""
        with self._tx() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET not_before = 0 WHERE status = 'queued' AND not_before > 0"
            )
            return cursor.rowcount

    def requeue(
        self,
        model: ModelInfo,
        *,
        study_uid: str | None = None,
        statuses: Iterable[str] = ("not-analysed", "failed"),
        reason: str | None = None,
        fhir_server: str | None = None,
        dry_run: bool = False,
    ) -> int:
        """Analyse again the studies whose result for this model has one of ``statuses``
        (never "completed": that would file a second report), optionally only one study, a
        reason containing ``reason``, or jobs from ``fhir_server``. Each result is removed and
        its last job queued afresh, in one transaction; returns how many (with ``dry_run``,
        how many would be)."""
        wanted = tuple(statuses)
        if not wanted or "completed" in wanted:
            raise ValueError("requeue takes not-analysed or failed results only")
        now = time.time()
        # Each result with its study's last job (the one to queue again) and its FHIR server.
        sql = (
            "SELECT r.source, r.study_uid, j.id, j.fhir_server FROM results r JOIN jobs j "
            "ON j.id = (SELECT k.id FROM jobs k WHERE k.source = r.source "
            "AND k.study_uid = r.study_uid AND k.model_id = r.model_id "
            "AND k.model_version = r.model_version ORDER BY k.id DESC LIMIT 1) "
            "WHERE r.model_id = ? AND r.model_version = ? "
            f"AND r.status IN ({', '.join('?' for _ in wanted)})"
        )
        params: list[Any] = [model.model_id, model.version, *wanted]
        if study_uid is not None:
            sql += " AND r.study_uid = ?"
            params.append(study_uid)
        if reason is not None:
            sql += " AND instr(lower(coalesce(json_extract(r.body, '$.reason'), '')), ?) > 0"
            params.append(reason.lower())
        with self._tx() as conn:
            # A result without a job (stored by hand) has nothing to run: the join leaves it out.
            chosen = [
                (source, uid, job_id)
                for source, uid, job_id, server in conn.execute(sql, params)
                if fhir_server is None
                or same_fhir_base(source, fhir_server)
                or same_fhir_base(server, fhir_server)
            ]
            if dry_run:
                return len(chosen)
            for source, uid, job_id in chosen:
                conn.execute(
                    "DELETE FROM results WHERE source = ? AND study_uid = ? AND model_id = ? "
                    "AND model_version = ?",
                    (source, uid, model.model_id, model.version),
                )
                conn.execute(
                    "UPDATE jobs SET status = 'queued', attempts = 0, error = NULL, "
                    "not_before = 0, updated_at = ? WHERE id = ?",
                    (now, job_id),
                )
        return len(chosen)

    def heartbeat(self, name: str, model_label: str, error: str | None = None) -> None:
        """A worker says it is alive with its model loaded (``error``: why it cannot work),
        and renews the leases of the jobs it is running."""
        now = time.time()
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO workers VALUES (?, ?, ?, ?)",
                (name, model_label, now, error[:500] if error else None),
            )
            conn.execute(
                "UPDATE jobs SET updated_at = ? WHERE status = 'running' AND lease_owner = ?",
                (now, name),
            )

    def record_worker_exit(self, model_label: str, message: str) -> None:
        """The supervisor saw this model's worker die (shown by /readyz while none runs)."""
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO workers VALUES (?, ?, ?, ?)",
                (f"exit:{model_label}", model_label, time.time(), message[:500]),
            )

    def last_worker_exit(self, model_label: str) -> str | None:
        row = (
            self._conn()
            .execute("SELECT last_error FROM workers WHERE name = ?", (f"exit:{model_label}",))
            .fetchone()
        )
        return str(row[0]) if row and row[0] else None

    def workers(self, model_label: str, seen_within_s: float) -> list[tuple[str, str | None]]:
        """(name, last error) of the workers of this model seen within ``seen_within_s``."""
        rows = (
            self._conn()
            .execute(
                "SELECT name, last_error FROM workers WHERE model_label = ? AND last_seen >= ? "
                "AND name NOT LIKE 'exit:%'",
                (model_label, time.time() - seen_within_s),
            )
            .fetchall()
        )
        return [(str(r[0]), r[1]) for r in rows]

    def analysis(self, job_id: int) -> Analysis | None:
        """One job as the REST API shows it, with its study's result for that model."""
        row = (
            self._conn()
            .execute(
                "SELECT j.id, j.source, j.study_uid, j.patient_id, j.model_id, j.model_version, "
                "j.status, j.error, j.not_before, j.created_at, r.body, r.filed_location "
                "FROM jobs j LEFT JOIN results r ON r.source = j.source "
                "AND r.study_uid = j.study_uid AND r.model_id = j.model_id "
                "AND r.model_version = j.model_version WHERE j.id = ?",
                (job_id,),
            )
            .fetchone()
        )
        if row is None:
            return None
        waiting = row[6] == "queued" and row[8] > time.time()
        return Analysis(
            id=row[0],
            ref=StudyRef(row[1], row[2], row[3]),
            model_id=row[4],
            model_version=row[5],
            job_status="waiting" if waiting else str(row[6]),
            reason=row[7] if waiting or row[6] == "failed" else None,
            created_at=row[9],
            result=AnalysisResult.from_json(row[10]) if row[10] else None,
            filed_location=row[11],
        )

    def latest_job_id(self, ref: StudyRef, model: ModelInfo) -> int | None:
        """The id of the study's latest job for this model (live or not)."""
        row = (
            self._conn()
            .execute(
                "SELECT max(id) FROM jobs WHERE source = ? AND study_uid = ? AND model_id = ? "
                "AND model_version = ?",
                (ref.source, ref.study_uid, model.model_id, model.version),
            )
            .fetchone()
        )
        return int(row[0]) if row and row[0] is not None else None

    def waiting_reason(self, ref: StudyRef, model: ModelInfo) -> str | None:
        """Why the study's queued job waits (None when it is not waiting)."""
        row = (
            self._conn()
            .execute(
                "SELECT error FROM jobs WHERE source = ? AND study_uid = ? AND model_id = ? "
                "AND model_version = ? AND status = 'queued' AND not_before > ?",
                (ref.source, ref.study_uid, model.model_id, model.version, time.time()),
            )
            .fetchone()
        )
        return str(row[0]) if row and row[0] else None

    def _close(
        self,
        job: Job,
        status: str,
        error: str | None,
        result: AnalysisResult | None,
        filed_location: str | None = None,
        not_before: float = 0.0,
    ) -> None:
        with self._tx() as conn:
            if result is not None:
                _insert_result(conn, job.ref, result, filed_location)
            conn.execute(
                "UPDATE jobs SET status = ?, error = ?, updated_at = ?, not_before = ? "
                "WHERE id = ?",
                (status, error, time.time(), not_before, job.id),
            )
            if status in ("done", "failed"):  # a closed job keeps no image
                conn.execute("DELETE FROM job_dicom WHERE job_id = ?", (job.id,))

    @staticmethod
    def _depth(conn: sqlite3.Connection, model: ModelInfo) -> int:
        # Per model version: jobs left by a previous version never block the current one.
        row = conn.execute(
            "SELECT count(*) FROM jobs WHERE model_id = ? AND model_version = ? "
            "AND status IN ('queued', 'running')",
            (model.model_id, model.version),
        ).fetchone()
        return int(row[0])

    def queue_depth(self, model: ModelInfo) -> int:
        return self._depth(self._conn(), model)

    def job_counts(self, model: ModelInfo) -> dict[str, int]:
        """How many jobs of this model version are in each state (what /metrics reports):
        queued (claimable now), waiting (queued, not before a later time), running, done,
        failed. Every state is present, 0 when empty; each job is in exactly one."""
        counts = dict.fromkeys(JOB_STATES, 0)
        rows = (
            self._conn()
            .execute(
                "SELECT CASE WHEN status = 'queued' AND not_before > ? THEN 'waiting' "
                "ELSE status END, count(*) FROM jobs WHERE model_id = ? AND model_version = ? "
                "GROUP BY 1",
                (time.time(), model.model_id, model.version),
            )
            .fetchall()
        )
        for state, count in rows:
            counts[str(state)] = int(count)
        return counts


def _attach_dicom(
    conn: sqlite3.Connection, job_id: int | None, ref: StudyRef, model: ModelInfo, dicom: bytes
) -> None:
    """Store the image with the job just created (``job_id``), else with the study's live
    job when that has none; a queued job so given its image is claimable at once."""
    if job_id is None:
        row = conn.execute(
            "SELECT id FROM jobs WHERE source = ? AND study_uid = ? AND model_id = ? "
            "AND model_version = ? AND status IN ('queued', 'running')",
            (ref.source, ref.study_uid, model.model_id, model.version),
        ).fetchone()
        if row is None:
            return
        job_id = int(row[0])
    cursor = conn.execute(
        "INSERT OR IGNORE INTO job_dicom (job_id, body) VALUES (?, ?)", (job_id, dicom)
    )
    if cursor.rowcount == 1:
        conn.execute("UPDATE jobs SET not_before = 0 WHERE id = ? AND status = 'queued'", (job_id,))


def _insert_result(
    conn: sqlite3.Connection,
    ref: StudyRef,
    result: AnalysisResult,
    filed_location: str | None = None,
) -> None:
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


# PRAGMA user_version of a file this code has brought up to date; each step below is one
# version. Files from before versioning (user_version 0) get every step whose column is
# missing, so no file is broken and none is migrated twice.
SCHEMA_VERSION = 4


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _migrate(conn: sqlite3.Connection) -> None:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version >= SCHEMA_VERSION or not _columns(conn, "jobs"):
        return  # up to date, or a new file that the schema creates whole
    conn.execute("BEGIN IMMEDIATE")
    try:
        if "filed_location" not in _columns(conn, "results"):  # 1: before write-back
            conn.execute("ALTER TABLE results ADD COLUMN filed_location TEXT")
        if "not_before" not in _columns(conn, "jobs"):  # 2: jobs that wait for access
            conn.execute("ALTER TABLE jobs ADD COLUMN not_before REAL NOT NULL DEFAULT 0")
        if "tenant" in _columns(conn, "jobs"):  # 3: keyed by data source, not by caller
            _key_by_data_source(conn)
        if "lease_owner" not in _columns(conn, "jobs"):  # 4: leases renewed by their worker
            conn.execute("ALTER TABLE jobs ADD COLUMN lease_owner TEXT")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _key_by_data_source(conn: sqlite3.Connection) -> None:
    """Version 3: rows keyed by the caller's issuer move to the canonical FHIR base their
    job was read from. A row whose study has no job with a FHIR server keeps its issuer (the
    issuer is that caller's own data source). Where two issuers had the same study, the
    first row keeps the key and the other's live job is dropped: one analysis per study."""
    keyed = [t for t in ("jobs", "results", "cards") if "tenant" in _columns(conn, t)]
    for table in keyed:
        conn.execute(f"ALTER TABLE {table} RENAME COLUMN tenant TO source")
    latest: dict[tuple[str, str, str, str], str] = {}
    for source, uid, model_id, version, server in conn.execute(
        "SELECT source, study_uid, model_id, model_version, fhir_server FROM jobs "
        "WHERE fhir_server IS NOT NULL ORDER BY id"
    ):
        latest[(source, uid, model_id, version)] = canonical_fhir_base(server)
    for (old, uid, model_id, version), new in latest.items():
        key = (old, uid, model_id, version)
        for table in keyed[1:]:
            conn.execute(
                f"UPDATE OR IGNORE {table} SET source = ? WHERE source = ? AND study_uid = ? "
                "AND model_id = ? AND model_version = ?",
                (new, *key),
            )
        conn.execute(
            "UPDATE OR IGNORE jobs SET source = ? WHERE source = ? AND study_uid = ? "
            "AND model_id = ? AND model_version = ? AND fhir_server IS NOT NULL",
            (new, *key),
        )
        if new != old:  # a live job the unique index kept on the old key duplicates one
            conn.execute(
                "DELETE FROM jobs WHERE source = ? AND study_uid = ? AND model_id = ? "
                "AND model_version = ? AND fhir_server IS NOT NULL "
                "AND status IN ('queued', 'running')",
                key,
            )


class QueueFull(Exception):
    """The analysis queue is at its limit; the caller gets 'in progress' later, not a crash."""


class ImageTooLarge(ValueError):
    """The image a job was to carry exceeds the image limit; nothing was queued."""
