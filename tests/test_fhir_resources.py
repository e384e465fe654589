"""FHIR R4 output of an AI analysis: content, round trips through the R4B models, own checks."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from cds_service.fhir_out import codes
from cds_service.fhir_out.resources import (
    AiReportResources,
    DeviceInfo,
    InvalidResource,
    build_ai_report,
    check_resource,
    report_identifier,
)
from cds_service.findings.observations import Observation
from cds_service.results import AnalysisResult, Finding, ModelInfo

STUDY_UID = "1.2.826.0.1.3680043.8.498.10001"
WEIGHTS = "3f" * 32
ISSUED = datetime(2024, 3, 1, 9, 15, 0, tzinfo=UTC)
MODEL = ModelInfo(model_id="ECOFRI/CXR-LLAVA-v2", version=WEIGHTS)
DEVICE = DeviceInfo.for_model(
    MODEL,
    manufacturer="ECOFRI (model authors); served by cxr-cds",
    model_card_url="https://huggingface.co/ECOFRI/CXR-LLAVA-v2",
    licence_note="CC BY-NC 4.0 + Llama 2 licence; research use only, not for clinical decisions",
)
REPORT_TEXT = (
    "Large right apical pneumothorax. No pleural effusion. Possible left basilar opacity. "
    "A right internal jugular line is in place."
)
FINDINGS = (
    Finding(Observation.PNEUMOTHORAX, "present", "Large right apical pneumothorax.", 0.91),
    Finding(Observation.PLEURAL_EFFUSION, "absent", "No pleural effusion."),
    Finding(Observation.LUNG_OPACITY, "uncertain", "Possible left basilar opacity."),
    Finding(Observation.SUPPORT_DEVICES, "present", "A right internal jugular line is in place."),
)
UUID = "0b5e1a1c-7d2f-4e3a-9b1c-2d3e4f5a6b7c"
AIAST = {"system": codes.V3_OBSERVATION_VALUE, "code": "AIAST"}


def chest_study(instances: int = 1, **changes: Any) -> dict[str, Any]:
    study: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "id": "cxr-1",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"}],
        "status": "available",
        "subject": {"reference": "Patient/cxr-demo-1"},
        "started": "2024-03-01T08:30:00+01:00",
        "numberOfSeries": 1,
        "numberOfInstances": instances,
        "series": [
            {
                "uid": f"{STUDY_UID}.1",
                "modality": {
                    "system": "http://dicom.nema.org/resources/ontology/DCM",
                    "code": "DX",
                },
                "numberOfInstances": instances,
            }
        ],
    }
    study.update(changes)
    return {k: v for k, v in study.items() if v is not None}


def analysis(findings: tuple[Finding, ...] = FINDINGS, **changes: Any) -> AnalysisResult:
    values: dict[str, Any] = {
        "study_uid": STUDY_UID,
        "model": MODEL,
        "status": "completed",
        "report_text": REPORT_TEXT,
        "findings": findings,
        "study_started": "2024-03-01T08:30:00+01:00",
        "analysed_at": "2024-03-01T09:14:02+00:00",
    }
    values.update(changes)
    return AnalysisResult(**values)


def build(
    result: AnalysisResult | None = None,
    study: dict[str, Any] | None = None,
    device: DeviceInfo = DEVICE,
) -> AiReportResources:
    return build_ai_report(
        result or analysis(),
        study or chest_study(),
        device,
        fhir_study_reference="ImagingStudy/cxr-1",
        issued=ISSUED,
    )


def decoded_form(report: dict[str, Any]) -> str:
    return base64.b64decode(report["presentedForm"][0]["data"]).decode("utf-8")


def by_code(resources: AiReportResources) -> dict[str, dict[str, Any]]:
    return {o["code"]["text"]: o for o in resources.observations}


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("rtype", ["DiagnosticReport", "Observation", "Device", "Provenance"])
def test_round_trip_through_the_r4b_model(rtype: str) -> None:
    built = [r for r in build().all() if r["resourceType"] == rtype]
    assert built
    model = get_fhir_model_class(rtype)
    for resource in built:
        check_resource(resource)
        parsed = model.model_validate_json(json.dumps(resource))
        assert parsed.model_dump(mode="json", exclude_none=True) == resource


def test_round_trip_of_the_simulated_resources() -> None:
    for resource in build(device=dataclasses.replace(DEVICE, simulated=True)).all():
        model = get_fhir_model_class(resource["resourceType"])
        parsed = model.model_validate_json(json.dumps(resource))
        assert parsed.model_dump(mode="json", exclude_none=True) == resource


# -- content -------------------------------------------------------------------------------


def test_diagnostic_report_content() -> None:
    built = build()
    report = built.diagnostic_report
    assert report["status"] == "preliminary"
    assert report["category"] == [{"coding": [codes.RADIOLOGY_CATEGORY]}]
    assert report["category"][0]["coding"][0]["code"] == "RAD"
    assert report["code"]["coding"] == [
        {"system": "http://loinc.org", "code": "36554-4", "display": "XR Chest Single view"}
    ]
    assert report["subject"] == {"reference": "Patient/cxr-demo-1"}
    assert report["effectiveDateTime"] == "2024-03-01T08:30:00+01:00"
    assert report["issued"] == "2024-03-01T09:15:00Z"
    assert report["imagingStudy"] == [{"reference": "ImagingStudy/cxr-1"}]
    assert report["result"] == [{"reference": f"Observation/{o['id']}"} for o in built.observations]
    assert report["identifier"] == [report_identifier(STUDY_UID, MODEL.model_id, WEIGHTS)]
    assert AIAST.items() <= report["meta"]["security"][0].items()
    assert "tag" not in report["meta"]


def test_conclusion_lists_positive_findings_and_codes_only_those() -> None:
    report = build().diagnostic_report
    assert report["conclusion"] == (
        "AI model reports: pneumothorax. Possible (uncertain): lung opacity. "
        "AI-generated, preliminary, not reviewed."
    )
    assert "normal" not in report["conclusion"].lower()
    assert report["conclusionCode"] == [
        {
            "coding": [{"system": codes.SNOMED, "code": "36118008", "display": "Pneumothorax"}],
            "text": "Pneumothorax",
        }
    ]


def test_no_major_finding_never_says_normal() -> None:
    negative = (Finding(Observation.PNEUMOTHORAX, "absent", "No pneumothorax."),)
    report = build(
        analysis(negative, report_text="Heart size is normal. No pneumothorax.")
    ).diagnostic_report
    assert report["conclusion"] == (
        "No major finding detected by the model. AI-generated, preliminary, not reviewed."
    )
    assert "conclusionCode" not in report
    assert len(report["result"]) == 1


def test_a_result_without_findings_has_no_result_element() -> None:
    report = build(analysis(())).diagnostic_report
    assert "result" not in report and "conclusionCode" not in report


def test_two_instances_make_a_two_view_report() -> None:
    report = build(study=chest_study(instances=2)).diagnostic_report
    assert report["code"]["coding"][0]["code"] == "36643-5"
    assert report["code"]["text"] == "XR Chest 2 Views"


def test_instance_count_from_series_lists_when_counts_are_missing() -> None:
    study = chest_study(numberOfInstances=None)
    study["series"][0].pop("numberOfInstances")
    study["series"][0]["instance"] = [{"uid": f"{STUDY_UID}.1.{n}"} for n in (1, 2)]
    assert build(study=study).diagnostic_report["code"]["coding"][0]["code"] == "36643-5"


def test_presented_form_is_the_full_report_as_utf8_text() -> None:
    form = build().diagnostic_report["presentedForm"][0]
    assert form["contentType"] == "text/plain;charset=utf-8"
    assert form["language"] == "en"
    assert form["title"]
    text = decoded_form(build().diagnostic_report)
    assert REPORT_TEXT in text
    assert MODEL.model_id in text and WEIGHTS in text and STUDY_UID in text
    assert form["size"] == len(text.encode("utf-8"))


def test_effective_falls_back_and_is_omitted_when_unknown() -> None:
    no_start = chest_study(started=None)
    built = build(study=no_start)
    assert built.diagnostic_report["effectiveDateTime"] == "2024-03-01T08:30:00+01:00"
    unknown = build(analysis(study_started=None), study=no_start)
    assert "effectiveDateTime" not in unknown.diagnostic_report
    assert all("effectiveDateTime" not in o for o in unknown.observations)
    partial = build(study=chest_study(started="2024-03-01"))
    assert partial.diagnostic_report["effectiveDateTime"] == "2024-03-01"


def test_one_observation_per_mentioned_major_finding() -> None:
    built = build()
    observations = by_code(built)
    # Support Devices is not a major finding: no Observation for it.
    assert list(observations) == ["Pneumothorax", "Pleural effusion", "Lung opacity"]
    device_ref = {"reference": f"Device/{built.device['id']}"}
    for observation in built.observations:
        assert observation["status"] == "preliminary"
        assert observation["category"] == [{"coding": [codes.IMAGING_CATEGORY]}]
        assert observation["subject"] == {"reference": "Patient/cxr-demo-1"}
        assert observation["effectiveDateTime"] == "2024-03-01T08:30:00+01:00"
        assert observation["device"] == device_ref
        assert observation["derivedFrom"] == [{"reference": "ImagingStudy/cxr-1"}]
        assert AIAST.items() <= observation["meta"]["security"][0].items()
    values = {
        name: o["valueCodeableConcept"]["coding"][0]["code"] for name, o in observations.items()
    }
    assert values == {
        "Pneumothorax": "52101004",
        "Pleural effusion": "2667000",
        "Lung opacity": "82334004",
    }
    assert observations["Pneumothorax"]["code"]["coding"][0] == {
        "system": codes.SNOMED,
        "code": "36118008",
        "display": "Pneumothorax",
    }
    assert observations["Lung opacity"]["code"] == {"text": "Lung opacity"}
    [note] = observations["Pleural effusion"]["note"]
    assert note["text"].startswith("AI-generated, preliminary, not reviewed (")
    assert note["text"].endswith('Model report: "No pleural effusion."')


def test_confidence_uses_the_ai_transparency_extension_only_when_given() -> None:
    observations = by_code(build())
    assert observations["Pneumothorax"]["extension"] == [
        {
            "url": "http://hl7.org/fhir/uv/aitransparency/StructureDefinition/AIconfidence",
            "valueDecimal": 0.91,
        }
    ]
    assert "extension" not in observations["Pleural effusion"]


def test_confidence_outside_zero_to_one_is_refused() -> None:
    wild = (Finding(Observation.EDEMA, "present", "Edema.", 1.5),)
    with pytest.raises(ValueError, match="probability"):
        build(analysis(wild))


def test_a_finding_named_twice_keeps_the_positive() -> None:
    twice = (
        Finding(Observation.PNEUMOTHORAX, "absent", "No pneumothorax on the left."),
        Finding(Observation.PNEUMOTHORAX, "present", "Small right pneumothorax."),
    )
    built = build(analysis(twice))
    assert len(built.observations) == 1
    assert built.observations[0]["valueCodeableConcept"]["text"] == "Present"


def test_device_content() -> None:
    device = build().device
    assert device["status"] == "active"
    assert device["deviceName"] == [{"name": "ECOFRI/CXR-LLAVA-v2", "type": "model-name"}]
    assert device["version"][0]["value"] == WEIGHTS
    assert device["manufacturer"] == DEVICE.manufacturer
    assert device["type"]["text"] == "AI chest radiograph report generator"
    notes = [n["text"] for n in device["note"]]
    assert any(DEVICE.model_card_url in n for n in notes)
    assert any(DEVICE.licence_note in n for n in notes)
    assert device["identifier"] == [DEVICE.identifier()]
    assert "meta" not in device


def test_provenance_content() -> None:
    built = build()
    provenance = built.provenance
    assert provenance["target"] == [
        {"reference": f"DiagnosticReport/{built.diagnostic_report['id']}"},
        *({"reference": f"Observation/{o['id']}"} for o in built.observations),
    ]
    assert provenance["recorded"] == "2024-03-01T09:15:00Z"
    assert provenance["occurredDateTime"] == "2024-03-01T09:14:02Z"
    assert provenance["agent"] == [
        {
            "type": {"coding": [codes.AUTHOR]},
            "who": {"reference": f"Device/{built.device['id']}"},
        }
    ]
    assert codes.AUTHOR["code"] == "author"
    assert provenance["entity"] == [{"role": "source", "what": {"reference": "ImagingStudy/cxr-1"}}]


# -- identity ------------------------------------------------------------------------------


def test_building_twice_gives_identical_resources() -> None:
    first, second = build(), build()
    assert first == second
    assert json.dumps(first.all(), sort_keys=True) == json.dumps(second.all(), sort_keys=True)


def test_identifiers_follow_study_model_and_version() -> None:
    base = report_identifier(STUDY_UID, MODEL.model_id, WEIGHTS)
    assert base == report_identifier(STUDY_UID, MODEL.model_id, WEIGHTS)
    assert base["system"] == "urn:cxr-cds:diagnostic-report"
    assert base != report_identifier(STUDY_UID, MODEL.model_id, "4e" * 32)
    assert base != report_identifier(f"{STUDY_UID}.2", MODEL.model_id, WEIGHTS)
    assert base != report_identifier(STUDY_UID, "google/medgemma-4b-it", WEIGHTS)

    other_model = ModelInfo(MODEL.model_id, "4e" * 32)
    other = build(
        analysis(model=other_model), device=dataclasses.replace(DEVICE, version="4e" * 32)
    )
    current = build()
    assert other.diagnostic_report["identifier"] != current.diagnostic_report["identifier"]
    assert other.diagnostic_report["id"] != current.diagnostic_report["id"]
    assert other.device["identifier"] != current.device["identifier"]
    assert {o["identifier"][0]["value"] for o in other.observations}.isdisjoint(
        o["identifier"][0]["value"] for o in current.observations
    )


# -- SIMULATED -----------------------------------------------------------------------------


def _texts(resource: dict[str, Any]) -> list[str]:
    texts = [n["text"] for n in resource.get("note", [])]
    if resource["resourceType"] == "DiagnosticReport":
        texts += [
            resource["conclusion"],
            resource["presentedForm"][0]["title"],
            decoded_form(resource),
        ]
    return texts


@pytest.mark.parametrize("where", ["device", "model"])
def test_simulated_output_is_tagged_and_says_so_everywhere(where: str) -> None:
    if where == "device":
        built = build(device=dataclasses.replace(DEVICE, simulated=True))
    else:  # the result's model says simulated even if the DeviceInfo forgot to
        built = build(analysis(model=dataclasses.replace(MODEL, simulated=True)))
    for resource in built.all():
        assert codes.SIMULATED_TAG in resource["meta"]["tag"], resource["resourceType"]
        for text in _texts(resource):
            assert text.startswith("SIMULATED"), (resource["resourceType"], text)
    assert len(_texts(built.diagnostic_report)) == 3
    assert len(_texts(built.device)) >= 3


def test_real_output_carries_no_simulated_tag() -> None:
    for resource in build().all():
        assert codes.SIMULATED_TAG not in resource.get("meta", {}).get("tag", [])


# -- refused inputs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("result", "study", "reference", "issued", "message"),
    [
        (analysis(status="failed", reason="not a chest"), None, None, None, "completed"),
        (analysis(model=ModelInfo("other/model", WEIGHTS)), None, None, None, "Device describes"),
        (None, chest_study(subject={"reference": "Group/g1"}), None, None, "subject Patient"),
        (
            None,
            chest_study(identifier=[{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}]),
            None,
            None,
            "Study UID",
        ),
        (analysis(study_uid="1.2.03"), None, None, None, "DICOM UID"),
        (None, None, "Patient/cxr-1", None, "ImagingStudy/<id>"),
        (None, None, "ImagingStudy/other", None, "not this study"),
        (None, None, None, datetime(2024, 3, 1, 9, 15), "time zone"),
    ],
)
def test_inputs_that_cannot_make_a_truthful_report_are_refused(
    result: AnalysisResult | None,
    study: dict[str, Any] | None,
    reference: str | None,
    issued: datetime | None,
    message: str,
) -> None:
    with pytest.raises(ValueError, match=message):
        build_ai_report(
            result or analysis(),
            study or chest_study(),
            DEVICE,
            fhir_study_reference=reference or "ImagingStudy/cxr-1",
            issued=issued or ISSUED,
        )


def test_issued_keeps_a_non_utc_offset() -> None:
    issued = ISSUED.astimezone(timezone(timedelta(hours=2)))
    report = build_ai_report(
        analysis(), chest_study(), DEVICE, fhir_study_reference="ImagingStudy/cxr-1", issued=issued
    ).diagnostic_report
    assert report["issued"] == "2024-03-01T11:15:00+02:00"


def test_device_info_is_valid_once_constructed() -> None:
    with pytest.raises(ValueError, match="version"):
        dataclasses.replace(DEVICE, version=" ")
    with pytest.raises(ValueError, match="model_card_url"):
        dataclasses.replace(DEVICE, model_card_url="huggingface.co/ECOFRI")


# -- check_resource: negative cases --------------------------------------------------------


def _broken(change: Any, which: str = "diagnostic_report") -> dict[str, Any]:
    built = build()
    resource = copy.deepcopy(
        built.observations[0] if which == "observation" else getattr(built, which)
    )
    change(resource)
    return resource


def put(key: str, value: Any) -> Any:
    return lambda resource: resource.update({key: value})


def add_uid(value: str) -> Any:
    return lambda r: r["identifier"].append({"system": "urn:dicom:uid", "value": value})


DR, OBS = "diagnostic_report", "observation"
REJECTED = [
    pytest.param(DR, put("status", "final"), "status: 'final' claims a verified", id="final"),
    pytest.param(DR, put("status", "amended"), "status: 'amended'", id="amended"),
    pytest.param(DR, put("status", "done"), "'done' is not an R4 code", id="unknown-status"),
    pytest.param(OBS, put("status", "final"), "Observation.status: 'final'", id="obs-final"),
    pytest.param("device", put("status", "retired"), "Device.status: 'retired'", id="device"),
    pytest.param(DR, put("conclusionCode", []), "conclusionCode: empty list", id="empty-array"),
    pytest.param(DR, put("conclusion", ""), "conclusion: empty str", id="empty-string"),
    pytest.param(DR, put("meta", {}), "DiagnosticReport.meta: empty dict", id="empty-object"),
    pytest.param(
        DR, lambda r: r["subject"].update(display=None), "subject.display: null", id="null"
    ),
    pytest.param(
        DR,
        put("result", [{"reference": "Patient/cxr-demo-1"}]),
        r"result\[0\].reference: 'Patient/cxr-demo-1' is a Patient; allowed: Observation",
        id="result-type",
    ),
    pytest.param(
        DR,
        put("imagingStudy", [{"reference": "Media/m1"}]),
        r"imagingStudy\[0\].reference: 'Media/m1' is a Media",
        id="imaging-study-type",
    ),
    pytest.param(
        OBS, put("device", {"reference": "DeviceMetric/x"}), "device.reference", id="device-type"
    ),
    pytest.param(
        OBS,
        put("derivedFrom", [{"reference": "DocumentReference/d"}]),
        r"derivedFrom\[0\].reference",
        id="derived-from-type",
    ),
    pytest.param(
        "provenance",
        lambda r: r["agent"][0].update(who={"reference": "Practitioner/p"}),
        r"Provenance.agent\[0\].who.reference: 'Practitioner/p' is a Practitioner",
        id="agent-type",
    ),
    pytest.param(
        DR,
        put("result", [{"reference": f"urn:uuid:{UUID}"}]),
        "nor the fullUrl of an entry in the same Bundle",
        id="unresolved-urn",
    ),
    pytest.param(
        DR,
        put("result", [{"reference": f"urn:uuid:{UUID.upper()}"}]),
        "not a lower-case RFC 4122 urn:uuid",
        id="upper-case-uuid",
    ),
    pytest.param(DR, add_uid("urn:oid:1.2.840.01"), "not a well-formed urn:oid", id="oid-zero"),
    pytest.param(DR, add_uid("urn:oid:1.2.x"), "not a well-formed urn:oid", id="oid-letter"),
    pytest.param(DR, add_uid("urn:oid:1.2." + "3" * 70), "at most 64", id="oid-too-long"),
    pytest.param(DR, add_uid("1.2.3"), "needs urn:oid", id="dicom-uid-without-urn"),
    pytest.param(
        DR,
        lambda r: r["meta"].update(security=[{"system": "urn:x", "code": "y"}]),
        "AIAST",
        id="no-aiast",
    ),
    pytest.param(
        DR, put("conclusion", "Normal chest radiograph."), "never says 'normal'", id="normal"
    ),
    pytest.param(
        DR,
        lambda r: r["meta"].update(tag=[codes.SIMULATED_TAG]),
        "must start with 'SIMULATED'",
        id="simulated-without-prefix",
    ),
    pytest.param(
        DR,
        put("study", [{"reference": "ImagingStudy/cxr-1"}]),
        "not valid R4 structure: study: Extra inputs",
        id="r5-element",
    ),
    pytest.param(DR, put("issued", "2024-03-01"), "not valid R4 structure: issued", id="instant"),
    pytest.param(
        "device",
        lambda r: r["deviceName"][0].update(type="model"),
        r"deviceName\[0\].type: 'model'",
        id="device-name-type",
    ),
    pytest.param(
        "provenance",
        lambda r: r["entity"][0].update(role="input"),
        r"entity\[0\].role: 'input'",
        id="entity-role",
    ),
]


@pytest.mark.parametrize(("which", "change", "message"), REJECTED)
def test_check_resource_rejects(which: str, change: Any, message: str) -> None:
    with pytest.raises(InvalidResource, match=message):
        check_resource(_broken(change, which))


def test_check_resource_rejects_non_resources() -> None:
    with pytest.raises(InvalidResource, match="resourceType"):
        check_resource({"status": "preliminary"})
    for not_a_resource in ("Unicorn", "Coding"):
        with pytest.raises(InvalidResource, match="not an R4 resource type"):
            check_resource({"resourceType": not_a_resource})


def test_invalid_resource_is_a_service_error_with_a_code() -> None:
    error = InvalidResource("x")
    assert error.status == 500 and error.code == "invalid-resource"
