"""Tests for the sandbox FHIR store and its search logic."""

from __future__ import annotations

import multiprocessing
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ehr_sandbox.fhir.search import parse_date_range, parse_search
from ehr_sandbox.fhir.store import (
    FhirStore,
    InvalidResourceError,
    MultipleMatchesError,
    SearchParameterError,
    VersionConflictError,
)

DCM = "http://dicom.nema.org/resources/ontology/DCM"
MRN = "urn:oid:1.2.36.146.595.217.0.1"


@pytest.fixture
def store(tmp_path: Path) -> FhirStore:
    return FhirStore(tmp_path / "fhir.db")


def study(
    rid: str,
    *,
    patient: str = "Patient/p1",
    started: str | None = "2024-05-03T10:15:00Z",
    modalities: tuple[str, ...] = ("CR",),
    status: str = "available",
    uid: str | None = None,
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": rid,
        "status": status,
        "subject": {"reference": patient},
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid or '1.2.' + rid}"}],
        "series": [
            {"uid": f"1.2.{rid}.{i}", "modality": {"system": DCM, "code": m}}
            for i, m in enumerate(modalities)
        ],
    }
    if started is not None:
        res["started"] = started
    return res


def ids(store: FhirStore, rtype: str, params: list[tuple[str, str]]) -> list[str]:
    return [r["id"] for r in store.search(rtype, params).resources]


# ------------------------------------------------------------------ create / read / update


def test_create_assigns_id_and_meta_without_mutating_input(store: FhirStore) -> None:
    original = {"resourceType": "Patient", "id": "ignored", "gender": "female", "active": None}
    created = store.create(original)
    assert created["id"] != "ignored" and len(created["id"]) >= 16
    assert created["meta"]["versionId"] == "1"
    assert created["meta"]["lastUpdated"].endswith("Z")
    assert "active" not in created  # nulls are dropped
    assert original == {
        "resourceType": "Patient",
        "id": "ignored",
        "gender": "female",
        "active": None,
    }
    assert store.read("Patient", created["id"]) == created
    assert store.read("Patient", "ignored") is None
    assert store.count("Patient") == 1
    second = store.create({"resourceType": "Patient"})
    assert second["id"] != created["id"]
    assert store.count("Patient") == 2


def test_key_order_and_meta_kept(store: FhirStore) -> None:
    created = store.create(
        {"gender": "male", "resourceType": "Patient", "meta": {"tag": [{"code": "demo"}]}}
    )
    assert list(created)[:3] == ["resourceType", "id", "meta"]
    assert created["meta"]["tag"] == [{"code": "demo"}]


def test_update_creates_then_bumps_version_and_keeps_history(store: FhirStore) -> None:
    first, created = store.update({"resourceType": "Patient", "id": "pat-1", "gender": "male"})
    assert created is True and first["meta"]["versionId"] == "1"
    second, created = store.update({"resourceType": "Patient", "id": "pat-1", "gender": "female"})
    assert created is False and second["meta"]["versionId"] == "2"
    assert store.read("Patient", "pat-1") == second
    v1 = store.vread("Patient", "pat-1", "1")
    assert v1 is not None and v1["gender"] == "male"
    assert store.vread("Patient", "pat-1", 3) is None
    assert store.vread("Patient", "pat-1", "x") is None
    assert [h.version_id for h in store.history("Patient", "pat-1")] == [2, 1]


def test_update_if_match(store: FhirStore) -> None:
    store.update({"resourceType": "Patient", "id": "p"})
    with pytest.raises(VersionConflictError):
        store.update({"resourceType": "Patient", "id": "p"}, if_match="2")
    updated, _ = store.update({"resourceType": "Patient", "id": "p"}, if_match="1")
    assert updated["meta"]["versionId"] == "2"
    with pytest.raises(VersionConflictError):
        store.update({"resourceType": "Patient", "id": "other"}, if_match="1")


def test_delete_keeps_history_and_recreate_continues_versions(store: FhirStore) -> None:
    store.update({"resourceType": "Patient", "id": "p"})
    assert store.delete("Patient", "p") is True
    assert store.delete("Patient", "p") is False
    assert store.read("Patient", "p") is None
    assert store.is_deleted("Patient", "p") and not store.is_deleted("Patient", "never")
    assert store.count("Patient") == 0
    assert ids(store, "Patient", []) == []
    again, created = store.update({"resourceType": "Patient", "id": "p"})
    assert created is True and again["meta"]["versionId"] == "3"
    assert not store.is_deleted("Patient", "p")


@pytest.mark.parametrize(
    "resource",
    [
        {"resourceType": "patient"},
        {"resourceType": "Pat1ent"},
        {"id": "x"},
        {"resourceType": "Patient", "meta": "nope"},
        {"resourceType": "Patient", "x": float("nan")},
        {"resourceType": "Patient", "x": object()},
        {"resourceType": "Binary", "data": "AAAA"},
    ],
)
def test_invalid_resources_rejected(store: FhirStore, resource: dict[str, Any]) -> None:
    with pytest.raises(InvalidResourceError):
        store.create(resource)


def test_update_requires_valid_id(store: FhirStore) -> None:
    with pytest.raises(InvalidResourceError):
        store.update({"resourceType": "Patient"})
    with pytest.raises(InvalidResourceError):
        store.update({"resourceType": "Patient", "id": "has space"})


def test_any_well_formed_type_is_stored(store: FhirStore) -> None:
    made = store.create({"resourceType": "Basic", "code": {"text": "x"}})
    assert store.read("Basic", made["id"]) == made


def test_store_shared_between_instances(tmp_path: Path) -> None:
    a = FhirStore(tmp_path / "db.sqlite")
    b = FhirStore(tmp_path / "db.sqlite")
    assert b.search("Patient", []).total == 0  # warm b's cache
    made = a.create({"resourceType": "Patient", "gender": "male"})
    assert [r["id"] for r in b.search("Patient", []).resources] == [made["id"]]
    b.update({**made, "gender": "female"})
    assert a.search("Patient", [("gender", "female")]).total == 1
    assert a.search("Patient", [("gender", "male")]).total == 0


def test_search_results_are_private_copies(store: FhirStore) -> None:
    store.update({"resourceType": "Patient", "id": "p", "name": [{"family": "Smith"}]})
    first = store.search("Patient", []).resources[0]
    first["name"][0]["family"] = "Changed"
    assert store.search("Patient", [("family", "Smith")]).total == 1


# ------------------------------------------------------------------ conditional create


def test_conditional_create_zero_one_many(store: FhirStore) -> None:
    pat = {"resourceType": "Patient", "identifier": [{"system": MRN, "value": "123"}]}
    made, created = store.conditional_create(pat, f"identifier={MRN}|123")
    assert created is True
    again, created = store.conditional_create(pat, f"identifier={MRN}|123")
    assert created is False and again == made
    # leading "?" or "Type?" prefixes are tolerated
    again, created = store.conditional_create(pat, f"Patient?identifier={MRN}|123")
    assert created is False and again["id"] == made["id"]
    store.create(pat)
    with pytest.raises(MultipleMatchesError):
        store.conditional_create(pat, f"identifier={MRN}|123")
    assert store.count("Patient") == 2


def test_conditional_create_other_params_and_bad_criteria(store: FhirStore) -> None:
    made, created = store.conditional_create(
        study("a"), "identifier=urn:oid:1.2.a&status=available"
    )
    assert created
    _, created = store.conditional_create(study("a"), "identifier=urn:oid:1.2.a")
    assert not created
    with pytest.raises(SearchParameterError):
        store.conditional_create(study("b"), "nonsense=1")
    with pytest.raises(SearchParameterError):
        store.conditional_create(study("b"), "")
    assert store.count("ImagingStudy") == 1


def test_conditional_create_is_atomic_across_threads(store: FhirStore) -> None:
    barrier = threading.Barrier(12)
    results: list[tuple[str, bool]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            res, created = store.conditional_create(
                {"resourceType": "Patient", "identifier": [{"system": MRN, "value": "race"}]},
                f"identifier={MRN}|race",
            )
            results.append((res["id"], created))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(created for _, created in results) == 1
    assert len({rid for rid, _ in results}) == 1
    assert store.count("Patient") == 1


def _child_conditional_create(path: str, store: FhirStore | None, n: int) -> None:
    target = store if store is not None else FhirStore(path)
    for _ in range(n):
        target.conditional_create(
            {"resourceType": "Patient", "identifier": [{"value": "proc"}]}, "identifier=proc"
        )
    target.create({"resourceType": "Observation", "status": "final"})


def test_conditional_create_across_processes(store: FhirStore) -> None:
    store.search("Patient", [])  # the parent holds an open connection before forking
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_child_conditional_create, args=(str(store.path), s, 5))
        for s in (store, None, store, None)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert store.count("Patient") == 1
    assert store.count("Observation") == 4
    assert store.search("Observation", []).total == 4


# ------------------------------------------------------------------ search


@pytest.fixture
def studies(store: FhirStore) -> FhirStore:
    store.update(study("s1", started="2024-05-03T10:15:00Z", modalities=("CR",)))
    store.update(study("s2", started="2024-05-20T08:00:00+02:00", modalities=("DX", "CR")))
    store.update(study("s3", started="2023-12-31T23:30:00-05:00", modalities=("DX",)))
    store.update(study("s4", patient="Patient/p2", started=None, modalities=("MR",)))
    store.update(
        study("s5", patient="https://ehr.example/fhir/Patient/p2", started="2024-06-01T00:00:00Z")
    )
    store.update(
        study(
            "s6", patient="Group/p1", status="registered", started="2024-02-10", modalities=("CT",)
        )
    )
    return store


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-05-03", ["s1"]),
        ("eq2024-05-03", ["s1"]),
        ("2024-05", ["s1", "s2"]),
        ("2024", ["s1", "s2", "s3", "s5", "s6"]),  # s3 is 2024-01-01T04:30Z
        ("2023", []),
        ("ne2024-05", ["s3", "s5", "s6"]),
        ("gt2024-05-03", ["s2", "s5"]),
        ("ge2024-05-03", ["s1", "s2", "s5"]),
        ("lt2024-05-03", ["s3", "s6"]),
        ("le2024-05-03", ["s1", "s3", "s6"]),
        ("sa2024-05-03", ["s2", "s5"]),
        ("eb2024-05-20", ["s1", "s3", "s6"]),
        ("2024-05-20T06:00:00Z", ["s2"]),  # timezone converted
        ("2024-05-20T08:00:00+02:00", ["s2"]),
        ("2024-05-20T08:00:00 02:00", ["s2"]),  # "+" decoded to a space in a URL
        ("ge2024-05-20T06:00", ["s2", "s5"]),
        ("2024-05-03,2024-06", ["s1", "s5"]),  # comma = OR
    ],
)
def test_started_date_prefixes(studies: FhirStore, value: str, expected: list[str]) -> None:
    assert sorted(ids(studies, "ImagingStudy", [("started", value)])) == expected


def test_date_params_and(studies: FhirStore) -> None:
    params = [("started", "ge2024-05-01"), ("started", "lt2024-06")]
    assert ids(studies, "ImagingStudy", params) == ["s1", "s2"]


def test_date_range_parsing() -> None:
    assert parse_date_range("2024") == (
        datetime(2024, 1, 1, tzinfo=UTC),
        datetime(2025, 1, 1, tzinfo=UTC),
    )
    assert parse_date_range("2024-12")[1] == datetime(2025, 1, 1, tzinfo=UTC)
    assert parse_date_range("2024-02")[1] == datetime(2024, 3, 1, tzinfo=UTC)
    low, high = parse_date_range("2024-05-03T10:15:00.5+01:00")
    assert low == datetime(2024, 5, 3, 9, 15, 0, 500000, tzinfo=UTC)
    assert (high - low).total_seconds() == pytest.approx(0.1)
    for bad in ("2024-13", "20240503", "2024-05-03T25:00:00Z", "yesterday"):
        with pytest.raises(ValueError):
            parse_date_range(bad)


@pytest.mark.parametrize("value", ["xx2024", "2024-5-3", "ge"])
def test_invalid_date_value_is_an_error(studies: FhirStore, value: str) -> None:
    with pytest.raises(SearchParameterError):
        studies.search("ImagingStudy", [("started", value)])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("CR", ["s1", "s2", "s5"]),
        ("MR,CT", ["s4", "s6"]),
        (f"{DCM}|DX", ["s2", "s3"]),
        (f"{DCM}|DX,{DCM}|MR", ["s2", "s3", "s4"]),
        ("http://other|CR", []),
        ("|CR", []),  # the codings have a system
        (f"{DCM}|", ["s1", "s2", "s3", "s4", "s5", "s6"]),
    ],
)
def test_modality_tokens(studies: FhirStore, value: str, expected: list[str]) -> None:
    assert sorted(ids(studies, "ImagingStudy", [("modality", value)])) == expected


def test_token_modifiers(studies: FhirStore) -> None:
    assert sorted(ids(studies, "ImagingStudy", [("modality:not", "CR")])) == ["s3", "s4", "s6"]
    assert ids(studies, "ImagingStudy", [("status", "registered")]) == ["s6"]
    assert ids(studies, "ImagingStudy", [("started:missing", "true")]) == ["s4"]
    assert len(ids(studies, "ImagingStudy", [("started:missing", "false")])) == 5


@pytest.mark.parametrize(
    ("param", "value", "expected"),
    [
        ("patient", "p1", ["s1", "s2", "s3"]),  # Group/p1 is not a patient
        ("patient", "Patient/p1", ["s1", "s2", "s3"]),
        ("patient", "http://localhost/fhir/Patient/p1", ["s1", "s2", "s3"]),
        ("patient", "p2", ["s4", "s5"]),  # absolute stored reference matches too
        ("patient", "Patient/p2/_history/3", ["s4", "s5"]),
        ("patient", "Group/p1", []),
        ("patient", "p1,p2", ["s1", "s2", "s3", "s4", "s5"]),
        ("subject", "p1", ["s1", "s2", "s3", "s6"]),  # bare id: any type
        ("subject", "Group/p1", ["s6"]),
        ("subject:Group", "p1", ["s6"]),
        ("subject:Patient", "p1", ["s1", "s2", "s3"]),
        ("subject", "https://ehr.example/fhir/Patient/p2", ["s4", "s5"]),
    ],
)
def test_reference_forms(studies: FhirStore, param: str, value: str, expected: list[str]) -> None:
    assert sorted(ids(studies, "ImagingStudy", [(param, value)])) == expected


def test_identifier_token_forms(studies: FhirStore) -> None:
    assert ids(studies, "ImagingStudy", [("identifier", "urn:dicom:uid|urn:oid:1.2.s3")]) == ["s3"]
    assert ids(studies, "ImagingStudy", [("identifier", "urn:oid:1.2.s3")]) == ["s3"]
    assert ids(studies, "ImagingStudy", [("identifier", "|urn:oid:1.2.s3")]) == []
    assert ids(studies, "ImagingStudy", [("identifier", "other|urn:oid:1.2.s3")]) == []


def test_identifier_without_system(store: FhirStore) -> None:
    store.update({"resourceType": "Patient", "id": "a", "identifier": [{"value": "42"}]})
    store.update(
        {"resourceType": "Patient", "id": "b", "identifier": [{"system": MRN, "value": "42"}]}
    )
    assert ids(store, "Patient", [("identifier", "|42")]) == ["a"]
    assert ids(store, "Patient", [("identifier", "42")]) == ["a", "b"]
    assert ids(store, "Patient", [("identifier", f"{MRN}|42")]) == ["b"]


def test_sort(studies: FhirStore) -> None:
    # missing values sort last in both directions; ties keep creation order
    assert ids(studies, "ImagingStudy", [("_sort", "-started")]) == [
        "s5",
        "s2",
        "s1",
        "s6",
        "s3",
        "s4",
    ]
    assert ids(studies, "ImagingStudy", [("_sort", "started")]) == [
        "s3",
        "s6",
        "s1",
        "s2",
        "s5",
        "s4",
    ]
    assert ids(studies, "ImagingStudy", [("_sort:desc", "started")])[0] == "s5"
    assert ids(studies, "ImagingStudy", [("_sort:asc", "started")])[0] == "s3"
    assert ids(studies, "ImagingStudy", [("_sort", "-_id")]) == ["s6", "s5", "s4", "s3", "s2", "s1"]
    by_status = ids(studies, "ImagingStudy", [("_sort", "-status,_id")])
    assert by_status == ["s6", "s1", "s2", "s3", "s4", "s5"]
    result = studies.search("ImagingStudy", [("_sort", "-started,bogus")])
    assert result.applied == [("_sort", "-started")]
    assert result.unknown == ["_sort=bogus"]


def test_paging_with_count_and_offset(studies: FhirStore) -> None:
    seen: list[str] = []
    offset = 0
    while True:
        result = studies.search("ImagingStudy", [("_count", "4"), ("_offset", str(offset))])
        assert result.total == 6
        seen += [r["id"] for r in result.resources]
        if not result.has_next:
            break
        offset += result.count
    assert seen == ["s1", "s2", "s3", "s4", "s5", "s6"]
    assert studies.search("ImagingStudy", [("_count", "1000")]).count == 200
    default = studies.search("ImagingStudy", [])
    assert default.count == 50 and not default.has_next
    with pytest.raises(SearchParameterError):
        studies.search("ImagingStudy", [("_count", "-1")])
    with pytest.raises(SearchParameterError):
        studies.search("ImagingStudy", [("_offset", "x")])


def test_summary_and_elements(studies: FhirStore) -> None:
    counted = studies.search("ImagingStudy", [("_summary", "count"), ("modality", "CR")])
    assert counted.total == 3 and counted.resources == [] and not counted.has_next
    zero = studies.search("ImagingStudy", [("_count", "0")])
    assert zero.total == 6 and zero.resources == []
    slim = studies.search("ImagingStudy", [("_elements", "status"), ("_id", "s1")]).resources
    assert set(slim[0]) == {"resourceType", "id", "meta", "status"}
    assert any(t["code"] == "SUBSETTED" for t in slim[0]["meta"]["tag"])
    with pytest.raises(SearchParameterError):
        studies.search("ImagingStudy", [("_summary", "maybe")])


def test_unknown_parameters_are_reported_not_applied(studies: FhirStore) -> None:
    result = studies.search(
        "ImagingStudy", [("bogus", "1"), ("status", "available"), ("status:below", "x"), ("x", "")]
    )
    assert result.total == 5
    assert result.unknown == ["bogus", "status:below"]
    assert result.applied == [("status", "available")]


def test_id_and_last_updated(studies: FhirStore) -> None:
    assert ids(studies, "ImagingStudy", [("_id", "s2,s4,nope")]) == ["s2", "s4"]
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert len(ids(studies, "ImagingStudy", [("_lastUpdated", f"ge{today}")])) >= 6 - 1
    assert ids(studies, "ImagingStudy", [("_lastUpdated", "lt2000")]) == []


def test_patient_params(store: FhirStore) -> None:
    store.update(
        {
            "resourceType": "Patient",
            "id": "a",
            "name": [{"family": "Müller", "given": ["Anna", "Maria"]}],
            "gender": "female",
            "birthDate": "1970-04-02",
            "identifier": [{"system": MRN, "value": "A1"}],
        }
    )
    store.update(
        {
            "resourceType": "Patient",
            "id": "b",
            "name": [{"text": "Bob Smith", "family": "Smith", "given": ["Bob"]}],
            "gender": "male",
            "birthDate": "1985",
        }
    )
    assert ids(store, "Patient", [("name", "ULLER")]) == ["a"]  # substring, accent-insensitive
    assert ids(store, "Patient", [("name", "b smi")]) == ["b"]  # matches text
    assert ids(store, "Patient", [("name", "ari")]) == ["a"]  # inside a given name
    assert ids(store, "Patient", [("family", "mul")]) == ["a"]
    assert ids(store, "Patient", [("family", "uller")]) == []  # family is starts-with
    assert ids(store, "Patient", [("family:contains", "uller")]) == ["a"]
    assert ids(store, "Patient", [("family:exact", "Müller")]) == ["a"]
    assert ids(store, "Patient", [("family:exact", "müller")]) == []
    assert ids(store, "Patient", [("given", "mar")]) == ["a"]
    assert ids(store, "Patient", [("gender", "male")]) == ["b"]
    assert ids(store, "Patient", [("birthdate", "1970")]) == ["a"]
    assert ids(store, "Patient", [("birthdate", "lt1980")]) == ["a"]
    assert ids(store, "Patient", [("birthdate", "1985-06-01")]) == []  # year-only is not inside
    assert ids(store, "Patient", [("birthdate", "ge1985-06-01")]) == ["b"]  # overlaps above
    assert ids(store, "Patient", [("identifier", f"{MRN}|A1")]) == ["a"]
    assert ids(store, "Patient", [("_sort", "family")]) == ["a", "b"]
    assert ids(store, "Patient", [("_sort", "-birthdate")]) == ["b", "a"]


@pytest.fixture
def reports(store: FhirStore) -> FhirStore:
    loinc = "http://loinc.org"
    for rid, issued, status, code, study_ref in [
        ("r1", "2024-05-03T12:00:00Z", "preliminary", "36643-5", "ServiceRequest/o1"),
        ("r2", "2024-05-04T12:00:00Z", "final", "36643-5", "ServiceRequest/o2"),
        ("r3", "2024-05-02T12:00:00Z", "final", "24627-2", "ServiceRequest/o1"),
    ]:
        store.update(
            {
                "resourceType": "DiagnosticReport",
                "id": rid,
                "status": status,
                "issued": issued,
                "effectiveDateTime": issued[:10],
                "code": {"coding": [{"system": loinc, "code": code}], "text": "Chest X-ray"},
                "category": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                                "code": "RAD",
                            }
                        ]
                    }
                ],
                "basedOn": [{"reference": study_ref}],
                "subject": {"reference": "Patient/p1"},
                "identifier": [{"system": "urn:ai", "value": rid}],
            }
        )
    return store


def test_diagnostic_report_params(reports: FhirStore) -> None:
    assert ids(reports, "DiagnosticReport", [("status", "final")]) == ["r2", "r3"]
    assert ids(reports, "DiagnosticReport", [("code", "http://loinc.org|24627-2")]) == ["r3"]
    assert ids(reports, "DiagnosticReport", [("code:text", "chest x")]) == ["r1", "r2", "r3"]
    assert ids(reports, "DiagnosticReport", [("category", "RAD")]) == ["r1", "r2", "r3"]
    assert ids(reports, "DiagnosticReport", [("based-on", "ServiceRequest/o1")]) == ["r1", "r3"]
    assert ids(reports, "DiagnosticReport", [("based-on", "o2")]) == ["r2"]
    assert ids(reports, "DiagnosticReport", [("identifier", "urn:ai|r2")]) == ["r2"]
    assert ids(reports, "DiagnosticReport", [("issued", "ge2024-05-03")]) == ["r1", "r2"]
    assert ids(reports, "DiagnosticReport", [("date", "2024-05-02")]) == ["r3"]
    assert ids(reports, "DiagnosticReport", [("patient", "p1"), ("status", "final")]) == [
        "r2",
        "r3",
    ]
    assert ids(reports, "DiagnosticReport", [("_sort", "-issued")]) == ["r2", "r1", "r3"]


def test_service_request_observation_condition_params(store: FhirStore) -> None:
    store.update(
        {
            "resourceType": "ServiceRequest",
            "id": "o1",
            "status": "active",
            "intent": "order",
            "code": {"coding": [{"system": "http://loinc.org", "code": "36643-5"}]},
            "subject": {"reference": "Patient/p1"},
            "identifier": [{"system": "urn:acc", "value": "ACC1"}],
        }
    )
    store.update(
        {
            "resourceType": "ServiceRequest",
            "id": "o2",
            "status": "completed",
            "intent": "plan",
            "subject": {"reference": "Patient/p2"},
        }
    )
    assert ids(store, "ServiceRequest", [("intent", "order")]) == ["o1"]
    assert ids(store, "ServiceRequest", [("status", "active,completed")]) == ["o1", "o2"]
    assert ids(store, "ServiceRequest", [("code", "36643-5")]) == ["o1"]
    assert ids(store, "ServiceRequest", [("identifier", "ACC1")]) == ["o1"]
    assert ids(store, "ServiceRequest", [("subject", "Patient/p2")]) == ["o2"]

    store.update(
        {
            "resourceType": "Observation",
            "id": "ob1",
            "status": "final",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "233604007"}]},
            "subject": {"reference": "Patient/p1"},
            "derivedFrom": [{"reference": "ImagingStudy/s1"}],
        }
    )
    assert ids(store, "Observation", [("derived-from", "ImagingStudy/s1")]) == ["ob1"]
    assert ids(store, "Observation", [("derived-from", "ImagingStudy/s2")]) == []
    assert ids(store, "Observation", [("code", "http://snomed.info/sct|233604007")]) == ["ob1"]
    assert ids(store, "Observation", [("patient", "p1")]) == ["ob1"]

    store.update({"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p9"}})
    assert ids(store, "Condition", [("patient", "Patient/p9")]) == ["c1"]
    store.update(
        {
            "resourceType": "Provenance",
            "id": "pv",
            "target": [{"reference": "DiagnosticReport/r1"}, {"reference": "Patient/p1"}],
            "recorded": "2024-05-03T12:00:00Z",
            "agent": [{"who": {"reference": "Device/ai"}}],
        }
    )
    assert ids(store, "Provenance", [("patient", "p1")]) == ["pv"]
    assert ids(store, "Provenance", [("target", "DiagnosticReport/r1")]) == ["pv"]
    store.update(
        {
            "resourceType": "Device",
            "id": "ai",
            "identifier": [{"system": "urn:dev", "value": "cxr"}],
            "patient": {"reference": "Patient/p1"},
        }
    )
    assert ids(store, "Device", [("identifier", "urn:dev|cxr"), ("patient", "p1")]) == ["ai"]
    store.update(
        {
            "resourceType": "Endpoint",
            "id": "ep",
            "status": "active",
            "identifier": [{"value": "wado"}],
            "connectionType": {"code": "dicom-wado-rs"},
            "payloadType": [{"text": "DICOM"}],
            "address": "http://x",
        }
    )
    assert ids(store, "Endpoint", [("identifier", "wado")]) == ["ep"]
    store.update(
        {
            "resourceType": "Media",
            "id": "m",
            "status": "completed",
            "subject": {"reference": "Patient/p1"},
            "content": {"contentType": "image/png"},
        }
    )
    assert ids(store, "Media", [("patient", "p1")]) == ["m"]


def test_parse_search_escaping_and_ignored_format_params() -> None:
    parsed = parse_search(
        "Patient", [("identifier", r"sys|a\,b"), ("_format", "json"), ("_pretty", "true")]
    )
    assert parsed.applied == [("identifier", r"sys|a\,b")]
    assert parsed.unknown == []
    assert parsed.matches({"identifier": [{"system": "sys", "value": "a,b"}]})
    assert not parsed.matches({"identifier": [{"system": "sys", "value": "a"}]})


def test_search_is_fast_for_100_resources(store: FhirStore) -> None:
    for i in range(100):
        store.update(
            study(
                f"x{i}",
                patient=f"Patient/p{i % 10}",
                started=f"2024-05-{i % 28 + 1:02d}T10:00:00Z",
                modalities=("CR",) if i % 2 else ("DX",),
            )
        )
    params = [
        ("patient", "p3"),
        ("modality", "CR,DX"),
        ("started", "ge2024-05"),
        ("_sort", "-started"),
    ]
    assert store.search("ImagingStudy", params).total == 10
    timings = []
    for _ in range(10):
        start = time.perf_counter()
        store.search("ImagingStudy", params)
        timings.append(time.perf_counter() - start)
    assert min(timings) < 0.005


ODD_VALUES: list[Any] = [
    "x",
    3,
    True,
    [],
    {},
    [None, 1],
    {"coding": "x"},
    {"type": "x", "value": 1},
]


def _nested(paths: list[str], leaf: Any, wrap_lists: bool) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path in paths:
        node = root
        *parents, last = path.split(".")
        for seg in parents:
            node = node.setdefault(seg, {})
        node[last] = [leaf, {"x": leaf}] if wrap_lists else leaf
    if wrap_lists:
        return {k: [v, "odd"] if isinstance(v, dict) else v for k, v in root.items()}
    return root


@pytest.mark.parametrize("rtype", ["Patient", "ImagingStudy", "DiagnosticReport", "Provenance"])
def test_odd_shapes_never_crash_search(store: FhirStore, rtype: str) -> None:
    from ehr_sandbox.fhir.search import search_params_for

    params = search_params_for(rtype)
    paths = [p for d in params.values() for p in d.paths if not p.startswith(("id", "meta"))]
    for odd in ODD_VALUES:
        store.create({"resourceType": rtype, **_nested(paths, odd, wrap_lists=False)})
        store.create({"resourceType": rtype, **_nested(paths, odd, wrap_lists=True)})
    store.create({"resourceType": rtype, "meta": {"tag": ["odd", {"code": "t"}]}})
    for name, definition in params.items():
        value = {"date": "ge2020", "reference": "Patient/1"}.get(definition.type, "x")
        for modifier in ("", ":missing"):
            query = [(name + modifier, "true" if modifier else value)]
            result = store.search(rtype, [*query, ("_sort", f"-{name}"), ("_elements", "id")])
            assert result.total >= 0
        assert store.search(rtype, [("_sort", name), ("_summary", "true")]).total == 17
