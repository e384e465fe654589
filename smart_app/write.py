"""Writing to the EHR with the user's token: a transaction whose refusal is reported with the
EHR's own status and message (a refused write is not an EHR that did not answer)."""

from __future__ import annotations

import json
from typing import Any

import requests

from cds_service.fhir.client import (
    FHIR_JSON,
    MAX_RESPONSE_BYTES,
    FhirAccessDenied,
    FhirClient,
    FhirUnavailable,
    new_session,
)
from cds_service.fhir.shapes import as_dict, as_str, dicts

MESSAGE_CHARS = 300


class WriteRefused(FhirAccessDenied):
    """The EHR answered a write with a 4xx: its status and what it said (safe to show)."""

    def __init__(self, status: int, message: str) -> None:
        # The text keeps "answered <status>": a 401 makes the viewer refresh and try again.
        super().__init__(f"FHIR server answered {status}")
        self.status = status
        self.message = message


def refusal_message(raw: bytes) -> str:
    """What the EHR said: an OperationOutcome's diagnostics or details, else its text."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        body = None
    texts: list[str] = []
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        for issue in dicts(body.get("issue")):
            details = as_dict(issue.get("details"))
            text = as_str(issue.get("diagnostics")) or as_str(details.get("text"))
            if text:
                texts.append(text)
    elif isinstance(body, dict):
        for key in ("error_description", "error", "message"):
            if as_str(body.get(key)):
                texts.append(str(body[key]))
                break
    if not texts and body is None:
        texts.append(raw.decode("utf-8", "replace"))
    message = " ".join(" ".join(texts).split())
    if not message:
        return "no message"
    return message if len(message) <= MESSAGE_CHARS else message[: MESSAGE_CHARS - 3] + "..."


def post_transaction(
    fhir: FhirClient, access_token: str, bundle: dict[str, Any], timeout: tuple[float, float]
) -> dict[str, Any]:
    """POST a transaction Bundle to the FHIR base with the user's token. WriteRefused on a
    4xx answer, FhirUnavailable when the EHR cannot be reached, fails (5xx) or answers
    something that is not FHIR JSON."""
    url = fhir.base_url
    headers = {
        "Accept": FHIR_JSON,
        "Content-Type": FHIR_JSON,
        "Authorization": f"Bearer {access_token}",
    }
    session = new_session()
    try:
        response = session.post(
            url,
            data=json.dumps(bundle).encode("utf-8"),
            headers=headers,
            timeout=timeout,
            allow_redirects=False,
            stream=True,
        )
        raw = response.raw.read(MAX_RESPONSE_BYTES + 1, decode_content=True)
        response.close()
    except (requests.RequestException, ValueError) as exc:
        raise FhirUnavailable(f"FHIR server unreachable: {type(exc).__name__}") from exc
    finally:
        session.close()
    if 400 <= response.status_code < 500:
        raise WriteRefused(response.status_code, refusal_message(raw[:MAX_RESPONSE_BYTES]))
    if response.status_code not in (200, 201) or len(raw) > MAX_RESPONSE_BYTES:
        raise FhirUnavailable(f"FHIR server answered {response.status_code}")
    try:
        answer = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise FhirUnavailable("FHIR server answered something that is not JSON") from exc
    if not isinstance(answer, dict) or "resourceType" not in answer:
        raise FhirUnavailable("FHIR server answered JSON that is not a resource")
    return answer
