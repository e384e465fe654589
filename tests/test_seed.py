"""The sandbox seed: DICOM files become ImagingStudies with their UIDs; re-seeding is idempotent."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path

import pydicom

from cds_service.fhir import imaging_study
from ehr_sandbox.fhir.store import FhirStore
from ehr_sandbox.seed import SEED_DIR, STUDIES, seed


def test_seeded_studies_carry_the_dicom_uids(tmp_path: Path) -> None:
    store = FhirStore(tmp_path / "ehr.sqlite3")
    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    studies = seed(store, now=now)
    assert len(studies) == len(STUDIES)
    for item, study in zip(STUDIES, studies, strict=True):
        dataset = pydicom.dcmread(SEED_DIR / item.file, stop_before_pixels=True)
        assert imaging_study.study_uid(study) == dataset.StudyInstanceUID
        assert study["series"][0]["uid"] == dataset.SeriesInstanceUID
        assert study["series"][0]["instance"][0]["uid"] == dataset.SOPInstanceUID
        assert imaging_study.modalities(study) == {dataset.Modality}
        assert study["subject"]["reference"] == f"Patient/{item.patient_id}"
        assert (now - imaging_study.started(study)).days == item.days_ago  # type: ignore[operator]
        binary = store.read("Binary", f"dicom-{item.key}")
        assert binary is not None
        assert base64.b64decode(binary["data"]) == (SEED_DIR / item.file).read_bytes()


def test_reseeding_adds_no_binary_versions(tmp_path: Path) -> None:
    store = FhirStore(tmp_path / "ehr.sqlite3")
    seed(store)
    seed(store)
    assert store.count("Patient") == 3
    assert len(store.history("Binary", f"dicom-{STUDIES[0].key}")) == 1
