"""StudyImages.load driven as the worker and the viewer drive it, against a stub FHIR server
and stub WADO-RS servers on loopback: which instances count, which Endpoints are followed,
and where a token goes."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import pydicom
import pytest
from joserfc.jwk import ECKey
from pydicom.uid import generate_uid

from cds_service.config import ConfigurationError, EhrClient
from cds_service.fhir.backend_services import BackendServicesClients
from cds_service.fhir.client import FhirClient
from cds_service.imaging.errors import ImageFetchError, NotAnalysable
from cds_service.imaging.retrieval import ImageFetcher
from cds_service.imaging.study import EhrAccess, StudyImages, study_images_for
from smart_app import viewer
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
        status, kind, body = Handler.routes.get(
            self.path, Handler.routes.get(self.path.split("?")[0], (404, "text/plain", b""))
        )
        self._answer(status, kind, body)

    def do_POST(self) -> None:  # noqa: N802 - a token endpoint: /<name>/token -> token-<name>
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        name = self.path.strip("/").split("/")[0]
        body = json.dumps({"access_token": f"token-{name}", "expires_in": 300}).encode()
        self._answer(200, "application/json", body)

    def _answer(self, status: int, kind: str, body: bytes) -> None:
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


def instance_path(wado_path: str, instance_uid: str) -> str:
    return f"{wado_path}/studies/{STUDY_UID}/series/{SERIES_UID}/instances/{instance_uid}"


def serve_instance(
    wado_path: str, instance_uid: str, status: int, name: str = FRONTAL, metadata: bool = True
) -> None:
    """The instance through WADO-RS, and its header alone at .../metadata (DICOM JSON)."""
    path = instance_path(wado_path, instance_uid)
    if status != 200:
        Handler.routes[path] = Handler.routes[f"{path}/metadata"] = (status, "text/plain", b"")
        return
    data = _dicom(name, instance_uid)
    body = (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    kind = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    Handler.routes[path] = (200, kind, body)
    Handler.routes.pop(f"{path}/metadata", None)
    if metadata:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        json_body = json.dumps([header.to_json_dict()]).encode()
        Handler.routes[f"{path}/metadata"] = (200, "application/dicom+json", json_body)


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
    """The loader for one EHR at `fhir_base` whose PACS is /wado on the same host."""
    pacs = (fhir_base.rsplit("/", 1)[0] + "/wado",)

    def access(server: str) -> EhrAccess | None:
        if server.rstrip("/") != fhir_base:
            return None
        return EhrAccess(fhir_base, token, image_servers=pacs)

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
    reasons = set(caught.value.reason.split("; "))
    assert reasons == {"image not found on the image server", "lateral view"}


def test_unreachable_instance_beside_a_lateral_one_is_retried_later(stub: str) -> None:
    with pytest.raises(ImageFetchError, match="refused access"):
        _load_with(stub, [(403, FRONTAL), (200, LATERAL)])


@pytest.fixture
def origins() -> Iterator[tuple[str, str, str]]:
    """Three loopback origins: EHR A, EHR B, and a PACS host (also standing in for any
    internal address an Endpoint could name)."""
    Handler.seen.clear()
    Handler.routes.clear()
    servers = [start_stub(Handler) for _ in range(3)]
    yield servers[0][1], servers[1][1], servers[2][1]
    for server, _ in servers:
        server.shutdown()
        server.server_close()


def _ehr_client(
    tmp_path: Path, origin: str, name: str, image_servers: tuple[str, ...] = ()
) -> EhrClient:
    key = ECKey.generate_key("P-384", auto_kid=True)
    key_file = tmp_path / f"{name}.jwk.json"
    key_file.write_text(json.dumps({**key.as_dict(private=True), "kid": key.kid}))
    return EhrClient(
        fhir_base=f"{origin}/{name}/fhir",
        token_url=f"{origin}/{name}/token",
        client_id=f"cxr-cds-{name}",
        key_file=key_file,
        image_servers=image_servers,
    )


def _requests_to(origin: str, path_prefix: str) -> list[str | None]:
    """The Authorization headers of the requests that reached origin + path_prefix."""
    host = origin.split("://", 1)[1]
    return [
        auth
        for seen_host, path, auth in Handler.seen
        if seen_host == host and path.startswith(path_prefix)
    ]


def _study_at(fhir_path: str, address: str) -> dict[str, Any]:
    uid = generate_uid()
    study = study_with_endpoint(address, [uid])
    publish(fhir_path, study)
    serve_instance(urlsplit(address).path, uid, 200)
    empty = b'{"resourceType": "Bundle", "type": "searchset"}'
    Handler.routes[f"{fhir_path}/Media"] = (200, "application/fhir+json", empty)  # no Media
    return study


def test_worker_follows_no_endpoint_outside_the_ehr_and_its_image_servers(
    origins: tuple[str, str, str], tmp_path: Path
) -> None:
    ehr_a, _, pacs = origins
    images = study_images_for(BackendServicesClients([_ehr_client(tmp_path, ehr_a, "a")]))
    study = _study_at("/a/fhir", f"{pacs}/latest/meta-data")  # e.g. a cloud metadata address
    with pytest.raises(NotAnalysable, match="neither on the EHR nor a configured image server"):
        images.load(study, f"{ehr_a}/a/fhir")
    assert _requests_to(pacs, "/") == []  # refused without a request


def test_each_ehrs_token_goes_only_to_its_own_fhir_base_and_image_servers(
    origins: tuple[str, str, str], tmp_path: Path
) -> None:
    ehr_a, ehr_b, pacs = origins
    images = study_images_for(
        BackendServicesClients(
            [
                _ehr_client(tmp_path, ehr_a, "a", image_servers=(f"{pacs}/pacs-a",)),
                _ehr_client(tmp_path, ehr_b, "b"),
            ]
        ),
        image_servers=(f"{pacs}/shared",),
    )
    # A's study under A's own FHIR base and on A's PACS: followed, with A's token
    images.load(_study_at("/a/fhir", f"{ehr_a}/a/fhir/wado"), f"{ehr_a}/a/fhir")
    assert set(_requests_to(ehr_a, "/a/fhir/wado")) == {"Bearer token-a"}
    images.load(_study_at("/a/fhir", f"{pacs}/pacs-a"), f"{ehr_a}/a/fhir")
    assert set(_requests_to(pacs, "/pacs-a")) == {"Bearer token-a"}
    # B's study naming A's PACS: refused, B's token never leaves for it
    with pytest.raises(NotAnalysable, match="neither on the EHR nor a configured image server"):
        images.load(_study_at("/b/fhir", f"{pacs}/pacs-a"), f"{ehr_b}/b/fhir")
    assert set(_requests_to(pacs, "/pacs-a")) == {"Bearer token-a"}
    # a globally configured image server is followed for any EHR, without any EHR's token
    images.load(_study_at("/b/fhir", f"{pacs}/shared"), f"{ehr_b}/b/fhir")
    images.load(_study_at("/a/fhir", f"{pacs}/shared"), f"{ehr_a}/a/fhir")
    assert set(_requests_to(pacs, "/shared")) == {None}


def _study_with_media_at(fhir_path: str, url: str) -> dict[str, Any]:
    """A study with no Endpoint whose DICOM Media attachment points at `url`."""
    study = {**study_with_endpoint("", []), "contained": [], "endpoint": []}
    publish(fhir_path, study)
    media = {
        "resourceType": "Media",
        "id": "m1",
        "status": "completed",
        "subject": {"reference": "Patient/p1"},
        "partOf": [{"reference": "ImagingStudy/s1"}],
        "content": {"contentType": "application/dicom", "url": url},
    }
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": media}]}
    Handler.routes[f"{fhir_path}/Media"] = (
        200,
        "application/fhir+json",
        json.dumps(bundle).encode(),
    )
    return study


def test_on_a_shared_origin_an_ehrs_token_stays_under_its_own_fhir_base_path(
    origins: tuple[str, str, str], tmp_path: Path
) -> None:
    """Two tenants on one origin (host/a/fhir, host/b/fhir): A's studies may not send A's
    token, or us, to B's paths or to any other path on the host that A did not list."""
    host = origins[0]
    images = study_images_for(
        BackendServicesClients(
            [
                _ehr_client(tmp_path, host, "a", image_servers=(f"{host}/pacs-a",)),
                _ehr_client(tmp_path, host, "b"),
            ]
        )
    )
    refused = "neither on the EHR nor a configured image server"
    for elsewhere in (f"{host}/b/fhir/wado", f"{host}/a/wado", f"{host}/admin"):
        with pytest.raises(NotAnalysable, match=refused):
            images.load(_study_at("/a/fhir", elsewhere), f"{host}/a/fhir")
        with pytest.raises(NotAnalysable, match=refused):
            images.load(_study_with_media_at("/a/fhir", f"{elsewhere}/Binary/x"), f"{host}/a/fhir")
    # refused without a request: only A's FHIR server and token endpoint were asked
    assert {path.split("?")[0] for _, path, _ in Handler.seen} <= {
        "/a/fhir/ImagingStudy/s1",
        "/a/fhir/Media",
    }
    # the listed PACS path on the same host is followed, with A's token
    images.load(_study_at("/a/fhir", f"{host}/pacs-a"), f"{host}/a/fhir")
    assert set(_requests_to(host, "/pacs-a")) == {"Bearer token-a"}
    # the viewer, with the user's token for A, likewise stays under A's base path
    study = _study_at("/a/fhir", f"{host}/b/fhir/wado")
    with pytest.raises(viewer.ViewerError):
        viewer.study_png(FhirClient(f"{host}/a/fhir", "user-token"), "user-token", study)
    assert _requests_to(host, "/b/") == []


def test_ehr_client_image_servers_are_read_from_the_registration_file(tmp_path: Path) -> None:
    item = {
        "fhir_base": "https://ehr.example/fhir/",
        "token_url": "https://ehr.example/token",
        "client_id": "c",
        "jwk_file": "k.json",
    }
    assert EhrClient.from_json(item).image_servers == ()
    listed = EhrClient.from_json({**item, "image_servers": ["https://pacs.example/dicom-web"]})
    assert listed.image_servers == ("https://pacs.example/dicom-web",)
    with pytest.raises(ConfigurationError, match="image_servers"):
        EhrClient.from_json({**item, "image_servers": ["file:///etc/passwd"]})


def test_viewer_does_not_fetch_an_endpoint_off_the_ehr_and_shows_no_remote_status(
    origins: tuple[str, str, str],
) -> None:
    ehr, _, internal = origins
    study = _study_at("/fhir", f"{internal}/admin")
    instance_uid = study["series"][0]["instance"][0]["uid"]
    serve_instance("/admin", instance_uid, 503)  # what the internal host would answer
    fhir = FhirClient(f"{ehr}/fhir", "user-token")
    with pytest.raises(viewer.ViewerError) as caught:
        viewer.study_png(fhir, "user-token", study)
    assert _requests_to(internal, "/") == []
    assert "503" not in str(caught.value)
    # configured as an image server, the same address is followed, without the user's token
    serve_instance("/admin", instance_uid, 200)
    png = viewer.study_png(fhir, "user-token", study, image_servers=(f"{internal}/admin",))
    assert png.startswith(b"\x89PNG")
    assert set(_requests_to(internal, "/admin")) == {None}


def _downloads(origin: str) -> list[str]:
    host = origin.split("://", 1)[1]
    return [
        path
        for seen_host, path, _ in Handler.seen
        if seen_host == host and "/instances/" in path and not path.endswith("/metadata")
    ]


@pytest.mark.parametrize("metadata", [True, False])
def test_headers_decide_which_instances_are_downloaded(stub: str, metadata: bool) -> None:
    """Two lateral films and one frontal: with WADO-RS metadata only the frontal one is
    downloaded; a server without metadata still works, by downloading all three."""
    uids = [generate_uid() for _ in range(3)]
    for uid, name in zip(uids, (LATERAL, LATERAL, FRONTAL), strict=True):
        serve_instance("/wado", uid, 200, name, metadata=metadata)
    study = study_with_endpoint(f"{stub}/wado", uids)
    publish("/fhir", study)
    image = loader(f"{stub}/fhir").load(study, f"{stub}/fhir")
    assert image.selection.analysable and image.pixels.shape == (1024, 1024)
    expected = (
        [instance_path("/wado", uids[2])] if metadata else [instance_path("/wado", u) for u in uids]
    )
    assert _downloads(stub) == expected


def test_header_and_file_disagreeing_falls_back_to_the_next_instance(stub: str) -> None:
    """Metadata saying frontal for a lateral file: the file's own header decides."""
    lying, honest = generate_uid(), generate_uid()
    serve_instance("/wado", lying, 200, LATERAL)
    serve_instance("/wado", honest, 200, FRONTAL)
    path = instance_path("/wado", lying)
    Handler.routes[f"{path}/metadata"] = Handler.routes[
        f"{instance_path('/wado', honest)}/metadata"
    ]
    study = study_with_endpoint(f"{stub}/wado", [lying, honest])
    publish("/fhir", study)
    image = loader(f"{stub}/fhir").load(study, f"{stub}/fhir")
    assert image.selection.analysable
    assert _downloads(stub) == [path, instance_path("/wado", honest)]


def test_best_dicom_is_the_instance_load_decodes(stub: str) -> None:
    """`best_dicom` hands over the bytes of the instance `load` would decode, as served."""
    uids = [generate_uid() for _ in range(3)]
    for uid, name in zip(uids, (LATERAL, FRONTAL, LATERAL), strict=True):
        serve_instance("/wado", uid, 200, name)
    study = study_with_endpoint(f"{stub}/wado", uids)
    publish("/fhir", study)
    images = loader(f"{stub}/fhir")
    data = images.best_dicom(study, f"{stub}/fhir")
    assert data == _dicom(FRONTAL, uids[1])
    image = images.load(study, f"{stub}/fhir")
    assert image.selection.analysable and image.pixels.shape == (1024, 1024)


def test_the_viewer_hands_a_job_only_an_analysable_image_from_allowed_addresses(
    origins: tuple[str, str, str],
) -> None:
    """What "Request analysis" queues: the frontal film read with the user's token under the
    EHR's FHIR base; a lateral-only study, or one whose Endpoint lies off the EHR, gives
    NotAnalysable with the reason and no request to the other host."""
    ehr, _, internal = origins
    fhir = FhirClient(f"{ehr}/fhir", "user-token")
    own = _study_at("/fhir", f"{ehr}/fhir/wado")
    data = viewer.analysable_dicom(fhir, "user-token", own)
    assert data == _dicom(FRONTAL, own["series"][0]["instance"][0]["uid"])
    assert set(_requests_to(ehr, "/fhir/wado")) == {"Bearer user-token"}
    lateral = _study_at("/fhir", f"{ehr}/fhir/wado")
    serve_instance("/fhir/wado", lateral["series"][0]["instance"][0]["uid"], 200, LATERAL)
    with pytest.raises(NotAnalysable, match="lateral view"):
        viewer.analysable_dicom(fhir, "user-token", lateral)
    elsewhere = _study_at("/fhir", f"{internal}/admin")
    with pytest.raises(NotAnalysable, match="neither on the EHR nor a configured image server"):
        viewer.analysable_dicom(fhir, "user-token", elsewhere)
    assert _requests_to(internal, "/") == []
