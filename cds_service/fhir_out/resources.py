"""One AI analysis as FHIR R4 resources: DiagnosticReport, Observations, Device and Provenance."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cds_service.fhir import imaging_study
from cds_service.fhir_out import codes
from cds_service.fhir_out.checks import InvalidResource, check_resource
from cds_service.fhir_out.device import DeviceInfo, build_device, build_provenance, resource_id
from cds_service.fhir_out.report import (
    ReportContext,
    build_diagnostic_report,
    build_observation,
    fhir_date_time,
    fhir_instant,
    major_findings,
)
from cds_service.results import AnalysisResult, Finding

__all__ = [
    "AiReportResources",
    "DeviceInfo",
    "InvalidResource",
    "build_ai_report",
    "check_resource",
    "observation_identifier",
    "report_identifier",
]

_UID = re.compile(r"^[0-2](?:\.(?:0|[1-9][0-9]*))+$")
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_STUDY_REFERENCE = re.compile(r"^(?:https?://[^\s?#]+/)?ImagingStudy/(?P<id>[A-Za-z0-9\-.]{1,64})$")


@dataclass(frozen=True)
class AiReportResources:
    """The resources of one report; they reference each other as `Type/id`."""

    diagnostic_report: dict[str, Any]
    observations: list[dict[str, Any]]
    device: dict[str, Any]
    provenance: dict[str, Any]

    def all(self) -> list[dict[str, Any]]:
        """Every resource, referenced ones first: Device, Observations, report, Provenance."""
        return [self.device, *self.observations, self.diagnostic_report, self.provenance]


def report_identifier(study_uid: str, model_id: str, model_version: str) -> dict[str, str]:
    """The report's business identifier: stable for (Study UID, model id, model version), so a
    repeated analysis is the same report (conditional create on it writes it only once)."""
    for name, value in (
        ("study_uid", study_uid),
        ("model_id", model_id),
        ("model_version", model_version),
    ):
        if not value or "\x1f" in value:
            raise ValueError(f"report_identifier: {name} must be a non-empty string: {value!r}")
    seed = "\x1f".join(("diagnostic-report", study_uid, model_id, model_version))
    return {
        "system": codes.REPORT_IDENTIFIER_SYSTEM,
        "value": str(uuid.uuid5(codes.NAMESPACE, seed)),
    }


def observation_identifier(report: dict[str, str], finding: Finding) -> dict[str, str]:
    """One finding of one report: derived from the report identifier and the observation."""
    seed = "\x1f".join(("observation", report["system"], report["value"], finding.key.value))
    return {
        "system": codes.OBSERVATION_IDENTIFIER_SYSTEM,
        "value": str(uuid.uuid5(codes.NAMESPACE, seed)),
    }


def build_ai_report(
    result: AnalysisResult,
    study: dict[str, Any],
    device: DeviceInfo,
    *,
    fhir_study_reference: str,
    issued: datetime,
) -> AiReportResources:
    """The R4 resources for a completed analysis; every one passes check_resource.

    Raises ValueError when the inputs cannot make a truthful report (analysis not completed,
    device and result naming different models, study without a patient, UIDs that disagree)."""
    if result.status != "completed":
        raise ValueError(f"only a completed analysis becomes a report (status {result.status!r})")
    if (result.model.model_id, result.model.version) != (device.model_id, device.version):
        raise ValueError(
            f"the result is from {result.model.model_id} {result.model.version} but the Device "
            f"describes {device.model_id} {device.version}"
        )
    study_uid = _study_uid(result, study)
    study_reference = _study_reference(fhir_study_reference, study)
    simulated = device.simulated or result.model.simulated
    device_resource = build_device(device, simulated=simulated)
    ctx = ReportContext(
        subject_reference=_subject_reference(study),
        study_reference=study_reference,
        device_reference=f"Device/{device_resource['id']}",
        study_uid=study_uid,
        model_label=f"{device.model_id}, version {device.version}",
        issued=fhir_instant(issued),
        effective=fhir_date_time(_raw_started(study) or result.study_started),
        simulated=simulated,
    )
    identifier = report_identifier(study_uid, device.model_id, device.version)
    findings = major_findings(result)
    observations = []
    for finding in findings:
        obs_identifier = observation_identifier(identifier, finding)
        observations.append(
            build_observation(
                ctx, finding, resource_id=resource_id(obs_identifier), identifier=obs_identifier
            )
        )
    report = build_diagnostic_report(
        ctx,
        result,
        study,
        findings,
        [o["id"] for o in observations],
        resource_id=resource_id(identifier),
        identifier=identifier,
    )
    provenance = build_provenance(
        target_references=[
            f"DiagnosticReport/{report['id']}",
            *(f"Observation/{o['id']}" for o in observations),
        ],
        device_reference=ctx.device_reference,
        study_reference=study_reference,
        report_identifier_value=identifier["value"],
        recorded=ctx.issued,
        occurred=fhir_date_time(result.analysed_at),
        simulated=simulated,
    )
    resources = AiReportResources(report, observations, device_resource, provenance)
    for resource in resources.all():
        check_resource(resource)
    return resources


def _raw_started(study: dict[str, Any]) -> str | None:
    started = study.get("started")
    return started if isinstance(started, str) and started else None


def _study_uid(result: AnalysisResult, study: dict[str, Any]) -> str:
    uid = result.study_uid
    if not _UID.match(uid) or len(uid) > 64:
        raise ValueError(f"Study Instance UID {uid!r} is not a DICOM UID (digits and dots, <= 64)")
    in_study = imaging_study.study_uid(study)
    if in_study is not None and in_study != uid:
        raise ValueError(f"the ImagingStudy has Study UID {in_study!r}, the result {uid!r}")
    return uid


def _subject_reference(study: dict[str, Any]) -> str:
    patient = imaging_study.subject_patient_id(study)
    if patient is None or not _ID.match(patient):
        raise ValueError("the ImagingStudy has no subject Patient reference to file the report to")
    return f"Patient/{patient}"


def _study_reference(reference: str, study: dict[str, Any]) -> str:
    match = _STUDY_REFERENCE.match(reference)
    if match is None:
        raise ValueError(f"fhir_study_reference must be ImagingStudy/<id>, not {reference!r}")
    known = study.get("id")
    if isinstance(known, str) and known and known != match["id"]:
        raise ValueError(f"fhir_study_reference {reference!r} is not this study (id {known!r})")
    return reference
