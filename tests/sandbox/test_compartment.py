"""Which resources a patient-scoped token may reach (ehr_sandbox.auth.compartment)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ehr_sandbox.auth.compartment import PatientCompartment, referenced_patients
from ehr_sandbox.fhir.store import FhirStore


@pytest.fixture
def store(tmp_path: Path) -> FhirStore:
    return FhirStore(tmp_path / "fhir.sqlite3")


def media(media_id: str, patient: str | None, binary: str) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Media",
        "id": media_id,
        "status": "completed",
        "content": {"contentType": "application/dicom", "url": f"Binary/{binary}"},
    }
    if patient:
        resource["subject"] = {"reference": f"Patient/{patient}"}
    return resource


def test_references_are_found_at_any_depth_and_in_every_form() -> None:
    resource = {
        "resourceType": "Observation",
        "subject": {"reference": "Patient/a"},
        "performer": [{"reference": "http://ehr.example/fhir/Patient/b/_history/3"}],
        "contained": [{"resourceType": "Provenance", "target": [{"reference": "Patient/c"}]}],
        "focus": [{"reference": "ImagingStudy/Patient-d"}, {"reference": "NotPatient/e"}],
    }
    assert referenced_patients(resource) == {"a", "b", "c"}


def test_deeply_nested_resources_do_not_exhaust_the_stack() -> None:
    node: dict[str, Any] = {"reference": "Patient/deep"}
    for _ in range(50_000):
        node = {"extension": [node]}
    assert referenced_patients(node) == {"deep"}


def test_patient_owned_and_shared_types(store: FhirStore) -> None:
    mine = PatientCompartment(store, "p1")
    assert mine.contains({"resourceType": "Patient", "id": "p1"})
    assert not mine.contains({"resourceType": "Patient", "id": "p2"})
    study = {"resourceType": "ImagingStudy", "subject": {"reference": "Patient/p1"}}
    assert mine.contains(study)
    assert not mine.contains({**study, "subject": {"reference": "Patient/p2"}})
    assert not mine.contains({**study, "referrer": {"reference": "Patient/p2"}})
    # A study about nobody is nobody's; an unknown type is treated the same way.
    assert not mine.contains({"resourceType": "ImagingStudy", "status": "available"})
    assert not mine.contains({"resourceType": "Basic", "code": {"text": "note"}})
    # Shared resources that name no patient: the AI model's Device, Endpoints, Provenance.
    for shared in ("Device", "Endpoint", "Practitioner", "Provenance", "Organization"):
        assert mine.contains({"resourceType": shared}), shared
    assert not mine.contains({"resourceType": "Device", "patient": {"reference": "Patient/p2"}})


def test_a_binary_is_the_patients_only_when_everything_pointing_at_it_is(
    store: FhirStore,
) -> None:
    for binary in ("b1", "b2", "orphan", "shared", "anonymous"):
        store.update({"resourceType": "Binary", "id": binary, "contentType": "text/plain"})
    store.update(media("m1", "p1", "b1"))
    store.update(media("m2", "p2", "b2"))
    store.update(media("m3", "p1", "shared"))
    store.update(media("m4", "p2", "shared"))
    store.update(media("m5", None, "anonymous"))
    store.update(
        {
            "resourceType": "DocumentReference",
            "id": "d1",
            "status": "current",
            "subject": {"reference": "Patient/p1"},
            "content": [{"attachment": {"url": "http://ehr.example/fhir/Binary/b2"}}],
        }
    )
    mine = PatientCompartment(store, "p1")

    def visible(binary: str) -> bool:
        stored = store.read("Binary", binary)
        assert stored is not None
        return mine.contains(stored)

    assert visible("b1")
    assert not visible("orphan")  # nothing ties it to a patient
    assert not visible("shared")  # two patients' Media point at it
    assert not visible("anonymous")  # its Media names no patient
    assert not visible("b2")  # p2's Media and p1's DocumentReference both claim it
    assert PatientCompartment(store, "p2").contains({"resourceType": "Binary", "id": "m"}) is False
    secured = {
        "resourceType": "Binary",
        "id": "new",
        "securityContext": {"reference": "Patient/p1"},
    }
    assert mine.contains(secured)
    assert not PatientCompartment(store, "p2").contains(secured)


def test_search_filter_applies_before_paging_and_totals(store: FhirStore) -> None:
    for n in range(6):
        store.update(
            {
                "resourceType": "ImagingStudy",
                "id": f"s{n}",
                "status": "available",
                "subject": {"reference": f"Patient/p{n % 2}"},
            }
        )
    keep = PatientCompartment(store, "p0").contains
    first = store.search("ImagingStudy", [("_count", "2")], keep=keep)
    assert first.total == 3 and [r["id"] for r in first.resources] == ["s0", "s2"]
    second = store.search("ImagingStudy", [("_count", "2"), ("_offset", "2")], keep=keep)
    assert [r["id"] for r in second.resources] == ["s4"] and not second.has_next
