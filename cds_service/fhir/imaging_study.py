"""Read what the service needs from an R4 ImagingStudy: Study UID, start, modality, body part."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from cds_service.fhir.shapes import as_dict, as_str, codings, concept_texts, dicts

DICOM_UID_SYSTEM = "urn:dicom:uid"
SNOMED = "http://snomed.info/sct"
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX"})
# Study statuses that mean there are no usable images (FHIR R4 ImagingStudy.status).
UNUSABLE_STATUSES = frozenset({"registered", "cancelled", "entered-in-error"})
# SNOMED CT body structures for the chest: thoracic structure, chest, entire thorax,
# thoracic cavity structure (verify before relying on them).
CHEST_BODY_SITES = frozenset({"51185008", "43799004", "302551006", "816094009"})
# DICOM BodyPartExamined defined terms that EHRs copy into bodySite codes or text.
CHEST_WORDS = re.compile(r"\b(chest|thorax|cxr|lungs?|pulmonary)\b", re.IGNORECASE)
NOT_CHEST_WORDS = re.compile(r"\b(spine|rib|ribs|sternum|shoulder|abdomen|abd)\b", re.IGNORECASE)


def study_uid(study: dict[str, Any]) -> str | None:
    """The DICOM Study Instance UID from `identifier` {system urn:dicom:uid, value urn:oid:...}."""
    for identifier in dicts(study.get("identifier")):
        value = as_str(identifier.get("value"))
        if identifier.get("system") == DICOM_UID_SYSTEM and value:
            return value.removeprefix("urn:oid:")
    return None


def modalities(study: dict[str, Any]) -> set[str]:
    codes = {c["code"] for c in dicts(study.get("modality")) if as_str(c.get("code"))}
    for series in dicts(study.get("series")):
        code = as_str(as_dict(series.get("modality")).get("code"))
        if code:
            codes.add(code)
    return codes


def started(study: dict[str, Any]) -> datetime | None:
    value = as_str(study.get("started"))
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def subject_patient_id(study: dict[str, Any]) -> str | None:
    reference = as_str(as_dict(study.get("subject")).get("reference"))
    if reference is None or "Patient/" not in reference:
        return None
    return reference.rsplit("Patient/", 1)[1].split("/", 1)[0] or None


def _text_says_chest(text: str) -> bool | None:
    if NOT_CHEST_WORDS.search(text):
        return False
    return True if CHEST_WORDS.search(text) else None


def is_chest(study: dict[str, Any]) -> bool | None:
    """True when the study says it is of the chest, False when it names another body part,
    None when it says nothing (the DICOM tags decide later, in the imaging layer)."""
    verdicts: list[bool] = []
    for series in dicts(study.get("series")):
        for coding in codings(series.get("bodySite")):
            if coding.get("system") == SNOMED and coding.get("code") in CHEST_BODY_SITES:
                verdicts.append(True)
                continue
            text = " ".join(str(coding.get(k, "")) for k in ("code", "display"))
            verdicts.append(bool(_text_says_chest(text)))
    if verdicts:
        return any(verdicts)
    texts = [t for t in (as_str(study.get("description")),) if t]
    for concept in dicts(study.get("procedureCode")):
        texts += concept_texts(concept)
    for text in texts:
        verdict = _text_says_chest(text)
        if verdict is not None:
            return verdict
    return None


def is_radiograph_candidate(study: dict[str, Any]) -> bool:
    """May hold a chest radiograph: CR/DX (or unknown modality), usable, not another body part."""
    if study.get("status") in UNUSABLE_STATUSES:
        return False
    found = modalities(study)
    if found and not found & RADIOGRAPH_MODALITIES:
        return False
    return is_chest(study) is not False
