"""The SQLite file's tables, its schema version and the steps that bring older files up to it."""

from __future__ import annotations

import sqlite3

from cds_service.sources import canonical_fhir_base

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

# PRAGMA user_version of a file this code has brought up to date; each step below is one
# version. Files from before versioning (user_version 0) get every step whose column is
# missing, so no file is broken and none is migrated twice.
SCHEMA_VERSION = 4


def create_or_migrate(conn: sqlite3.Connection) -> None:
    """Bring an older file up to date (before the schema names its new columns), then create
    whatever is missing."""
    _migrate(conn)
    conn.executescript(SCHEMA)  # executescript manages its own transaction
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


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
