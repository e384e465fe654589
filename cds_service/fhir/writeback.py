"""Write an AI report into the EHR as one transaction of conditional creates (no duplicates)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from cds_service.fhir.backend_services import BackendServicesClient
from cds_service.fhir.client import FhirClient, FhirError, FhirUnavailable
from cds_service.fhir.shapes import as_dict, as_str, dicts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteResult:
    """Where the EHR put the DiagnosticReport, and whether this call created it."""

    report_location: str
    created: bool


def write_transaction(
    auth: BackendServicesClient, bundle: dict[str, Any], timeout: tuple[float, float] = (3, 30)
) -> WriteResult:
    """POST the transaction Bundle to the EHR's base with a Backend Services token."""
    client = FhirClient(auth.ehr.fhir_base, auth.access_token(), timeout=timeout)
    try:
        answer = client.post_json("", bundle)
    except FhirError:
        log.warning("write-back to the EHR failed")
        raise
    if answer.get("resourceType") != "Bundle" or answer.get("type") != "transaction-response":
        raise FhirUnavailable("the EHR did not answer with a transaction-response Bundle")
    requests_ = [as_dict(e.get("request")) for e in dicts(bundle.get("entry"))]
    responses = [as_dict(e.get("response")) for e in dicts(answer.get("entry"))]
    for request, response in zip(requests_, responses, strict=False):
        if request.get("url") == "DiagnosticReport":
            status = as_str(response.get("status")) or ""
            location = as_str(response.get("location")) or ""
            return WriteResult(report_location=location, created=status.startswith("201"))
    raise FhirUnavailable("the EHR's answer has no entry for the DiagnosticReport")
