"""SQLite adapters for the job queue and the worker registry (cds_service.storage.ports)."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from typing import Any

from cds_service.config import JOB_LEASE_S
from cds_service.imaging.limits import DEFAULT_MAX_BYTES
from cds_service.results import AnalysisResult, ModelInfo
from cds_service.sources import same_fhir_base
from cds_service.storage.ports import (
    JOB_STATES,
    Analysis,
    ImageTooLarge,
    Job,
    QueueFull,
    StudyRef,
)
from cds_service.storage.sqlite.database import SqliteDatabase
from cds_service.storage.sqlite.records import insert_result


class SqliteJobQueue:
    """Jobs in the ``jobs`` table; a live job's image in ``job_dicom``; its result written to
    ``results`` in the transaction that closes it."""

    def __init__(self, db: SqliteDatabase, max_queue: int = 10_000) -> None:
        self.db = db
        self.max_queue = max_queue

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
        with self.db.transaction() as conn:
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
            self.db.connection()
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
        with self.db.transaction() as conn:
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
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET status = 'queued', attempts = MAX(attempts - 1, 0), error = ?, "
                "updated_at = ?, not_before = ? WHERE id = ? AND status = 'running'",
                (reason[:500], now, now + delay_s if delay_s > 0 else 0.0, job.id),
            )

    def release_waiting(self) -> int:
        """Make every waiting job claimable now (the settings may have changed: a worker
        calls this when it starts); returns how many there were."""
        with self.db.transaction() as conn:
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
        with self.db.transaction() as conn:
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

    def analysis(self, job_id: int) -> Analysis | None:
        """One job as the REST API shows it, with its study's result for that model."""
        row = (
            self.db.connection()
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
            self.db.connection()
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
            self.db.connection()
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
        with self.db.transaction() as conn:
            if result is not None:
                insert_result(conn, job.ref, result, filed_location)
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
        return self._depth(self.db.connection(), model)

    def renew_leases(self, owner: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET updated_at = ? WHERE status = 'running' AND lease_owner = ?",
                (time.time(), owner),
            )

    def job_counts(self, model: ModelInfo) -> dict[str, int]:
        """How many jobs of this model version are in each state (what /metrics reports):
        queued (claimable now), waiting (queued, not before a later time), running, done,
        failed. Every state is present, 0 when empty; each job is in exactly one."""
        counts = dict.fromkeys(JOB_STATES, 0)
        rows = (
            self.db.connection()
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


class SqliteWorkerRegistry:
    def __init__(self, db: SqliteDatabase) -> None:
        self.db = db

    def heartbeat(self, name: str, model_label: str, error: str | None = None) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO workers VALUES (?, ?, ?, ?)",
                (name, model_label, time.time(), error[:500] if error else None),
            )

    def alive(self, model_label: str, seen_within_s: float) -> list[tuple[str, str | None]]:
        rows = (
            self.db.connection()
            .execute(
                "SELECT name, last_error FROM workers WHERE model_label = ? AND last_seen >= ? "
                "AND name NOT LIKE 'exit:%'",
                (model_label, time.time() - seen_within_s),
            )
            .fetchall()
        )
        return [(str(r[0]), r[1]) for r in rows]

    def record_exit(self, model_label: str, message: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO workers VALUES (?, ?, ?, ?)",
                (f"exit:{model_label}", model_label, time.time(), message[:500]),
            )

    def last_exit(self, model_label: str) -> str | None:
        row = (
            self.db.connection()
            .execute("SELECT last_error FROM workers WHERE name = ?", (f"exit:{model_label}",))
            .fetchone()
        )
        return str(row[0]) if row and row[0] else None
