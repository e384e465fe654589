"""The FHIR client only follows URLs under its own base (SSRF guard for paging)."""

from __future__ import annotations

import pytest

from cds_service.fhir.client import FhirClient


@pytest.mark.parametrize(
    "url,owned",
    [
        ("https://ehr.example/fhir/ImagingStudy?page=2", True),
        ("https://ehr.example/fhir", True),
        ("https://EHR.example/fhir/x", True),
        ("https://ehr.example/fhir/../internal/admin", False),
        ("https://ehr.example/fhir/%2e%2e/internal", False),
        ("https://ehr.example/fhir/./x", False),
        ("https://ehr.example/fhirx/ImagingStudy", False),
        ("https://ehr.example:8443/fhir/ImagingStudy", False),
        ("http://ehr.example/fhir/ImagingStudy", False),
        ("https://ehr.example.evil.org/fhir/ImagingStudy", False),
        ("https://user@ehr.example/fhir/ImagingStudy", False),
    ],
)
def test_owns_only_urls_under_the_base(url: str, owned: bool) -> None:
    assert FhirClient("https://ehr.example/fhir/").owns(url) is owned
