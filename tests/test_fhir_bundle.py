"""The write-back transaction Bundle: conditional creates, urn:uuid references, idempotence."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle

from cds_service.fhir_out import codes
from cds_service.fhir_out.bundle import transaction_bundle
from cds_service.fhir_out.resources import (
    AiReportResources,
    InvalidResource,
    check_resource,
    report_identifier,
)
from ehr_sandbox.fhir.search import parse_query_string
from ehr_sandbox.fhir.store import FhirStore
from tests.test_fhir_resources import DEVICE, MODEL, STUDY_UID, WEIGHTS, analysis, build


def references(node: Any) -> list[str]:
    if isinstance(node, list):
        return [ref for item in node for ref in references(item)]
    if isinstance(node, dict):
        found = [node["reference"]] if isinstance(node.get("reference"), str) else []
        return found + [ref for value in node.values() for ref in references(value)]
    return []


@pytest.fixture
def built() -> AiReportResources:
    return build()


def test_every_entry_is_a_conditional_post_with_a_urn_uuid(built: AiReportResources) -> None:
    bundle = transaction_bundle(built)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    assert len(bundle["entry"]) == len(built.all())
    for entry, original in zip(bundle["entry"], built.all(), strict=True):
        assert entry["fullUrl"] == f"urn:uuid:{original['id']}"
        rtype = original["resourceType"]
        assert entry["request"]["method"] == "POST"
        assert entry["request"]["url"] == rtype
        assert entry["request"]["ifNoneExist"]
        assert entry["resource"]["resourceType"] == rtype
        assert "id" not in entry["resource"]  # POST: the server assigns it


def test_if_none_exist_searches_the_business_identifiers(built: AiReportResources) -> None:
    bundle = transaction_bundle(built)
    searches = {e["fullUrl"]: e["request"]["ifNoneExist"] for e in bundle["entry"]}
    report_id = report_identifier(STUDY_UID, MODEL.model_id, WEIGHTS)["value"]
    report_url = f"urn:uuid:{built.diagnostic_report['id']}"
    assert searches[report_url] == f"identifier=urn:cxr-cds:diagnostic-report|{report_id}"
    device = built.device["identifier"][0]
    assert (
        searches[f"urn:uuid:{built.device['id']}"]
        == f"identifier={device['system']}|{device['value']}"
    )
    for observation in built.observations:
        ident = observation["identifier"][0]
        assert searches[f"urn:uuid:{observation['id']}"] == (
            f"identifier=urn:cxr-cds:observation|{ident['value']}"
        )
    # Provenance has no identifier in R4: its tag carries the report identifier value.
    provenance_url = f"urn:uuid:{built.provenance['id']}"
    assert searches[provenance_url] == f"_tag=urn:cxr-cds:provenance-of-report|{report_id}"


def test_internal_references_point_at_bundle_full_urls(built: AiReportResources) -> None:
    bundle = transaction_bundle(built)
    full_urls = {entry["fullUrl"] for entry in bundle["entry"]}
    found = references(bundle)
    internal = [ref for ref in found if ref.startswith("urn:uuid:")]
    external = sorted({ref for ref in found if not ref.startswith("urn:uuid:")})
    assert set(internal) <= full_urls
    assert external == ["ImagingStudy/cxr-1", "Patient/cxr-demo-1"]
    report = bundle["entry"][-2]["resource"]
    assert report["resourceType"] == "DiagnosticReport"
    assert [r["reference"] for r in report["result"]] == [
        f"urn:uuid:{o['id']}" for o in built.observations
    ]
    provenance = bundle["entry"][-1]["resource"]
    assert provenance["agent"][0]["who"]["reference"] == f"urn:uuid:{built.device['id']}"
    assert len(provenance["target"]) == 1 + len(built.observations)


def test_the_bundle_does_not_change_the_built_resources(built: AiReportResources) -> None:
    before = copy.deepcopy(built)
    transaction_bundle(built)
    assert built == before


def test_the_bundle_round_trips_through_the_r4b_model(built: AiReportResources) -> None:
    bundle = transaction_bundle(built)
    check_resource(bundle)
    parsed = Bundle.model_validate_json(json.dumps(bundle))
    assert parsed.model_dump(mode="json", exclude_none=True) == bundle


def test_the_bundle_is_deterministic() -> None:
    assert transaction_bundle(build()) == transaction_bundle(build())


def test_a_simulated_bundle_keeps_its_tags() -> None:
    bundle = transaction_bundle(build(device=dataclasses.replace(DEVICE, simulated=True)))
    for entry in bundle["entry"]:
        assert codes.SIMULATED_TAG in entry["resource"]["meta"]["tag"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b["entry"][0].pop("request"), r"entry\[0\].request: required"),
        (
            lambda b: b["entry"][1].update(fullUrl=b["entry"][0]["fullUrl"]),
            r"entry\[1\].fullUrl: .* is used twice",
        ),
        (lambda b: b["entry"].pop(0), "nor the fullUrl of an entry in the same Bundle"),
        (lambda b: b["entry"][0]["request"].update(method="CREATE"), "request.method"),
        (lambda b: b["entry"][-2]["resource"].update(status="final"), "claims a verified"),
        (lambda b: b.update(type="transactional"), "Bundle.type"),
    ],
)
def test_check_resource_rejects_broken_bundles(change: Any, message: str) -> None:
    bundle = transaction_bundle(build())
    change(bundle)
    with pytest.raises(InvalidResource, match=message):
        check_resource(bundle)


def apply_transaction(store: FhirStore, bundle: dict[str, Any]) -> list[bool]:
    """What a server does with our transaction (R4 http.html#trules), on the sandbox's store:
    conditional creates in order, urn:uuid references rewritten to the ids that result."""
    assigned: dict[str, str] = {}
    created = []
    for entry in bundle["entry"]:
        text = json.dumps(entry["resource"])
        for urn, reference in assigned.items():
            text = text.replace(f'"{urn}"', f'"{reference}"')
        resource = json.loads(text)
        assert "urn:uuid:" not in text, "entries must come after the entries they reference"
        stored, was_created = store.conditional_create(resource, entry["request"]["ifNoneExist"])
        assigned[entry["fullUrl"]] = f"{stored['resourceType']}/{stored['id']}"
        created.append(was_created)
    return created


def test_writing_the_same_analysis_twice_leaves_one_report(tmp_path: Path) -> None:
    store = FhirStore(tmp_path / "fhir.sqlite")
    try:
        first = apply_transaction(store, transaction_bundle(build()))
        second = apply_transaction(store, transaction_bundle(build()))
        assert all(first) and not any(second)
        assert store.count("DiagnosticReport") == 1
        assert store.count("Provenance") == 1
        assert store.count("Device") == 1
        assert store.count("Observation") == len(build().observations)
        # A new model version is a new report by the same kind of Device, not a replacement.
        newer_model = dataclasses.replace(MODEL, version="4e" * 32)
        newer = build(
            analysis(model=newer_model), device=dataclasses.replace(DEVICE, version="4e" * 32)
        )
        assert all(apply_transaction(store, transaction_bundle(newer)))
        assert store.count("DiagnosticReport") == 2 and store.count("Device") == 2
    finally:
        store.close()


def test_if_none_exist_queries_parse_as_single_criteria(built: AiReportResources) -> None:
    for entry in transaction_bundle(built)["entry"]:
        pairs = parse_query_string(entry["request"]["ifNoneExist"])
        assert len(pairs) == 1
        name, value = pairs[0]
        assert name in ("identifier", "_tag") and value.count("|") == 1
