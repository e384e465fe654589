"""PostgreSQL adapters for the job queue and the worker registry (cds_service.storage.ports).

Same behaviour as the SQLite ones, for any number of processes on any number of machines:
- one live job per study and model version is the partial unique index ``jobs_live``
  (enqueue is INSERT ... ON CONFLICT DO NOTHING);
- a claim is ``SELECT ... FOR UPDATE SKIP LOCKED``: two workers never take the same job, and
  neither waits for the other;
- the queue limit is approximate: enqueues running at the same instant each count the live
  jobs before any of them commits, so the queue may exceed ``max_queue`` by up to the number
  of concurrent enqueues (never a lost or a duplicate job);
- times are the database's clock (`schema.NOW`), so leases do not depend on clock skew
  between machines.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import psycopg

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
from cds_service.storage.postgres.database import PostgresDatabase, Row
from cds_service.storage.postgres.records import insert_result
from cds_service.storage.postgres.schema import NOW

LIVE = "status IN ('queued', 'running')"
STUDY = "source = %s AND study_uid = %s AND model_id = %s AND model_version = %s"


class PostgresJobQueue:
    """Jobs in the ``jobs`` table; a live job's image in ``job_dicom``; its result written to
    ``results`` in the transaction that closes it."""

    def __init__(self, db: PostgresDatabase, max_queue: int = 10_000) -> None:
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

        ``dicom``: the study's image, stored with the job in the same transaction; a live job
        without an image gets this one and waits no longer; one that has an image keeps it.
        ImageTooLarge over ``max_dicom_bytes``; QueueFull at the (approximate) queue limit."""
        if dicom is not None and len(dicom) > max_dicom_bytes:
            raise ImageTooLarge(
                f"the image is {len(dicom)} bytes, over the {max_dicom_bytes} byte image limit "
                "(CXR_CDS_IMAGE_MAX_BYTES)"
            )
        with self.db.transaction() as conn:
            depth = _depth(conn, model)
            if depth >= self.max_queue:
                raise QueueFull(f"analysis queue holds {depth} jobs (limit {self.max_queue})")
            row = conn.execute(
                "INSERT INTO jobs (source, study_uid, patient_id, model_id, model_version, "
                "fhir_server, study_resource, status, created_at, updated_at) "
                f"VALUES (%s, %s, %s, %s, %s, %s, %s, 'queued', {NOW}, {NOW}) "
                f"ON CONFLICT (source, study_uid, model_id, model_version) WHERE {LIVE} "
                "DO NOTHING RETURNING id",
                (
                    ref.source,
                    ref.study_uid,
                    ref.patient_id,
                    model.model_id,
                    model.version,
                    fhir_server,
                    json.dumps(study_resource),
                ),
            ).fetchone()
            if dicom is not None:
                _attach_dicom(conn, int(row[0]) if row else None, ref, model, dicom)
            return row is not None

    def job_state(self, ref: StudyRef, model: ModelInfo) -> str | None:
        """'queued' or 'running' when a live job exists, else None."""
        row = self.db.read_one(
            f"SELECT status FROM jobs WHERE {STUDY} AND {LIVE}", _study(ref, model)
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
        """Take up to ``limit`` of the oldest claimable jobs for this model in one statement:
        queued ones due now, and running ones whose lease went unrenewed past
        ``stale_after_s`` (their worker died). Rows another worker is claiming are skipped,
        not waited for: concurrent claims get disjoint jobs."""
        if limit < 1:
            raise ValueError("claim at least one job")
        with self.db.transaction() as conn:
            rows = conn.execute(
                "WITH picked AS (SELECT id FROM jobs WHERE model_id = %s AND model_version = %s "
                f"AND ((status = 'queued' AND not_before <= {NOW}) "
                f"OR (status = 'running' AND updated_at < {NOW} - %s)) "
                "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED), "
                "claimed AS (UPDATE jobs j SET status = 'running', attempts = j.attempts + 1, "
                f"updated_at = {NOW}, lease_owner = %s FROM picked WHERE j.id = picked.id "
                "RETURNING j.id, j.source, j.study_uid, j.patient_id, j.fhir_server, "
                "j.study_resource, j.attempts, j.created_at) "
                "SELECT c.*, d.body FROM claimed c LEFT JOIN job_dicom d ON d.job_id = c.id "
                "ORDER BY c.id",
                (model.model_id, model.version, float(stale_after_s), limit, owner),
            ).fetchall()
        return [
            Job(
                id=int(row[0]),
                ref=StudyRef(source=row[1], study_uid=row[2], patient_id=row[3]),
                model=model,
                fhir_server=row[4],
                study_resource=json.loads(row[5]),
                attempts=int(row[6]),
                created_at=float(row[7]),
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
        """Requeue the job (not claimed again for ``retry_in_s``), or with ``final`` store
        that failure result and close it, atomically."""
        delay = retry_in_s if final is None and retry_in_s > 0 else 0.0
        self._close(job, "queued" if final is None else "failed", error[:500], final, delay=delay)

    def put_back(self, job: Job, reason: str) -> None:
        """Requeue a job that could not start through no fault of its own (the model was
        unavailable): the attempt its claim counted is given back."""
        self.defer(job, reason, 0.0)

    def defer(self, job: Job, reason: str, delay_s: float) -> None:
        """Requeue, uncounted, a job that cannot run yet through no fault of its study (no
        access to its EHR), not to be claimed for ``delay_s`` (0: at once, not waiting)."""
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET status = 'queued', attempts = GREATEST(attempts - 1, 0), "
                f"error = %s, updated_at = {NOW}, not_before = {_not_before()} "
                "WHERE id = %s AND status = 'running'",
                (reason[:500], *_delay(delay_s), job.id),
            )

    def release_waiting(self) -> int:
        """Make every waiting job claimable now; returns how many there were."""
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
        reason containing ``reason`` (any case), or jobs from ``fhir_server``. Each result is
        removed and its last job queued afresh, in one transaction; returns how many (with
        ``dry_run``, how many would be). A study that got a live job meanwhile keeps its
        result and is not counted (that job analyses it)."""
        wanted = list(statuses)
        if not wanted or "completed" in wanted:
            raise ValueError("requeue takes not-analysed or failed results only")
        # Each result with its study's last job (the one to queue again) and its FHIR server.
        sql = (
            "SELECT r.source, r.study_uid, j.id, j.fhir_server FROM results r JOIN jobs j "
            "ON j.id = (SELECT k.id FROM jobs k WHERE k.source = r.source "
            "AND k.study_uid = r.study_uid AND k.model_id = r.model_id "
            "AND k.model_version = r.model_version ORDER BY k.id DESC LIMIT 1) "
            "WHERE r.model_id = %s AND r.model_version = %s AND r.status = ANY(%s)"
        )
        params: list[Any] = [model.model_id, model.version, wanted]
        if study_uid is not None:
            sql += " AND r.study_uid = %s"
            params.append(study_uid)
        if reason is not None:
            sql += " AND strpos(lower(r.reason), lower(%s)) > 0"
            params.append(reason)
        with self.db.transaction() as conn:
            # A result without a job (stored by hand) has nothing to run: the join leaves it out.
            chosen = [
                (source, uid, int(job_id))
                for source, uid, job_id, server in conn.execute(sql + " FOR UPDATE OF r", params)
                if fhir_server is None
                or same_fhir_base(source, fhir_server)
                or same_fhir_base(server, fhir_server)
            ]
            if dry_run:
                return len(chosen)
            done = 0
            for source, uid, job_id in chosen:
                try:
                    with conn.transaction():  # a savepoint per study
                        conn.execute(
                            "DELETE FROM results WHERE source = %s AND study_uid = %s "
                            "AND model_id = %s AND model_version = %s",
                            (source, uid, model.model_id, model.version),
                        )
                        conn.execute(
                            "UPDATE jobs SET status = 'queued', attempts = 0, error = NULL, "
                            f"not_before = 0, updated_at = {NOW} WHERE id = %s",
                            (job_id,),
                        )
                except psycopg.errors.UniqueViolation:
                    continue  # enqueued again since the SELECT: that live job will run
                done += 1
        return done

    def analysis(self, job_id: int) -> Analysis | None:
        """One job as the REST API shows it, with its study's result for that model."""
        row = self.db.read_one(
            "SELECT j.id, j.source, j.study_uid, j.patient_id, j.model_id, j.model_version, "
            f"j.status, j.error, j.status = 'queued' AND j.not_before > {NOW}, j.created_at, "
            "r.body, r.filed_location "
            "FROM jobs j LEFT JOIN results r ON r.source = j.source "
            "AND r.study_uid = j.study_uid AND r.model_id = j.model_id "
            "AND r.model_version = j.model_version WHERE j.id = %s",
            (job_id,),
        )
        if row is None:
            return None
        waiting = bool(row[8])
        return Analysis(
            id=int(row[0]),
            ref=StudyRef(row[1], row[2], row[3]),
            model_id=row[4],
            model_version=row[5],
            job_status="waiting" if waiting else str(row[6]),
            reason=row[7] if waiting or row[6] == "failed" else None,
            created_at=float(row[9]),
            result=AnalysisResult.from_json(row[10]) if row[10] else None,
            filed_location=row[11],
        )

    def latest_job_id(self, ref: StudyRef, model: ModelInfo) -> int | None:
        """The id of the study's latest job for this model (live or not)."""
        row = self.db.read_one(f"SELECT max(id) FROM jobs WHERE {STUDY}", _study(ref, model))
        return int(row[0]) if row and row[0] is not None else None

    def waiting_reason(self, ref: StudyRef, model: ModelInfo) -> str | None:
        """Why the study's queued job waits (None when it is not waiting)."""
        row = self.db.read_one(
            f"SELECT error FROM jobs WHERE {STUDY} AND status = 'queued' AND not_before > {NOW}",
            _study(ref, model),
        )
        return str(row[0]) if row and row[0] else None

    def _close(
        self,
        job: Job,
        status: str,
        error: str | None,
        result: AnalysisResult | None,
        filed_location: str | None = None,
        delay: float = 0.0,
    ) -> None:
        with self.db.transaction() as conn:
            if result is not None:
                insert_result(conn, job.ref, result, filed_location)
            conn.execute(
                f"UPDATE jobs SET status = %s, error = %s, updated_at = {NOW}, "
                f"not_before = {_not_before()} WHERE id = %s",
                (status, error, *_delay(delay), job.id),
            )
            if status in ("done", "failed"):  # a closed job keeps no image
                conn.execute("DELETE FROM job_dicom WHERE job_id = %s", (job.id,))

    def queue_depth(self, model: ModelInfo) -> int:
        """Live (queued or running) jobs of this model version."""
        row = self.db.read_one(
            f"SELECT count(*) FROM jobs WHERE model_id = %s AND model_version = %s AND {LIVE}",
            (model.model_id, model.version),
        )
        return int(row[0]) if row else 0

    def renew_leases(self, owner: str) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                f"UPDATE jobs SET updated_at = {NOW} WHERE status = 'running' AND lease_owner = %s",
                (owner,),
            )

    def job_counts(self, model: ModelInfo) -> dict[str, int]:
        """How many jobs of this model version are in each state: queued (claimable now),
        waiting (queued, not before a later time), running, done, failed. Every state is
        present, 0 when empty; each job is in exactly one."""
        counts = dict.fromkeys(JOB_STATES, 0)
        rows = self.db.read(
            f"SELECT CASE WHEN status = 'queued' AND not_before > {NOW} THEN 'waiting' "
            "ELSE status END, count(*) FROM jobs WHERE model_id = %s AND model_version = %s "
            "GROUP BY 1",
            (model.model_id, model.version),
        )
        for state, count in rows:
            counts[str(state)] = int(count)
        return counts


def _study(ref: StudyRef, model: ModelInfo) -> tuple[str, str, str, str]:
    return (ref.source, ref.study_uid, model.model_id, model.version)


def _not_before() -> str:
    """not_before for a wait of (%s, %s) = (delay, delay) seconds from now; 0: none."""
    return f"CASE WHEN %s > 0 THEN {NOW} + %s ELSE 0 END"


def _delay(delay_s: float) -> tuple[float, float]:
    return (float(delay_s), float(delay_s))


def _depth(conn: psycopg.Connection[Row], model: ModelInfo) -> int:
    # Per model version: jobs left by a previous version never block the current one.
    row = conn.execute(
        f"SELECT count(*) FROM jobs WHERE model_id = %s AND model_version = %s AND {LIVE}",
        (model.model_id, model.version),
    ).fetchone()
    return int(row[0]) if row else 0


def _attach_dicom(
    conn: psycopg.Connection[Row],
    job_id: int | None,
    ref: StudyRef,
    model: ModelInfo,
    dicom: bytes,
) -> None:
    """Store the image with the job just created (``job_id``), else with the study's live
    job when that has none; a queued job so given its image is claimable at once. The live
    job's row is locked first: a worker closing it meanwhile either waits for this or has
    closed it already (then no image is attached to a closed job)."""
    if job_id is None:
        row = conn.execute(
            f"SELECT id FROM jobs WHERE {STUDY} AND {LIVE} FOR UPDATE", _study(ref, model)
        ).fetchone()
        if row is None:
            return
        job_id = int(row[0])
    cursor = conn.execute(
        "INSERT INTO job_dicom (job_id, body) VALUES (%s, %s) ON CONFLICT (job_id) DO NOTHING",
        (job_id, dicom),
    )
    if cursor.rowcount == 1:
        conn.execute(
            "UPDATE jobs SET not_before = 0 WHERE id = %s AND status = 'queued'", (job_id,)
        )


class PostgresWorkerRegistry:
    def __init__(self, db: PostgresDatabase) -> None:
        self.db = db

    def heartbeat(self, name: str, model_label: str, error: str | None = None) -> None:
        self._put(name, model_label, error[:500] if error else None)

    def alive(self, model_label: str, seen_within_s: float) -> list[tuple[str, str | None]]:
        rows = self.db.read(
            f"SELECT name, last_error FROM workers WHERE model_label = %s "
            f"AND last_seen >= {NOW} - %s AND name NOT LIKE 'exit:%%'",
            (model_label, float(seen_within_s)),
        )
        return [(str(r[0]), r[1]) for r in rows]

    def record_exit(self, model_label: str, message: str) -> None:
        self._put(f"exit:{model_label}", model_label, message[:500])

    def last_exit(self, model_label: str) -> str | None:
        row = self.db.read_one(
            "SELECT last_error FROM workers WHERE name = %s", (f"exit:{model_label}",)
        )
        return str(row[0]) if row and row[0] else None

    def _put(self, name: str, model_label: str, error: str | None) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO workers (name, model_label, last_seen, last_error) "
                f"VALUES (%s, %s, {NOW}, %s) ON CONFLICT (name) DO UPDATE SET "
                "model_label = excluded.model_label, last_seen = excluded.last_seen, "
                "last_error = excluded.last_error",
                (name, model_label, error),
            )
