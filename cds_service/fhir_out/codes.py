"""Code systems, codes and identifier systems used by the FHIR R4 output (one place to verify)."""

from __future__ import annotations

import uuid
from typing import Any

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
V3_OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
V3_DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
PROVENANCE_PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DICOM_UID = "urn:dicom:uid"

# HL7 AI Transparency on FHIR IG (R4, STU1 ballot; canonical http://hl7.org/fhir/uv/aitransparency).
AI_IG = "http://hl7.org/fhir/uv/aitransparency"
AI_CONFIDENCE_URL = f"{AI_IG}/StructureDefinition/AIconfidence"  # valueDecimal: probability 0-1
AI_DEVICE_TYPE_SYSTEM = f"{AI_IG}/CodeSystem/AIdeviceTypeCS"

# Identifier and tag systems owned by this service (informal URNs: stable, never dereferenced).
REPORT_IDENTIFIER_SYSTEM = "urn:cxr-cds:diagnostic-report"
OBSERVATION_IDENTIFIER_SYSTEM = "urn:cxr-cds:observation"
DEVICE_IDENTIFIER_SYSTEM = "urn:cxr-cds:device"
TAG_SYSTEM = "urn:cxr-cds:tag"
# Provenance has no identifier in R4: a tag whose code is the report identifier value makes
# its conditional create possible (`_tag=...`, a search parameter every R4 resource has).
PROVENANCE_OF_REPORT_TAG_SYSTEM = "urn:cxr-cds:provenance-of-report"

# Namespace of every uuid5 this module derives (identifier values and resource ids).
NAMESPACE = uuid.UUID("4d0f2c71-8a39-5b8e-9c1e-6f7a2b3c4d5e")


def coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


# Security label from the IG: v3-ObservationValue AIAST. THO 6.x gives the display as
# "Artificial Intelligence asserted" (the IG's ValueSet expansion); older texts use lower case.
AIAST = coding(V3_OBSERVATION_VALUE, "AIAST", "Artificial Intelligence asserted")
SIMULATED_TAG = coding(TAG_SYSTEM, "SIMULATED", "Simulated output: no AI model ran")
RADIOLOGY_CATEGORY = coding(V2_0074, "RAD", "Radiology")
IMAGING_CATEGORY = coding(OBSERVATION_CATEGORY, "imaging", "Imaging")
DATA_OPERATION_CREATE = coding(V3_DATA_OPERATION, "CREATE", "create")
AUTHOR = coding(PROVENANCE_PARTICIPANT_TYPE, "author", "Author")
AI_DEVICE_TYPE = coding(
    AI_DEVICE_TYPE_SYSTEM, "Artificial-Intelligence", "All kinds of Artificial Intelligence"
)

# LOINC radiology codes by view count (LOINC long common names as we know them; see REPORT doubts).
XR_CHEST_SINGLE_VIEW = coding(LOINC, "36554-4", "XR Chest Single view")
XR_CHEST_2_VIEWS = coding(LOINC, "36643-5", "XR Chest 2 Views")

# Observation.valueCodeableConcept: SNOMED CT qualifier values (IPS and mCODE use the first two
# for present/absent findings). "uncertain" (hedged report wording) maps to Indeterminate.
PRESENCE: dict[str, tuple[dict[str, Any], str]] = {
    "present": (coding(SNOMED, "52101004", "Present"), "Present"),
    "absent": (coding(SNOMED, "2667000", "Absent"), "Absent"),
    "uncertain": (coding(SNOMED, "82334004", "Indeterminate"), "Uncertain"),
}
