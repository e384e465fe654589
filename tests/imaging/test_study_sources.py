"""StudyImages.load driven as the worker and the viewer drive it, against a stub FHIR server
and stub WADO-RS servers on loopback: which instances count, which Endpoints are followed,
and where a token goes."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar

import pydicom
import pytest
from pydicom.uid import generate_uid

from cds_service.imaging.errors import ImageFetchError, NotAnalysable
from cds_service.imaging.retrieval import ImageFetcher
from cds_service.imaging.study import EhrAccess, StudyImages
from tests.conftest import start_stub
from tests.imaging.conftest import seed_file

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.2"
BOUNDARY = "stub-boundary"


def _dicom(name: str, instance_uid: str) -> bytes:
    dataset = pydicom.dcmread(seed_file(name))
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = STUDY_UID, SERIES_UID
    dataset.SOPInstanceUID = instance_uid
    dataset.file_meta.MediaStorageSOPInstanceUID = instance_uid
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


FRONTAL = "nih-cxr14-00000002_000-no-finding-dx.dcm"
LATERAL = "dog-lateral-thorax-dx.dcm"


class Handler(BaseHTTPRequestHandler):
    """Routes by path: (status, content type, body); every request is recorded."""

    seen: ClassVar[list[tuple[str, str, str | None]]] = []  # (host, path, Authorization)
    routes: ClassVar[dict[str, tuple[int, str, bytes]]] = {}

    def do_GET(self) -> None:  # noqa: N802
        Handler.seen.append(
            (self.headers.get("Host", ""), self.path, self.headers.get("Authorization"))
        )
        status, kind, body = Handler.routes.get(self.path, (404, "text/plain", b""))
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[str]:
    Handler.seen.clear()
    Handler.routes.clear()
    server, url = start_stub(Handler)
    yield url
    server.shutdown()
    server.server_close()


def serve_instance(wado_path: str, instance_uid: str, status: int, name: str = FRONTAL) -> None:
    path = f"{wado_path}/studies/{STUDY_UID}/series/{SERIES_UID}/instances/{instance_uid}"
    if status != 200:
        Handler.routes[path] = (status, "text/plain", b"")
        return
    body = (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + _dicom(name, instance_uid)
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    kind = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    Handler.routes[path] = (200, kind, body)


def study_with_endpoint(address: str, instance_uids: list[str]) -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "id": "s1",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"}],
        "status": "available",
        "subject": {"reference": "Patient/p1"},
        "contained": [
            {
                "resourceType": "Endpoint",
                "id": "pacs",
                "status": "active",
                "connectionType": {"code": "dicom-wado-rs"},
                "payloadType": [{"text": "DICOM"}],
                "address": address,
            }
        ],
        "endpoint": [{"reference": "#pacs"}],
        "series": [
            {
                "uid": SERIES_UID,
                "modality": {"code": "DX"},
                "instance": [{"uid": uid} for uid in instance_uids],
            }
        ],
    }


def publish(fhir_path: str, study: dict[str, Any]) -> None:
    """The EHR's own copy of the study, which the loader re-reads."""
    body = json.dumps(study).encode()
    Handler.routes[f"{fhir_path}/ImagingStudy/{study['id']}"] = (200, "application/fhir+json", body)


def loader(fhir_base: str, token: str | None = None, **kwargs: Any) -> StudyImages:
    def access(server: str) -> EhrAccess | None:
        return EhrAccess(fhir_base, token) if server.rstrip("/") == fhir_base else None

    return StudyImages(ImageFetcher(), access, **kwargs)


def _load_with(stub: str, statuses: list[tuple[int, str]]) -> Any:
    uids = [generate_uid() for _ in statuses]
    for uid, (status, name) in zip(uids, statuses, strict=True):
        serve_instance("/wado", uid, status, name)
    study = study_with_endpoint(f"{stub}/wado", uids)
    publish("/fhir", study)
    return loader(f"{stub}/fhir").load(study, f"{stub}/fhir")


@pytest.mark.parametrize("failing", [404, 410, 401, 403, 503])
def test_one_failing_instance_does_not_hide_a_readable_frontal_one(stub: str, failing: int) -> None:
    image = _load_with(stub, [(failing, FRONTAL), (200, FRONTAL)])
    assert image.pixels.shape == (1024, 1024)
    assert image.selection.analysable


def test_instance_gone_and_lateral_only_is_not_analysed_with_both_reasons(stub: str) -> None:
    with pytest.raises(NotAnalysable) as caught:
        _load_with(stub, [(404, FRONTAL), (200, LATERAL)])
    assert caught.value.reason == "image not found on the image server; lateral view"


def test_unreachable_instance_beside_a_lateral_one_is_retried_later(stub: str) -> None:
    with pytest.raises(ImageFetchError, match="refused access"):
        _load_with(stub, [(403, FRONTAL), (200, LATERAL)])
