"""Seed the sandbox with invented patients and real chest radiographs (see seed/dicom/README.md)."""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom

from ehr_sandbox.fhir.store import FhirStore

log = logging.getLogger(__name__)

SEED_DIR = Path(__file__).parent / "seed" / "dicom"
MRN_SYSTEM = "urn:cxr-cds:sandbox:mrn"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"
BODY_SITES = {
    "CHEST": ("51185008", "Thoracic structure"),
    "THORAX": ("51185008", "Thoracic structure"),
}


@dataclass(frozen=True)
class SeedStudy:
    file: str
    patient_id: str
    days_ago: int
    key: str


PATIENTS = (
    {
        "id": "cxr-demo-1",
        "family": "Lindqvist",
        "given": "Ada",
        "gender": "female",
        "birthDate": "1951-03-14",
    },
    {
        "id": "cxr-demo-2",
        "family": "Okafor",
        "given": "Ben",
        "gender": "male",
        "birthDate": "1968-11-02",
    },
    {
        "id": "cxr-demo-3",
        "family": "Moreau",
        "given": "Cleo",
        "gender": "female",
        "birthDate": "1990-07-21",
    },
)
STUDIES = (
    SeedStudy("nih-cxr14-00000002_000-no-finding-dx.dcm", "cxr-demo-1", 2, "nih-00000002"),
    SeedStudy("siim-cr-jpeg-baseline-no-pneumothorax.dcm", "cxr-demo-1", 40, "siim-0001"),
    SeedStudy("nema-rg1-cr-chest-pa-j2k-lossy.dcm", "cxr-demo-2", 1, "nema-rg1"),
)


def patient_resource(spec: dict[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": spec["id"],
        "identifier": [{"system": MRN_SYSTEM, "value": spec["id"].upper()}],
        "name": [{"family": spec["family"], "given": [spec["given"]]}],
        "gender": spec["gender"],
        "birthDate": spec["birthDate"],
    }


def imaging_study_resource(
    dataset: pydicom.Dataset, study_id: str, patient_id: str, started: datetime
) -> dict[str, Any]:
    """An R4 ImagingStudy for one single-instance DICOM file (UIDs and codes from its tags)."""
    modality = str(dataset.get("Modality", "OT"))
    series: dict[str, Any] = {
        "uid": str(dataset.SeriesInstanceUID),
        "number": int(dataset.get("SeriesNumber") or 1),
        "modality": {"system": DCM, "code": modality},
        "numberOfInstances": 1,
        "instance": [
            {
                "uid": str(dataset.SOPInstanceUID),
                "sopClass": {
                    "system": "urn:ietf:rfc:3986",
                    "code": f"urn:oid:{dataset.SOPClassUID}",
                },
                "number": int(dataset.get("InstanceNumber") or 1),
            }
        ],
    }
    body_part = str(dataset.get("BodyPartExamined") or "").upper()
    if body_part in BODY_SITES:
        code, display = BODY_SITES[body_part]
        series["bodySite"] = {"system": SNOMED, "code": code, "display": display}
    description = " ".join(
        part
        for part in (modality, body_part or "CHEST", str(dataset.get("ViewPosition") or ""))
        if part
    )
    return {
        "resourceType": "ImagingStudy",
        "id": study_id,
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{dataset.StudyInstanceUID}"}],
        "status": "available",
        "modality": [{"system": DCM, "code": modality}],
        "subject": {"reference": f"Patient/{patient_id}"},
        "started": started.isoformat(timespec="seconds"),
        "numberOfSeries": 1,
        "numberOfInstances": 1,
        "description": f"XR {description}".strip(),
        "series": [series],
    }


def _put(store: FhirStore, resource: dict[str, Any]) -> None:
    """Write unless an identical resource is stored already (re-seeding adds no versions)."""
    existing = store.read(resource["resourceType"], resource["id"])
    if existing is not None and {k: v for k, v in existing.items() if k != "meta"} == resource:
        return
    store.update(resource)


def seed(store: FhirStore, now: datetime | None = None) -> list[dict[str, Any]]:
    """Write patients, DICOM Binaries, Media and ImagingStudies under fixed ids. Unchanged
    resources are not rewritten; ImagingStudy.started moves with `now`, so a study gets a new
    version when re-seeded on another day."""
    now = now or datetime.now(UTC)
    for spec in PATIENTS:
        _put(store, patient_resource(spec))
    studies = []
    for item in STUDIES:
        raw = (SEED_DIR / item.file).read_bytes()
        dataset = pydicom.dcmread(SEED_DIR / item.file, stop_before_pixels=True)
        binary_id = f"dicom-{item.key}"
        _put(
            store,
            {
                "resourceType": "Binary",
                "id": binary_id,
                "contentType": "application/dicom",
                "data": base64.b64encode(raw).decode("ascii"),
            },
        )
        study = imaging_study_resource(
            dataset, f"cxr-{item.key}", item.patient_id, now - timedelta(days=item.days_ago)
        )
        _put(store, study)
        _put(
            store,
            {
                "resourceType": "Media",
                "id": f"media-{item.key}",
                "status": "completed",
                "partOf": [{"reference": f"ImagingStudy/{study['id']}"}],
                "subject": {"reference": f"Patient/{item.patient_id}"},
                "content": {
                    "contentType": "application/dicom",
                    "url": f"Binary/{binary_id}",
                    "title": item.file,
                },
            },
        )
        studies.append(study)
    log.info("seeded %d patients and %d studies", len(PATIENTS), len(studies))
    return studies
