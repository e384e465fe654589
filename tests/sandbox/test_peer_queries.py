"""The queries the public CDS Hooks sandbox and the SMART launcher send to a FHIR server,
replayed against the sandbox's FHIR API (the peers themselves cannot run here: neither is
published on a registry this machine reaches). What each peer sends is taken from the
integration issue: the CDS Hooks sandbox reads /metadata, Patient, Patient/{id} and
Condition?patient={id} at start and fills prefetch with `POST [type]/_search` (form body)
before GET; the launcher proxies without Authorization, asks /metadata with no Accept header,
sorts with `_sort:asc` / `_sort:desc`, lists `Patient?_summary=true&_count=10` and rewrites
absolute URLs that start with the base it was given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flask
import pytest
from flask.testing import FlaskClient

from ehr_sandbox.fhir.store import FhirStore
from ehr_sandbox.seed import seed
from ehr_sandbox.web.fhir_api import create_fhir_blueprint

BASE = "http://localhost/fhir"
SMART_SECURITY = {
    "service": [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": "SMART-on-FHIR",
                }
            ]
        }
    ],
    "extension": [
        {
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": [
                {"url": "authorize", "valueUri": "http://localhost/auth/authorize"},
                {"url": "token", "valueUri": "http://localhost/auth/token"},
            ],
        }
    ],
}


@pytest.fixture
def seeded(tmp_path: Path) -> tuple[FlaskClient, list[dict[str, Any]]]:
    store = FhirStore(tmp_path / "fhir.db")
    studies = seed(store)
    app = flask.Flask(__name__)
    app.register_blueprint(
        create_fhir_blueprint(store, capability_security=SMART_SECURITY), url_prefix="/fhir"
    )
    return app.test_client(), studies


def urls_in(bundle: dict[str, Any]) -> list[str]:
    links = [link["url"] for link in bundle.get("link", [])]
    return links + [entry["fullUrl"] for entry in bundle.get("entry", []) if "fullUrl" in entry]


def test_metadata_is_json_without_accept_and_names_r4(
    seeded: tuple[FlaskClient, list[dict[str, Any]]],
) -> None:
    client, _ = seeded
    response = client.get("/fhir/metadata", headers={})  # the launcher sends no Accept
    assert response.status_code == 200
    cap = response.get_json(force=True)
    assert cap["fhirVersion"].startswith("4.")  # the CDS Hooks sandbox switches to R4 on 4.x
    oauth = cap["rest"][0]["security"]["extension"][0]
    assert oauth["url"].endswith("/oauth-uris")
    assert {e["url"] for e in oauth["extension"]} == {"authorize", "token"}


def test_cds_hooks_sandbox_start_up_reads(
    seeded: tuple[FlaskClient, list[dict[str, Any]]],
) -> None:
    client, _ = seeded
    patients = client.get("/fhir/Patient").get_json(force=True)
    assert patients["resourceType"] == "Bundle" and patients["entry"]
    patient_id = patients["entry"][0]["resource"]["id"]
    assert client.get(f"/fhir/Patient/{patient_id}").status_code == 200
    conditions = client.get(f"/fhir/Condition?patient={patient_id}")
    assert conditions.status_code == 200
    bundle = conditions.get_json(force=True)
    assert bundle["resourceType"] == "Bundle" and bundle["total"] == 0
    assert bundle.get("entry", []) == []


def test_prefetch_by_post_search_then_get_gives_the_same_studies(
    seeded: tuple[FlaskClient, list[dict[str, Any]]],
) -> None:
    client, studies = seeded
    patient = studies[0]["subject"]["reference"].split("/")[1]
    query = {"patient": patient, "modality": "CR,DX", "_sort": "-started", "_count": "10"}
    posted = client.post("/fhir/ImagingStudy/_search", data=query).get_json(force=True)
    got = client.get("/fhir/ImagingStudy", query_string=query).get_json(force=True)
    ids = [e["resource"]["id"] for e in posted["entry"]]
    assert ids and ids == [e["resource"]["id"] for e in got["entry"]]


@pytest.mark.parametrize("modifier,descending", [("asc", False), ("desc", True)])
def test_sort_modifiers_of_the_launcher(
    seeded: tuple[FlaskClient, list[dict[str, Any]]], modifier: str, descending: bool
) -> None:
    client, _ = seeded
    response = client.get(f"/fhir/ImagingStudy?_sort:{modifier}=started")
    assert response.status_code == 200
    started = [e["resource"]["started"] for e in response.get_json(force=True)["entry"]]
    assert len(started) > 1 and started == sorted(started, reverse=descending)


def test_patient_summary_page_and_absolute_urls(
    seeded: tuple[FlaskClient, list[dict[str, Any]]],
) -> None:
    client, _ = seeded
    bundle = client.get("/fhir/Patient?_summary=true&_count=10").get_json(force=True)
    assert bundle["entry"] and all(
        e["resource"]["meta"]["tag"][0]["code"] == "SUBSETTED" for e in bundle["entry"]
    )
    assert all(url.startswith(f"{BASE}/") for url in urls_in(bundle))
