"""A write the EHR refuses is reported with the EHR's status and message (not "did not answer")."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from cds_service.fhir.client import FhirClient, FhirUnavailable
from smart_app.write import WriteRefused, post_transaction, refusal_message

OUTCOME = {
    "resourceType": "OperationOutcome",
    "issue": [
        {"severity": "error", "code": "security", "diagnostics": "a bearer token is required"}
    ],
}


@pytest.fixture
def ehr() -> Iterator[dict[str, Any]]:
    answer: dict[str, Any] = {"status": 401, "body": json.dumps(OUTCOME).encode()}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(answer["status"])
            self.send_header("Content-Type", "application/fhir+json")
            self.end_headers()
            self.wfile.write(answer["body"])

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    answer["base"] = f"http://127.0.0.1:{server.server_address[1]}/fhir"
    yield answer
    server.shutdown()


def test_a_refused_write_carries_the_ehr_status_and_message(ehr: dict[str, Any]) -> None:
    fhir = FhirClient(ehr["base"])
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": []}
    with pytest.raises(WriteRefused) as refused:
        post_transaction(fhir, "t", bundle, timeout=(2, 5))
    assert refused.value.status == 401 and refused.value.message == "a bearer token is required"
    assert "401" in str(refused.value)  # the viewer refreshes the token once on a 401
    ehr.update(status=422, body=b"not json at all")
    with pytest.raises(WriteRefused) as refused:
        post_transaction(fhir, "t", bundle, timeout=(2, 5))
    assert refused.value.status == 422 and refused.value.message == "not json at all"
    ehr.update(status=503, body=b"")
    with pytest.raises(FhirUnavailable):
        post_transaction(fhir, "t", bundle, timeout=(2, 5))


def test_refusal_message_is_bounded() -> None:
    assert refusal_message(b"") == "no message"
    long = json.dumps({"resourceType": "OperationOutcome", "issue": [{"diagnostics": "x" * 999}]})
    assert len(refusal_message(long.encode())) == 300
    assert refusal_message(b'{"error": "invalid_token"}') == "invalid_token"
