"""A new chest film arriving in the sandbox EHR, as a modality and the RIS would file it: the
DICOM as a Binary, an ImagingStudy and its Media, in one FHIR transaction posted to the
running sandbox (so its Subscriptions announce it). `cxr-cds sandbox-film` runs this."""

from __future__ import annotations

import base64
import io
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import requests

from ehr_sandbox.access_tokens import TokenStore
from ehr_sandbox.seed import SEED_DIR, imaging_study_resource

DEFAULT_FILM = SEED_DIR / "siim-cr-jpeg-baseline-no-pneumothorax.dcm"
FILM_SCOPE = "system/Binary.c system/ImagingStudy.c system/Media.c"


def film_resources(
    dicom: Path, patient: str, now: datetime | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The DICOM Binary, and a transaction of the ImagingStudy with its Media (the caller
    points content.url at the created Binary), under a fresh Study Instance UID: a copy of a
    seed file is a new study, not the seeded one again."""
    dataset = pydicom.dcmread(dicom)
    dataset.StudyInstanceUID = f"2.25.{uuid.uuid4().int}"
    dataset.SeriesInstanceUID = f"2.25.{uuid.uuid4().int}"
    dataset.SOPInstanceUID = f"2.25.{uuid.uuid4().int}"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    binary = {
        "resourceType": "Binary",
        "contentType": "application/dicom",
        "data": base64.b64encode(buffer.getvalue()).decode("ascii"),
    }
    study = imaging_study_resource(dataset, "new", patient, now or datetime.now(UTC))
    study.pop("id")
    study_url = f"urn:uuid:{uuid.uuid4()}"
    media = {
        "resourceType": "Media",
        "status": "completed",
        "partOf": [{"reference": study_url}],
        "subject": {"reference": f"Patient/{patient}"},
        "content": {"contentType": "application/dicom", "url": "", "title": dicom.name},
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": url, "resource": resource,
             "request": {"method": "POST", "url": resource["resourceType"]}}
            for url, resource in ((study_url, study), (f"urn:uuid:{uuid.uuid4()}", media))
        ],
    }  # fmt: skip
    return binary, bundle


def _post(url: str, token: str, body: dict[str, Any]) -> dict[str, Any]:
    response = requests.post(
        url,
        json=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"},
        timeout=30,
    )
    if response.status_code not in (200, 201):
        raise RuntimeError(f"the sandbox answered {response.status_code}: {response.text[:300]}")
    answer: dict[str, Any] = response.json()
    return answer


def add_film(sandbox_url: str, sandbox_dir: Path, patient: str, dicom: Path) -> str:
    """Post the film to the running sandbox (the Binary first, then the ImagingStudy with its
    Media in one transaction, so the study is announced with its image in place); returns
    the new ImagingStudy reference."""
    token = TokenStore(sandbox_dir / "ehr.sqlite3").issue("sandbox-film", FILM_SCOPE).token
    fhir = f"{sandbox_url.rstrip('/')}/fhir"
    binary, bundle = film_resources(dicom, patient)
    created = _post(f"{fhir}/Binary", token, binary)
    media = bundle["entry"][1]["resource"]
    media["content"]["url"] = f"Binary/{created['id']}"
    answer = _post(fhir, token, bundle)
    for entry in answer.get("entry", []):
        location = str(entry.get("response", {}).get("location", ""))
        if "ImagingStudy/" in location:
            return "ImagingStudy/" + location.split("ImagingStudy/")[1].split("/")[0]
    raise RuntimeError("the sandbox created no ImagingStudy")
