"""Who may do what on the sandbox's FHIR API: token scopes and the patient compartment."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ehr_sandbox.access_tokens import AccessToken
from ehr_sandbox.auth.scopes import allowed_contexts
from ehr_sandbox.fhir.store import FhirStore

PUBLIC_FHIR_PATHS = frozenset({"/fhir/metadata", "/fhir/.well-known/smart-configuration"})
PATIENT_REFERENCE_FIELDS = ("subject", "patient")
WRITE_INTERACTIONS = {"POST": "create", "PUT": "update", "PATCH": "update", "DELETE": "delete"}


@dataclass(frozen=True)
class Denial:
    status: int
    code: str
    text: str


@dataclass(frozen=True)
class FhirOperation:
    """One interaction on one resource type (a transaction is several of these)."""

    interaction: str  # read, search, create, update or delete
    resource_type: str
    resource_id: str | None = None
    resource: dict[str, Any] | None = None  # the body, for create/update


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _transaction_operations(body: bytes) -> list[FhirOperation]:
    bundle = _json(body)
    entries = bundle.get("entry") if isinstance(bundle, dict) else None
    operations = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        raw_request, raw_resource = entry.get("request"), entry.get("resource")
        request: dict[str, Any] = raw_request if isinstance(raw_request, dict) else {}
        resource = raw_resource if isinstance(raw_resource, dict) else None
        method = str(request.get("method", "POST")).upper()
        url = str(request.get("url", "")).split("?", 1)[0].strip("/").split("/")
        rtype = str(resource.get("resourceType")) if resource else url[0]
        rid = url[1] if len(url) > 1 else None
        interaction = WRITE_INTERACTIONS.get(method, "read")
        operations.append(FhirOperation(interaction, rtype, rid, resource))
    # A malformed body is answered by the FHIR API itself; it still needs a write scope.
    return operations or [FhirOperation("create", "Bundle")]


def operations(method: str, path: str, body: bytes) -> list[FhirOperation]:
    """What a request to the FHIR API does, from its method, path (under /fhir) and body."""
    parts = [p for p in path.split("/")[2:] if p]
    if not parts:
        return _transaction_operations(body) if method == "POST" else []
    rtype = parts[0]
    if len(parts) >= 2 and parts[1] == "_search":
        return [FhirOperation("search", rtype)]
    if method in ("GET", "HEAD"):
        if len(parts) == 1:
            return [FhirOperation("search", rtype)]
        return [FhirOperation("read", rtype, parts[1])]
    interaction = WRITE_INTERACTIONS.get(method, "update")
    parsed = _json(body) if interaction in ("create", "update") else None
    return [
        FhirOperation(
            interaction,
            rtype,
            parts[1] if len(parts) >= 2 else None,
            parsed if isinstance(parsed, dict) else None,
        )
    ]


def _patient_references(resource: dict[str, Any]) -> Iterator[str]:
    for field in PATIENT_REFERENCE_FIELDS:
        value = resource.get(field)
        if isinstance(value, dict) and isinstance(value.get("reference"), str):
            reference = value["reference"]
            if reference.startswith("Patient/") or "/Patient/" in reference:
                yield reference.rsplit("/", 1)[-1]


def _in_compartment(resource: dict[str, Any], patient: str) -> bool:
    """True when the resource is the patient, names the patient, or names no patient at all
    (Device, Endpoint: outside every patient compartment)."""
    if resource.get("resourceType") == "Patient":
        return resource.get("id") == patient
    named = list(_patient_references(resource))
    return all(p == patient for p in named)


def _binary_of_patient(store: FhirStore, binary_id: str, patient: str) -> bool:
    """A Binary belongs to a patient when the patient's Media or DocumentReference points at it."""
    wanted = f"Binary/{binary_id}"
    for media in store.search("Media", [("patient", patient), ("_count", "200")]).resources:
        content = media.get("content")
        if isinstance(content, dict) and str(content.get("url", "")).endswith(wanted):
            return True
    for document in store.search(
        "DocumentReference", [("patient", patient), ("_count", "200")]
    ).resources:
        for item in document.get("content") or []:
            attachment = item.get("attachment") if isinstance(item, dict) else None
            if isinstance(attachment, dict) and str(attachment.get("url", "")).endswith(wanted):
                return True
    return False


def _search_names_patient(rtype: str, params: Sequence[tuple[str, str]], patient: str) -> bool:
    for name, value in params:
        base = name.split(":", 1)[0]
        if rtype == "Patient" and base == "_id" and value == patient:
            return True
        if base in ("patient", "subject") and value in (patient, f"Patient/{patient}"):
            return True
    return False


def _compartment_denial(
    op: FhirOperation, params: Sequence[tuple[str, str]], patient: str, store: FhirStore
) -> Denial | None:
    outside = Denial(403, "forbidden", "the token is limited to its patient's records")
    if op.interaction == "search":
        if _search_names_patient(op.resource_type, params, patient):
            return None
        return Denial(
            403, "forbidden", "a patient-scoped token must search by its patient (patient=...)"
        )
    if op.resource is not None and not _in_compartment(op.resource, patient):
        return outside
    if op.resource_id is None:
        return None
    if op.resource_type == "Binary":
        return None if _binary_of_patient(store, op.resource_id, patient) else outside
    stored = store.read(op.resource_type, op.resource_id)
    if stored is not None and not _in_compartment(stored, patient):
        return outside
    return None


def check_operation(
    token: AccessToken,
    op: FhirOperation,
    params: Sequence[tuple[str, str]],
    store: FhirStore,
) -> Denial | None:
    contexts = allowed_contexts(token.scope, op.resource_type, op.interaction)
    if not contexts:
        verb = "writing" if op.interaction in ("create", "update", "delete") else "reading"
        return Denial(
            403, "forbidden", f"the token's scopes do not allow {verb} {op.resource_type}"
        )
    if contexts == {"patient"}:
        if token.patient is None:
            return Denial(403, "forbidden", "patient scopes without a patient in context")
        return _compartment_denial(op, params, token.patient, store)
    return None


def check_request(
    token: AccessToken,
    method: str,
    path: str,
    params: Sequence[tuple[str, str]],
    body: bytes,
    store: FhirStore,
) -> Denial | None:
    """None when the token allows every operation of the request, else why not."""
    for op in operations(method, path, body):
        denial = check_operation(token, op, params, store)
        if denial is not None:
            return denial
    return None
