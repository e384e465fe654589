"""End to end: the sandbox's ImagingStudy -> its Endpoint -> Orthanc WADO-RS -> selection and
decode -> ImagePipelineBackend(SimulatedReportWriter) through the real job worker."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from cds_service.config import EhrClient
from cds_service.fhir import imaging_study
from cds_service.fhir.backend_services import BackendServicesClients
from cds_service.imaging.decode import read_dataset
from cds_service.imaging.errors import ImageFetchError, NoAccess
from cds_service.imaging.files import read_image_file
from cds_service.imaging.retrieval import ImageFetcher, fetch_wado_instance, fetch_wado_metadata
from cds_service.imaging.selection import select_dataset
from cds_service.imaging.study import StudyImages, study_images_for
from cds_service.inference.pipeline import ImagePipelineBackend
from cds_service.inference.simulated import SimulatedReportWriter
from cds_service.jobs.worker import drain
from cds_service.storage.ports import StudyRef
from cds_service.storage.sqlite import open_sqlite_storage
from ehr_sandbox.app import Sandbox, SandboxSettings
from ehr_sandbox.app import create_app as create_sandbox_app
from ehr_sandbox.cds_client import SigningKey
from ehr_sandbox.seed import imaging_study_resource, seed
from tests.conftest import ServerThread, free_port
from tests.imaging.conftest import seed_file
from tests.imaging.orthanc import OrthancServer

READ_SCOPE = "system/ImagingStudy.rs system/Endpoint.rs system/Media.rs system/Binary.rs"
CLIENT_ID = "cxr-cds-imaging-test"
DOG = "dog-lateral-thorax-dx.dcm"


@dataclass
class Ehr:
    fhir: str
    sandbox: Sandbox
    studies: dict[str, dict[str, Any]]
    client: EhrClient


@pytest.fixture(scope="module")
def ehr(tmp_path_factory: pytest.TempPathFactory, orthanc: OrthancServer) -> Iterator[Ehr]:
    workdir = tmp_path_factory.mktemp("imaging-ehr")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    box = Sandbox.open(SandboxSettings(data_dir=workdir, base_url=base))
    seeded = {s["id"]: s for s in seed(box.store)}
    box.store.update(
        {
            "resourceType": "Endpoint",
            "id": "orthanc-wado",
            "status": "active",
            "connectionType": {
                "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                "code": "dicom-wado-rs",
            },
            "payloadType": [{"text": "DICOM"}],
            "payloadMimeType": ["application/dicom"],
            "address": orthanc.dicomweb,
        }
    )
    studies: dict[str, dict[str, Any]] = {}
    for study_id, study in seeded.items():
        study = {**study, "endpoint": [{"reference": "Endpoint/orthanc-wado"}]}
        box.store.update(study)
        studies[study_id] = study
    dog = pydicom.dcmread(seed_file(DOG), stop_before_pixels=True)
    lateral = imaging_study_resource(dog, "cxr-dog-lateral", "cxr-demo-3", _now())
    lateral["endpoint"] = [{"reference": "Endpoint/orthanc-wado"}]
    box.store.update(lateral)
    studies[lateral["id"]] = lateral
    for name in (
        "nih-cxr14-00000002_000-no-finding-dx.dcm",
        "nema-rg1-cr-chest-pa-j2k-lossy.dcm",
        DOG,
    ):
        orthanc.upload(seed_file(name).read_bytes())
    key = SigningKey.load_or_create(workdir / "backend.jwk.json")
    box.backend.register(CLIENT_ID, key.public_jwks(), READ_SCOPE)
    client = EhrClient(
        fhir_base=f"{base}/fhir",
        token_url=f"{base}/auth/token",
        client_id=CLIENT_ID,
        key_file=workdir / "backend.jwk.json",
        scope=READ_SCOPE,
        image_servers=(orthanc.dicomweb,),  # the EHR's PACS: on another origin (port)
    )
    server = ServerThread(create_sandbox_app(sandbox=box), port)
    yield Ehr(f"{base}/fhir", box, studies, client)
    server.stop()


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def _images(ehr: Ehr, *extra_image_servers: str) -> StudyImages:
    client = replace(ehr.client, image_servers=(*ehr.client.image_servers, *extra_image_servers))
    return study_images_for(BackendServicesClients((client,)))


def _analyse(ehr: Ehr, tmp_path: Path, study: dict[str, Any]) -> Any:
    backend = ImagePipelineBackend(SimulatedReportWriter(), _images(ehr))
    store = open_sqlite_storage(tmp_path / "jobs.sqlite3")
    uid = imaging_study.study_uid(study)
    assert uid
    ref = StudyRef(ehr.fhir, uid, imaging_study.subject_patient_id(study))
    store.jobs.enqueue(ref, backend.model, study, ehr.fhir)
    assert drain(store, backend) == 1
    stored = store.results.get_result(ref, backend.model)
    assert stored is not None
    return stored.result


def test_study_in_orthanc_is_analysed_through_wado_rs(ehr: Ehr, tmp_path: Path) -> None:
    result = _analyse(ehr, tmp_path, ehr.studies["cxr-nema-rg1"])
    assert result.status == "completed", result.reason
    assert result.report_text.startswith("SIMULATED OUTPUT")
    assert "inverted (MONOCHROME1)" in result.extra["image_notes"]
    assert result.extra["transfer_syntax"] == "1.2.840.10008.1.2.4.91"


def test_pixels_through_wado_rs_equal_the_local_file(ehr: Ehr) -> None:
    study = ehr.studies["cxr-nih-00000002"]
    fetched = _images(ehr).load(study, ehr.fhir)
    local = read_image_file(seed_file("nih-cxr14-00000002_000-no-finding-dx.dcm"))
    assert np.array_equal(fetched.pixels, local.pixels)


def test_lateral_only_study_is_not_analysed(ehr: Ehr, tmp_path: Path) -> None:
    result = _analyse(ehr, tmp_path, ehr.studies["cxr-dog-lateral"])
    assert result.status == "not-analysed"
    assert result.reason == "lateral view"
    assert not result.findings and not result.report_text


def test_endpoint_of_a_study_not_reread_from_a_registered_ehr_is_not_followed(
    ehr: Ehr, tmp_path: Path
) -> None:
    # Same study, but from a FHIR server we hold no registration for: its Endpoint (and
    # any address in it) is not trusted, so nothing is fetched. That is no fact about the
    # study: the analysis waits for access, named with the setting to add, and is never
    # stored as a false "no image found".
    images = study_images_for(BackendServicesClients(()))
    backend = ImagePipelineBackend(SimulatedReportWriter(), images)
    with pytest.raises(NoAccess) as raised:
        backend.analyse_from("1.2.3", ehr.studies["cxr-nema-rg1"], "http://elsewhere/fhir")
    assert "no access to http://elsewhere/fhir" in raised.value.description
    assert "CXR_CDS_EHR_CLIENTS" in raised.value.description


def test_study_without_endpoint_is_read_from_its_dicom_media(ehr: Ehr, tmp_path: Path) -> None:
    """The seeded Media (partOf the ImagingStudy, content -> Binary application/dicom)."""
    study = {k: v for k, v in ehr.studies["cxr-siim-0001"].items() if k != "endpoint"}
    ehr.sandbox.store.update(study)
    try:
        fetched = _images(ehr).load(study, ehr.fhir)
    finally:
        ehr.sandbox.store.update(ehr.studies["cxr-siim-0001"])
    local = read_image_file(seed_file("siim-cr-jpeg-baseline-no-pneumothorax.dcm"))
    assert np.array_equal(fetched.pixels, local.pixels)


def test_series_endpoint_overrides_the_study_endpoint(ehr: Ehr) -> None:
    dead_address = f"http://127.0.0.1:{free_port()}/dicom-web"
    dead = {
        "resourceType": "Endpoint",
        "id": "dead-wado",
        "status": "active",
        "connectionType": {"code": "dicom-wado-rs"},
        "payloadType": [{"text": "DICOM"}],
        "address": dead_address,
    }
    ehr.sandbox.store.update(dead)
    original = ehr.studies["cxr-nih-00000002"]
    study = {**original, "endpoint": [{"reference": "Endpoint/dead-wado"}]}
    study["series"] = [
        {**original["series"][0], "endpoint": [{"reference": "Endpoint/orthanc-wado"}]}
    ]
    ehr.sandbox.store.update(study)
    try:
        fetched = _images(ehr, dead_address).load(study, ehr.fhir)
        assert fetched.pixels.shape == (1024, 1024)
        # and without the series override, the dead study endpoint is a retryable failure
        ehr.sandbox.store.update({**study, "series": original["series"]})
        with pytest.raises(ImageFetchError, match="unreachable"):
            _images(ehr, dead_address).load({**study, "series": original["series"]}, ehr.fhir)
    finally:
        ehr.sandbox.store.update(original)


def test_orthanc_metadata_gives_the_same_selection_as_the_file(
    ehr: Ehr, orthanc: OrthancServer
) -> None:
    """The header read alone through WADO-RS metadata (which decides what is downloaded)
    agrees with the downloaded file's, for a frontal and a lateral film."""
    for study_id in ("cxr-nema-rg1", "cxr-dog-lateral"):
        study = ehr.studies[study_id]
        series = study["series"][0]
        where = (
            orthanc.dicomweb,
            imaging_study.study_uid(study) or "",
            series["uid"],
            series["instance"][0]["uid"],
        )
        header = fetch_wado_metadata(ImageFetcher(), *where)
        full = read_dataset(fetch_wado_instance(ImageFetcher(), *where))
        assert "PixelData" not in header or not header.PixelData
        assert select_dataset(header) == select_dataset(full)
