"""The PostgreSQL database's tables, as numbered migration steps recorded in
``schema_migrations``.

Each step runs in its own transaction under a transaction-scoped advisory lock, so that
processes starting at once (web replicas, workers on several machines) apply every step
exactly once: the second one waits for the lock, then finds the step recorded. A step that
fails rolls back whole and leaves the steps before it applied. Steps are only ever added at
the end; a database with steps this code does not know (a newer release migrated it) is left
as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg

# pg_advisory_xact_lock key of the schema (any fixed bigint; advisory locks are per database).
MIGRATION_LOCK = 0x6378_7263_6473  # "cxrcds"

# Epoch seconds (double precision, like time.time()) on the database's clock: one clock for
# every machine, so leases and waits never depend on a worker's clock. now() is the start of
# the transaction (of the statement, outside one).
NOW = "extract(epoch FROM now())::double precision"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "tables of every storage port",
        """
CREATE TABLE jwt_jti (
    iss text NOT NULL, jti text NOT NULL, expires_at bigint NOT NULL,
    PRIMARY KEY (iss, jti)
);
CREATE INDEX jwt_jti_expiry ON jwt_jti (expires_at);
-- What each AI-result card said, so feedback on a card uuid can be traced to its finding.
CREATE TABLE cards (
    uuid text PRIMARY KEY, source text NOT NULL, study_uid text NOT NULL,
    finding text NOT NULL, ai_state text NOT NULL,
    model_id text NOT NULL, model_version text NOT NULL,
    first_shown double precision NOT NULL
);
-- seq orders items received within the same instant (oldest first).
CREATE TABLE feedback (
    fingerprint text PRIMARY KEY, seq bigint GENERATED ALWAYS AS IDENTITY,
    service_id text NOT NULL, card_uuid text NOT NULL, outcome text NOT NULL,
    body text NOT NULL, received_at double precision NOT NULL
);
CREATE INDEX feedback_order ON feedback (received_at, seq);
-- Each inference worker's latest sign of life, for /readyz.
CREATE TABLE workers (
    name text PRIMARY KEY, model_label text NOT NULL,
    last_seen double precision NOT NULL, last_error text
);
-- Where the polling watcher got to, per source. FHIR instants compare as bytes (COLLATE "C"),
-- as in SQLite, whatever the database's locale.
CREATE TABLE watch_cursors (
    source text PRIMARY KEY, last_updated text COLLATE "C" NOT NULL,
    polled_at double precision NOT NULL
);
CREATE TABLE jobs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source text NOT NULL, study_uid text NOT NULL, patient_id text,
    model_id text NOT NULL, model_version text NOT NULL,
    fhir_server text, study_resource text NOT NULL,
    status text NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
    attempts integer NOT NULL DEFAULT 0, error text,
    created_at double precision NOT NULL, updated_at double precision NOT NULL,
    not_before double precision NOT NULL DEFAULT 0,
    lease_owner text
);
-- At most one live job per study and model version: enqueueing twice is a no-op, whichever
-- process or machine enqueues (exactly-once is this index, not the callers).
CREATE UNIQUE INDEX jobs_live ON jobs (source, study_uid, model_id, model_version)
    WHERE status IN ('queued', 'running');
-- The claim (oldest first) and the queue depth read only live jobs.
CREATE INDEX jobs_claim ON jobs (model_id, model_version, id)
    WHERE status IN ('queued', 'running');
CREATE INDEX jobs_study ON jobs (source, study_uid, model_id, model_version, id);
CREATE INDEX jobs_states ON jobs (model_id, model_version, status, not_before);
CREATE INDEX jobs_lease ON jobs (lease_owner) WHERE status = 'running';
-- Results belong to the data source (the canonical FHIR base of the EHR holding the study).
-- body is AnalysisResult.to_json() verbatim (text: any JSON Python writes, NaN and \\u0000
-- included, which jsonb refuses); reason is its "reason", for requeue's filter.
CREATE TABLE results (
    source text NOT NULL, study_uid text NOT NULL,
    model_id text NOT NULL, model_version text NOT NULL, patient_id text,
    status text NOT NULL, reason text NOT NULL DEFAULT '', body text NOT NULL,
    created_at double precision NOT NULL, filed_location text,
    PRIMARY KEY (source, study_uid, model_id, model_version)
);
-- The DICOM a live job came with; deleted when the job is closed.
CREATE TABLE job_dicom (
    job_id bigint PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    body bytea NOT NULL
);
""",
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1].version


def applied_versions(conn: psycopg.Connection) -> set[int]:
    """The steps recorded in the database (none before the first migration)."""
    row = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return set()
    return {int(r[0]) for r in conn.execute("SELECT version FROM schema_migrations")}


def migrate(conn: psycopg.Connection, steps: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """Apply the steps the database lacks, in order, each in its own transaction; the
    versions applied by this call. ``conn`` is in autocommit mode."""
    if {step.version for step in steps} <= applied_versions(conn):
        return []  # up to date: no lock taken
    applied: list[int] = []
    for step in steps:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            # Created under the lock too: CREATE TABLE IF NOT EXISTS alone races.
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
                "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            if conn.execute(
                "SELECT 1 FROM schema_migrations WHERE version = %s", (step.version,)
            ).fetchone():
                continue  # recorded before, or by a process that held the lock first
            conn.execute(step.sql)  # several statements: sent without parameters
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (step.version, step.name),
            )
            applied.append(step.version)
    return applied
