"""Who may do what on the sandbox's FHIR API: token scopes and the patient compartment."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ehr_sandbox.access_tokens import AccessToken
from ehr_sandbox.auth.compartment import PatientCompartment
from ehr_sandbox.auth.scopes import allowed_contexts
from ehr_sandbox.fhir.search import ParsedSearch, SearchParameterError, parse_search
from ehr_sandbox.fhir.store import FhirStore

PUBLIC_FHIR_PATHS = frozenset({"/fhir/metadata", "/fhir/.well-known/smart-configuration"})
# fullUrls that name no stored resource, so rewriting references to them reaches no chart.
URN_FULL_URLS = ("urn:uuid:", "urn:oid:")
WRITE_INTERACTIONS = {"POST": "create", "PUT": "update", "PATCH": "update", "DELETE": "delete"}
# Types that are never anybody's chart: a Subscription watches every patient's records (and
# its channel.header holds the subscriber's secret), so it takes a user/ or system/ scope
# (Backend Services: e.g. system/Subscription.crus) and is never served without a token.
SERVER_WIDE_TYPES = frozenset({"Subscription"})


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
    all_versions: bool = False  # a history or version read: every stored version is shown
    condition: str | None = None  # If-None-Exist / ifNoneExist of a conditional create
    full_url: str | None = None  # a transaction entry's fullUrl (references to it are rewritten)


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
        condition, full_url = request.get("ifNoneExist"), entry.get("fullUrl")
        operations.append(
            FhirOperation(
                interaction,
                rtype,
                rid,
                resource,
                condition=str(condition) if condition else None,
                full_url=str(full_url) if full_url else None,
            )
        )
    # A malformed body is answered by the FHIR API itself; it still needs a write scope.
    return operations or [FhirOperation("create", "Bundle")]


def operations(
    method: str, path: str, body: bytes, if_none_exist: str | None = None
) -> list[FhirOperation]:
    """What a request to the FHIR API does, from its method, path (under /fhir), body and
    If-None-Exist header."""
    parts = [p for p in path.split("/")[2:] if p]
    if not parts:
        return _transaction_operations(body) if method == "POST" else []
    rtype = parts[0]
    if len(parts) >= 2 and parts[1] == "_search":
        return [FhirOperation("search", rtype)]
    if method in ("GET", "HEAD"):
        if len(parts) == 1:
            return [FhirOperation("search", rtype)]
        history = len(parts) >= 3 and parts[2] == "_history"
        return [FhirOperation("read", rtype, parts[1], all_versions=history)]
    interaction = WRITE_INTERACTIONS.get(method, "update")
    parsed = _json(body) if interaction in ("create", "update") else None
    return [
        FhirOperation(
            interaction,
            rtype,
            parts[1] if len(parts) >= 2 else None,
            parsed if isinstance(parsed, dict) else None,
            condition=(if_none_exist or None) if interaction == "create" else None,
        )
    ]


def anonymous_read_allowed(method: str, path: str) -> bool:
    """Whether a request without a token may be served when the sandbox is open (like public
    sandboxes): reads and searches only, and none of a server-wide type."""
    reading = method in ("GET", "HEAD") or path.endswith("/_search")
    return reading and not any(
        op.resource_type in SERVER_WIDE_TYPES for op in operations(method, path, b"")
    )


def _names_its_patient(search: ParsedSearch, patient: str) -> bool:
    """True when one of the filters the store applies asks for exactly this patient."""
    wanted = {patient, f"Patient/{patient}"}
    for item in search.filters:
        if search.resource_type == "Patient" and item.param.name == "_id":
            found = item.modifier is None and item.value == patient
        else:
            found = (
                item.param.name in ("patient", "subject")
                and item.modifier in (None, "Patient")
                and item.value in wanted
            )
        if found:
            return True
    return False


def _search_denial(rtype: str, params: Sequence[tuple[str, str]], patient: str) -> Denial | None:
    try:
        search = parse_search(rtype, params)
    except SearchParameterError as exc:
        return Denial(400, "invalid", str(exc))
    if search.unknown:
        # The store would ignore these: refused rather than answered with a wider result.
        return Denial(
            400,
            "not-supported",
            "unsupported search parameters for a patient-scoped token: "
            + ", ".join(search.unknown),
        )
    if not _names_its_patient(search, patient):
        return Denial(
            403, "forbidden", "a patient-scoped token must search by its patient (patient=...)"
        )
    return None


def _compartment_denial(
    op: FhirOperation, params: Sequence[tuple[str, str]], patient: str, store: FhirStore
) -> Denial | None:
    """Searches must name the patient (their results are filtered to the compartment as
    well, see `restricted_patient`); reads and writes must stay inside the compartment."""
    if op.interaction == "search":
        return _search_denial(op.resource_type, params, patient)
    outside = Denial(403, "forbidden", "the token is limited to its patient's records")
    compartment = PatientCompartment(store, patient)
    if op.resource is not None and not compartment.contains(op.resource):
        return outside
    if op.resource is not None and not compartment.may_link_binaries_of(op.resource):
        return Denial(
            403, "forbidden", "an attachment points at a Binary outside the token's patient"
        )
    if op.resource_id is None:
        return None
    if op.all_versions:
        entries = store.history(op.resource_type, op.resource_id)
        versions = [entry.resource for entry in entries]
    else:
        versions = [store.read(op.resource_type, op.resource_id)]
    if any(v is not None and not compartment.contains(v) for v in versions):
        return outside
    return None


def restricted_patient(
    token: AccessToken, method: str, path: str, body: bytes, if_none_exist: str | None = None
) -> str | None:
    """The patient whose compartment every answer to this request must stay in: set when
    the token reads, searches or makes conditional creates (which answer with, or link to,
    the resource matching the condition) with patient scopes only."""
    for op in operations(method, path, body, if_none_exist):
        if op.interaction not in ("read", "search") and op.condition is None:
            continue
        if allowed_contexts(token.scope, op.resource_type, op.interaction) == {"patient"}:
            return token.patient
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
        if op.resource_type in SERVER_WIDE_TYPES:
            return Denial(
                403,
                "forbidden",
                f"{op.resource_type} is not in a patient's compartment: it needs a user/ or "
                "system/ scope",
            )
        if token.patient is None:
            return Denial(403, "forbidden", "patient scopes without a patient in context")
        return _compartment_denial(op, params, token.patient, store)
    return None


def _full_url_denial(ops: Sequence[FhirOperation]) -> Denial | None:
    """For a patient-scoped token: a transaction rewrites the references to an entry's
    fullUrl into the stored resource after the compartment checks, so a fullUrl such as
    `Patient/x` would turn a reference to the token's patient into another one. Only urn:
    fullUrls (which name nothing stored) are accepted."""
    for op in ops:
        if op.full_url is not None and not op.full_url.startswith(URN_FULL_URLS):
            return Denial(
                403,
                "forbidden",
                "a patient-scoped token's transaction entries need urn:uuid: fullUrls",
            )
    return None


def check_request(
    token: AccessToken,
    method: str,
    path: str,
    params: Sequence[tuple[str, str]],
    body: bytes,
    store: FhirStore,
    if_none_exist: str | None = None,
) -> Denial | None:
    """None when the token allows every operation of the request, else why not."""
    ops = operations(method, path, body, if_none_exist)
    for op in ops:
        denial = check_operation(token, op, params, store)
        if denial is not None:
            return denial
    if any(
        allowed_contexts(token.scope, op.resource_type, op.interaction) == {"patient"} for op in ops
    ):
        return _full_url_denial(ops)
    return None
