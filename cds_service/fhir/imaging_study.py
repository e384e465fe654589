"""Read what the service needs from an R4 ImagingStudy: Study UID, start time, modalities."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

DICOM_UID_SYSTEM = "urn:dicom:uid"
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX"})
# Study statuses that mean there are no usable images (FHIR R4 ImagingStudy.status).
UNUSABLE_STATUSES = frozenset({"registered", "cancelled", "entered-in-error"})


def study_uid(study: dict[str, Any]) -> str | None:
    """The DICOM Study Instance UID from `identifier` {system urn:dicom:uid, value urn:oid:...}."""
    for identifier in study.get("identifier") or []:
        if not isinstance(identifier, dict):
            continue
        value = identifier.get("value")
        if identifier.get("system") == DICOM_UID_SYSTEM and isinstance(value, str):
            return value.removeprefix("urn:oid:")
    return None


def modalities(study: dict[str, Any]) -> set[str]:
    codes = set()
    for coding in study.get("modality") or []:
        if isinstance(coding, dict) and isinstance(coding.get("code"), str):
            codes.add(coding["code"])
    for series in study.get("series") or []:
        modality = series.get("modality") if isinstance(series, dict) else None
        if isinstance(modality, dict) and isinstance(modality.get("code"), str):
            codes.add(modality["code"])
    return codes


def started(study: dict[str, Any]) -> datetime | None:
    value = study.get("started")
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def subject_patient_id(study: dict[str, Any]) -> str | None:
    reference = (study.get("subject") or {}).get("reference")
    if not isinstance(reference, str) or "Patient/" not in reference:
        return None
    return reference.rsplit("Patient/", 1)[1].split("/", 1)[0] or None


def is_radiograph_candidate(study: dict[str, Any]) -> bool:
    """A study that may hold a chest radiograph: CR/DX (or unknown modality), usable status."""
    if study.get("status") in UNUSABLE_STATUSES:
        return False
    found = modalities(study)
    return not found or bool(found & RADIOGRAPH_MODALITIES)
