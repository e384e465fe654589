"""Fetching image bytes: multipart WADO-RS, Binary, attachments; limits and credentials."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar

import pytest

from cds_service.imaging.errors import ImageFetchError, NotAnalysable, UnsupportedImage
from cds_service.imaging.limits import ImageLimits
from cds_service.imaging.retrieval import (
    ImageFetcher,
    attachment_bytes,
    fetch_binary,
    fetch_wado_instance,
    multipart_parts,
    url_under,
)
from tests.conftest import start_stub
from tests.imaging.conftest import seed_file

DICOM_BYTES = seed_file("dog-lateral-thorax-dx.dcm").read_bytes()
BOUNDARY = "xYzZY-boundary"


def multipart(*parts: tuple[str, bytes]) -> bytes:
    body = b""
    for kind, data in parts:
        body += f"--{BOUNDARY}\r\nContent-Type: {kind}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


class Handler(BaseHTTPRequestHandler):
    seen: ClassVar[list[dict[str, str]]] = []
    routes: ClassVar[dict[str, tuple[int, dict[str, str], bytes]]] = {}

    def do_GET(self) -> None:  # noqa: N802
        Handler.seen.append({"path": self.path, **{k: v for k, v in self.headers.items()}})
        status, headers, body = Handler.routes.get(self.path, (404, {}, b""))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    Handler.seen.clear()
    Handler.routes.clear()
    stub, url = start_stub(Handler)
    yield url
    stub.shutdown()
    stub.server_close()


WADO_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
INSTANCE = "/wado/studies/1.2/series/3.4/instances/5.6"


def test_wado_instance_is_unwrapped_and_token_only_goes_to_configured_servers(
    server: str,
) -> None:
    Handler.routes[INSTANCE] = (
        200,
        {"Content-Type": WADO_TYPE},
        multipart(("application/dicom", DICOM_BYTES)),
    )
    plain = ImageFetcher()
    assert fetch_wado_instance(plain, f"{server}/wado", "1.2", "3.4", "5.6", "tok") == DICOM_BYTES
    assert "Authorization" not in Handler.seen[-1]
    assert "transfer-syntax=*" in Handler.seen[-1]["Accept"]
    trusted = ImageFetcher(token_servers=(f"{server}/wado",))
    assert fetch_wado_instance(trusted, f"{server}/wado", "1.2", "3.4", "5.6", "tok") == DICOM_BYTES
    assert Handler.seen[-1]["Authorization"] == "Bearer tok"


def test_redirect_to_another_host_is_refused_and_same_host_followed(server: str) -> None:
    other = server.replace("127.0.0.1", "localhost")
    Handler.routes["/away"] = (302, {"Location": f"{other}/x"}, b"")
    with pytest.raises(ImageFetchError, match="another host"):
        ImageFetcher().get(f"{server}/away", "application/dicom")
    Handler.routes["/moved"] = (307, {"Location": "/binary"}, b"")
    Handler.routes["/binary"] = (200, {"Content-Type": "application/dicom"}, DICOM_BYTES)
    assert ImageFetcher().get(f"{server}/moved", "application/dicom").body == DICOM_BYTES


def test_byte_limit_is_enforced(server: str) -> None:
    Handler.routes["/big"] = (200, {"Content-Type": "application/dicom"}, DICOM_BYTES)
    small = ImageFetcher(limits=ImageLimits(max_bytes=1000))
    with pytest.raises(UnsupportedImage, match="byte limit"):
        small.get(f"{server}/big", "application/dicom")


def test_content_type_is_checked(server: str) -> None:
    Handler.routes["/html"] = (200, {"Content-Type": "text/html"}, b"<html></html>")
    with pytest.raises(UnsupportedImage, match="expected application/dicom"):
        fetch_binary(ImageFetcher(), f"{server}/html", server)
    Handler.routes[INSTANCE] = (200, {"Content-Type": "application/dicom"}, DICOM_BYTES)
    with pytest.raises(UnsupportedImage, match="multipart/related"):
        fetch_wado_instance(ImageFetcher(), f"{server}/wado", "1.2", "3.4", "5.6")


def test_status_codes_map_to_clear_errors(server: str) -> None:
    with pytest.raises(NotAnalysable, match="not found"):
        ImageFetcher().get(f"{server}/missing", "application/dicom")
    Handler.routes["/denied"] = (403, {}, b"")
    with pytest.raises(ImageFetchError, match="403"):
        ImageFetcher().get(f"{server}/denied", "application/dicom")
    Handler.routes["/down"] = (503, {}, b"")
    with pytest.raises(ImageFetchError, match="503"):
        ImageFetcher().get(f"{server}/down", "application/dicom")


def test_unreachable_server_is_a_retryable_error() -> None:
    from tests.conftest import free_port

    fetcher = ImageFetcher(limits=ImageLimits(connect_timeout_s=0.5, read_timeout_s=0.5))
    with pytest.raises(ImageFetchError, match="unreachable"):
        fetcher.get(f"http://127.0.0.1:{free_port()}/x", "application/dicom")


def test_binary_json_and_attachments(server: str) -> None:
    encoded = base64.b64encode(DICOM_BYTES).decode()
    binary = {"resourceType": "Binary", "contentType": "application/dicom", "data": encoded}
    Handler.routes["/fhir/Binary/1"] = (
        200,
        {"Content-Type": "application/fhir+json"},
        json.dumps(binary).encode(),
    )
    fhir = f"{server}/fhir"
    attachment = {"contentType": "application/dicom", "url": "Binary/1"}
    assert attachment_bytes(ImageFetcher(), attachment, fhir, "tok") == DICOM_BYTES
    assert Handler.seen[-1]["Authorization"] == "Bearer tok"  # the FHIR server itself
    inline = {"contentType": "application/dicom", "data": encoded}
    assert attachment_bytes(ImageFetcher(), inline, fhir) == DICOM_BYTES
    with pytest.raises(UnsupportedImage, match="not application/dicom"):
        attachment_bytes(ImageFetcher(), {"contentType": "image/png", "data": encoded}, fhir)
    with pytest.raises(UnsupportedImage, match="base64"):
        attachment_bytes(ImageFetcher(), {"data": "%%%"}, fhir)
    with pytest.raises(UnsupportedImage, match="byte limit"):
        attachment_bytes(ImageFetcher(limits=ImageLimits(max_bytes=100)), inline, fhir)
    # an absolute URL on another server gets no token
    Handler.routes["/elsewhere/b"] = (200, {"Content-Type": "application/dicom"}, DICOM_BYTES)
    other = {"contentType": "application/dicom", "url": f"{server}/elsewhere/b"}
    assert attachment_bytes(ImageFetcher(), other, fhir, "tok") == DICOM_BYTES
    assert "Authorization" not in Handler.seen[-1]


def test_multipart_parsing_edge_cases() -> None:
    body = multipart(("application/dicom", b"A\r\n--notboundary\r\nB"), ("text/plain", b"x"))
    parts = multipart_parts(WADO_TYPE, body)
    assert parts == [("application/dicom", b"A\r\n--notboundary\r\nB"), ("text/plain", b"x")]
    with pytest.raises(UnsupportedImage):
        multipart_parts('multipart/related; type="application/dicom"', b"garbage")


def test_url_under() -> None:
    assert url_under("http://a/wado/studies/1", "http://a/wado")
    assert not url_under("http://a/wadox/1", "http://a/wado")
    assert not url_under("http://a/wado/../admin", "http://a/wado")
    assert not url_under("http://b/wado/1", "http://a/wado")
    assert not url_under("https://a/wado/1", "http://a/wado")
