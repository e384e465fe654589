"""The viewer reads a study's film through its WADO-RS Endpoint (a real Orthanc PACS)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from cds_service.web.demo import register_viewer
from ehr_sandbox.seed import SEED_DIR, imaging_study_resource
from tests.conftest import SandboxHandle, free_port, make_service
from tests.imaging.orthanc import OrthancServer, start_orthanc
from tests.smart.conftest import SmartEnv
from tests.smart.test_launch import _image_drawn


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    server = start_orthanc(tmp_path_factory.mktemp("orthanc-smart"), free_port(), free_port())
    yield server
    server.stop()


@pytest.fixture(scope="module")
def wado_env(
    tmp_path_factory: pytest.TempPathFactory, sandbox: SandboxHandle, pacs: OrthancServer
) -> Iterator[SmartEnv]:
    """The service with the loopback Orthanc configured as an image server: an Endpoint off
    the EHR's own origin is followed only when it lies under one (CXR_CDS_IMAGE_SERVERS)."""
    service, server = make_service(
        tmp_path_factory.mktemp("wado-service"), sandbox, image_servers=(pacs.dicomweb,)
    )
    register_viewer(sandbox.sandbox, service.base)
    yield SmartEnv(sandbox=sandbox, service=service)
    server.stop()


def study_in_pacs(smart_env: SmartEnv, pacs: OrthancServer, study_id: str) -> None:
    """A frontal film uploaded to the PACS only, and the patient's ImagingStudy naming the
    PACS as its WADO-RS Endpoint (no Media/Binary in the EHR)."""
    dataset = pydicom.dcmread(SEED_DIR / "nih-cxr14-00000002_000-no-finding-dx.dcm")
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    pacs.upload(buffer.getvalue())
    study = imaging_study_resource(dataset, study_id, "cxr-demo-3", datetime.now(UTC))
    study["contained"] = [
        {
            "resourceType": "Endpoint",
            "id": "pacs",
            "status": "active",
            "connectionType": {
                "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                "code": "dicom-wado-rs",
            },
            "payloadType": [{"text": "DICOM"}],
            "address": pacs.dicomweb,
        }
    ]
    study["endpoint"] = [{"reference": "#pacs"}]
    smart_env.sandbox.sandbox.store.update(study)


def test_film_comes_from_the_studys_wado_rs_endpoint(
    wado_env: SmartEnv, pacs: OrthancServer, page: Any
) -> None:
    smart_env = wado_env
    study_in_pacs(smart_env, pacs, "cxr-wado-3")
    page.goto(smart_env.ehr_launch_url(study="cxr-wado-3", patient="cxr-demo-3"))
    page.wait_for_url("**/study/cxr-wado-3")
    assert _image_drawn(page)  # no Media/Binary exists for this study: WADO-RS it was
    assert page.locator("#ai-status").inner_text() == "not analysed yet"
    assert page.get_by_role("button", name="Request analysis").count() == 1


def test_an_ehr_that_only_launches_the_app_cannot_send_the_viewer_to_the_image_servers(
    wado_env: SmartEnv,
    pacs: OrthancServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """CXR_CDS_IMAGE_SERVERS are followed for CDS-client EHRs only: an EHR that merely
    launches the app (CXR_CDS_APP_FHIR_SERVERS, e.g. a public launcher anyone can write to)
    cannot point an Endpoint at the PACS and have the viewer show what it holds."""
    sandbox = wado_env.sandbox
    study_in_pacs(wado_env, pacs, "cxr-wado-app-only")
    launch = wado_env.ehr_launch_url(study="cxr-wado-app-only", patient="cxr-demo-3")
    as_cds_client = requests.get(launch, timeout=30)
    assert "/app/s/" in as_cds_client.url
    film = requests.get(as_cds_client.url + "/image.png", timeout=30)
    assert film.status_code == 200 and film.content.startswith(b"\x89PNG")
    service, server = make_service(
        tmp_path_factory.mktemp("wado-app-only"),
        sandbox,
        trusted_issuers=(),
        app_fhir_servers=(f"{sandbox.base}/",),
        image_servers=(pacs.dicomweb,),
    )
    registered = sandbox.sandbox.smart.app("cxr-cds-viewer")
    try:
        register_viewer(sandbox.sandbox, service.base)
        app_only = requests.get(launch, timeout=30)
        assert app_only.url.startswith(f"{service.base}/app/s/"), app_only.url
        refused = requests.get(app_only.url + "/image.png", timeout=30)
        assert refused.status_code == 502
        assert "no DICOM image for this study" in refused.text
        assert not refused.content.startswith(b"\x89PNG")
    finally:
        server.stop()
        if registered is not None:  # the module's other tests launch the wado service
            sandbox.sandbox.smart.register_app(registered)
