"""Results belong to the data source (the EHR's canonical FHIR base), not to the caller."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import requests

from cds_service.config import Settings
from cds_service.fhir.prefetch import PREFETCH_KEY
from cds_service.inference.simulated import SimulatedBackend
from cds_service.sources import canonical_fhir_base, data_source
from cds_service.storage.ports import StudyRef
from cds_service.storage.sqlite import open_sqlite_storage
from tests.conftest import (
    SandboxHandle,
    analyse_seeded,
    claims_for,
    patient_view_body,
    sign,
    two_issuer_service,
)

MODEL = SimulatedBackend.model
PV = "cxr-ai-patient-view"


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("https://EHR.Example.org/FHIR/R4/", "https://ehr.example.org/FHIR/R4"),
        ("HTTPS://ehr.example.org:443/fhir", "https://ehr.example.org/fhir"),
        ("http://ehr.example.org:80/fhir//", "http://ehr.example.org/fhir"),
        ("http://ehr.example.org:8080/fhir", "http://ehr.example.org:8080/fhir"),
        ("https://ehr.example.org/fhir?x=1#y", "https://ehr.example.org/fhir"),
        ("http://[::1]:9000/fhir/", "http://[::1]:9000/fhir"),
        ("development", "development"),
    ],
)
def test_one_spelling_per_fhir_base(given: str, canonical: str) -> None:
    assert canonical_fhir_base(given) == canonical
    assert canonical_fhir_base(canonical) == canonical  # idempotent


def test_a_caller_without_a_fhir_server_is_its_own_data_source() -> None:
    assert data_source(None, "https://cds-client.example/") == "https://cds-client.example"
    assert data_source("https://EHR.example/fhir/", "https://x") == "https://ehr.example/fhir"
    # A reference spelled differently names the same study in the same place.
    assert StudyRef("https://EHR.example:443/fhir/", "1.2") == StudyRef(
        "https://ehr.example/fhir", "1.2"
    )


def hook(sandbox: SandboxHandle, study: dict[str, object], **extra: object) -> dict[str, object]:
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": study}]}
    return patient_view_body("cxr-demo-1", prefetch={PREFETCH_KEY: bundle}, **extra)


def post_as(url: str, key: object, iss: str, body: dict[str, object]) -> requests.Response:
    token = sign(key, claims_for(iss, url))
    return requests.post(url, json=body, timeout=10, headers={"Authorization": f"Bearer {token}"})


def test_two_callers_configured_for_one_ehr_see_the_same_results(
    tmp_path: Path, sandbox: SandboxHandle
) -> None:
    """The sandbox's own CDS client analysed the studies; a second CDS client configured for
    the same FHIR base (the public CDS Hooks sandbox's case) sees those results, spelled its
    own way, without a second analysis. A client that does not list the base does not."""
    handle, server, key, other = two_issuer_service(
        tmp_path,
        sandbox,
        "https://second-cds-client.example",
        other_fhir_servers=(sandbox.fhir + "/",),
    )
    try:
        analyse_seeded(handle, sandbox)
        study = sandbox.studies[0]
        shown = sandbox.fhir.replace("http://", "HTTP://")  # the same base, spelled otherwise
        response = post_as(handle.url(PV), key, other.iss, hook(sandbox, study, fhirServer=shown))
        cards = response.json()["cards"]
        assert cards and all("in progress" not in c["summary"] for c in cards)
        assert any("> " in c["detail"] for c in cards)  # the findings, quoted from the report
        assert handle.store.jobs.queue_depth(MODEL) == 0  # nothing analysed twice

        # The same caller naming no FHIR server is its own data source: nothing to show yet.
        response = post_as(handle.url(PV), key, other.iss, hook(sandbox, study))
        [card] = response.json()["cards"]
        assert "AI analysis waiting" in card["summary"]  # no FHIR server to read it from
        assert "no FHIR server" in card["detail"]
        job = handle.store.jobs.claim(MODEL)
        assert job is not None
        assert job.ref.source == "https://second-cds-client.example"
        assert job.fhir_server is None
    finally:
        server.stop()


def test_a_fhir_server_the_caller_does_not_list_reveals_nothing(
    tmp_path: Path, sandbox: SandboxHandle
) -> None:
    handle, server, key, other = two_issuer_service(tmp_path, sandbox, "https://other.example")
    try:
        analyse_seeded(handle, sandbox)
        body = hook(sandbox, sandbox.studies[0], fhirServer=sandbox.fhir)
        [card] = post_as(handle.url(PV), key, other.iss, body).json()["cards"]
        assert "AI analysis waiting" in card["summary"]  # queued as its own, unanalysed
        assert "> " not in card["detail"]
    finally:
        server.stop()


def test_the_public_sandbox_may_name_the_fhir_bases_configured_for_it() -> None:
    env = {
        "CXR_CDS_MODE": "demo",
        "CXR_CDS_PUBLIC_URL": "http://localhost:8080",
        "CXR_CDS_TRUST_PUBLIC_SANDBOX": "1",
        "CXR_CDS_PUBLIC_SANDBOX_FHIR_SERVERS": "http://localhost:8090/fhir",
    }
    settings = Settings.from_env(env)
    public = settings.accepted_issuers()[-1]
    assert public.allows_fhir_server("http://LOCALHOST:8090/fhir/")
    assert not public.allows_fhir_server("http://localhost:8091/fhir")
    with pytest.raises(Exception, match="PUBLIC_SANDBOX_FHIR_SERVERS"):
        Settings.from_env({**env, "CXR_CDS_PUBLIC_SANDBOX_FHIR_SERVERS": "localhost/fhir"})


V2_SCHEMA = """
CREATE TABLE cards (
    uuid TEXT PRIMARY KEY, tenant TEXT NOT NULL, study_uid TEXT NOT NULL,
    finding TEXT NOT NULL, ai_state TEXT NOT NULL,
    model_id TEXT NOT NULL, model_version TEXT NOT NULL, first_shown REAL NOT NULL
);
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant TEXT NOT NULL, study_uid TEXT NOT NULL, patient_id TEXT,
    model_id TEXT NOT NULL, model_version TEXT NOT NULL,
    fhir_server TEXT, study_resource TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0, error TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL,
    not_before REAL NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX jobs_live ON jobs (tenant, study_uid, model_id, model_version)
    WHERE status IN ('queued', 'running');
CREATE TABLE results (
    tenant TEXT NOT NULL, study_uid TEXT NOT NULL,
    model_id TEXT NOT NULL, model_version TEXT NOT NULL, patient_id TEXT,
    status TEXT NOT NULL, body TEXT NOT NULL, created_at REAL NOT NULL,
    filed_location TEXT,
    PRIMARY KEY (tenant, study_uid, model_id, model_version)
);
PRAGMA user_version = 2;
"""


def test_a_file_keyed_by_issuer_is_rekeyed_by_fhir_base(tmp_path: Path) -> None:
    """Version 2 files keyed results by the caller's issuer. After the migration each row is
    under the FHIR base its job read (canonical spelling); two issuers' live jobs for one
    study become one; a study no job tied to a FHIR base keeps its issuer."""
    path = tmp_path / "v2.sqlite3"
    completed = SimulatedBackend().analyse("1.1", {}).to_json()
    with sqlite3.connect(path) as conn:
        conn.executescript(V2_SCHEMA)
        add_job = (
            "INSERT INTO jobs (tenant, study_uid, patient_id, model_id, model_version, "
            "fhir_server, study_resource, status, created_at, updated_at) "
            "VALUES (?, ?, 'p', ?, ?, ?, '{}', ?, 0, 0)"
        )
        ids = (MODEL.model_id, MODEL.version)
        conn.execute(add_job, ("https://iss-a", "1.1", *ids, "https://EHR.example/fhir/", "done"))
        conn.execute(add_job, ("https://iss-a", "1.2", *ids, "https://ehr.example/fhir", "queued"))
        conn.execute(add_job, ("https://iss-b", "1.2", *ids, "https://ehr.example/fhir", "queued"))
        conn.execute(add_job, ("https://iss-c", "1.3", *ids, None, "queued"))
        conn.execute(
            "INSERT INTO results VALUES ('https://iss-a', '1.1', ?, ?, 'p', 'completed', ?, 0, "
            "'DiagnosticReport/9')",
            (*ids, completed),
        )
        conn.execute(
            "INSERT INTO cards VALUES ('card-1', 'https://iss-a', '1.1', 'Pneumothorax', "
            "'present', ?, ?, 0)",
            ids,
        )
    store = open_sqlite_storage(path)
    stored = store.results.get_result(StudyRef("https://ehr.example/fhir", "1.1", "p"), MODEL)
    assert stored is not None and stored.filed_location == "DiagnosticReport/9"
    assert store.results.get_result(StudyRef("https://iss-a", "1.1", "p"), MODEL) is None
    record = store.cards.card_record("card-1")
    assert record is not None and record.source == "https://ehr.example/fhir"
    with sqlite3.connect(path) as conn:
        live = conn.execute(
            "SELECT source, study_uid FROM jobs WHERE status = 'queued' ORDER BY study_uid"
        ).fetchall()
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 4  # every step ran
    assert live == [("https://ehr.example/fhir", "1.2"), ("https://iss-c", "1.3")]
    assert store.jobs.job_state(StudyRef("https://ehr.example/fhir", "1.2"), MODEL) == "queued"
    open_sqlite_storage(path)  # opening it again changes nothing
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 3
        body = json.loads(conn.execute("SELECT body FROM results").fetchone()[0])
    assert body["study_uid"] == "1.1"
