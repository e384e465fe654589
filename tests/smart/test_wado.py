"""The viewer reads a study's film through its WADO-RS Endpoint (a real Orthanc PACS)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pydicom
import pytest
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


def test_film_comes_from_the_studys_wado_rs_endpoint(
    wado_env: SmartEnv, pacs: OrthancServer, page: Any
) -> None:
    smart_env = wado_env
    dataset = pydicom.dcmread(SEED_DIR / "nih-cxr14-00000002_000-no-finding-dx.dcm")
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    pacs.upload(buffer.getvalue())
    study = imaging_study_resource(dataset, "cxr-wado-3", "cxr-demo-3", datetime.now(UTC))
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
    page.goto(smart_env.ehr_launch_url(study="cxr-wado-3", patient="cxr-demo-3"))
    page.wait_for_url("**/study/cxr-wado-3")
    assert _image_drawn(page)  # no Media/Binary exists for this study: WADO-RS it was
    assert page.locator("#ai-status").inner_text() == "not analysed yet"
    assert page.get_by_role("button", name="Request analysis").count() == 1
