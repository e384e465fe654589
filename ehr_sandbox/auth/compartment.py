"""A patient's compartment: which stored resources a patient-scoped token may see or write.

Every answer of the FHIR API to a patient-scoped token is filtered through this, whatever
the request asked for, so that a search parameter the store ignores (or a modifier it does
not understand) cannot widen the result to other patients."""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cached_property
from typing import Any

from ehr_sandbox.fhir.search import MAX_COUNT, search_params_for
from ehr_sandbox.fhir.store import FhirStore

# `Patient/x`, `http://host/fhir/Patient/x` and `Patient/x/_history/2` all name patient x.
PATIENT_REFERENCE = re.compile(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")
BINARY_REFERENCE = re.compile(r"(?:^|/)Binary/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")
# Resources that point at a Binary holding a patient's data (how the EHR files images).
BINARY_HOLDERS = ("Media", "DocumentReference", "DiagnosticReport")


def referenced_patients(resource: Any) -> set[str]:
    """Every patient a `reference` anywhere in the resource points at (walked without
    recursion, so that a deeply nested resource cannot exhaust the stack)."""
    found: set[str] = set()
    stack = [resource]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            reference = node.get("reference")
            if isinstance(reference, str) and (match := PATIENT_REFERENCE.search(reference)):
                found.add(match.group(1))
            stack.extend(value for key, value in node.items() if key != "reference")
        elif isinstance(node, list):
            stack.extend(node)
    return found


def _attachment_urls(resource: Any) -> Iterator[str]:
    """The `url` of every attachment-like object anywhere in the resource."""
    stack = [resource]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            url = node.get("url")
            if isinstance(url, str):
                yield url
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def always_about_a_patient(resource_type: str) -> bool:
    """Types whose resources are always about a patient (their `patient` search parameter
    reads `subject`). One that names no patient belongs to nobody, so no patient's token
    sees it; Device, Endpoint, Practitioner or Provenance naming no patient are shared."""
    param = search_params_for(resource_type).get("patient")
    return param is not None and "subject" in param.paths


class PatientCompartment:
    """The resources one patient's token may reach in one request (Binary ownership is
    worked out once per request, on first use)."""

    def __init__(self, store: FhirStore, patient: str) -> None:
        self.store = store
        self.patient = patient

    def contains(self, resource: dict[str, Any]) -> bool:
        rtype = resource.get("resourceType")
        if rtype == "Patient":
            return resource.get("id") == self.patient
        if rtype == "Binary":
            return self._binary_is_mine(resource)
        named = referenced_patients(resource)
        if named:
            return named == {self.patient}
        return not always_about_a_patient(str(rtype))

    def may_link_binaries_of(self, resource: dict[str, Any]) -> bool:
        """Whether every Binary an attachment of `resource` points at is one this patient
        can already read. Pointing at a Binary makes the writer's patient one of its
        owners, so linking any other (another patient's, nobody's yet, or one not stored)
        would claim it or take it from its patient."""
        for url in _attachment_urls(resource):
            if match := BINARY_REFERENCE.search(url):
                binary = self.store.read("Binary", match.group(1))
                if binary is None or not self._binary_is_mine(binary):
                    return False
        return True

    def _binary_is_mine(self, binary: dict[str, Any]) -> bool:
        """A Binary is the patient's when everything tying it to a patient (its own
        securityContext, the Media/DocumentReference/DiagnosticReport pointing at it) names
        this patient and nobody else."""
        owners = set(referenced_patients(binary))
        owners |= self._binary_owners.get(str(binary.get("id")), set())
        return owners == {self.patient}

    @cached_property
    def _binary_owners(self) -> dict[str, set[str]]:
        """Binary id -> the patients of the resources pointing at it ("" for a holder that
        names no patient: such a Binary is nobody's)."""
        owners: dict[str, set[str]] = {}
        for rtype in BINARY_HOLDERS:
            for holder in self._all(rtype):
                named = referenced_patients(holder) or {""}
                for url in _attachment_urls(holder):
                    if match := BINARY_REFERENCE.search(url):
                        owners.setdefault(match.group(1), set()).update(named)
        return owners

    def _all(self, resource_type: str) -> Iterator[dict[str, Any]]:
        offset = 0
        while True:
            page = self.store.search(
                resource_type, [("_count", str(MAX_COUNT)), ("_offset", str(offset))]
            )
            yield from page.resources
            offset += MAX_COUNT
            if not page.has_next:
                return
