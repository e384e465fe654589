"""FHIR R4 transaction Bundles for the sandbox: POST entries (conditional or not), urn:uuid refs."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from ehr_sandbox.fhir.store import FhirStore

JsonDict = dict[str, Any]


class TransactionError(ValueError):
    """The Bundle cannot be processed; the message says why (answered as 400)."""


@dataclass
class _Entry:
    full_url: str | None
    resource: JsonDict
    if_none_exist: str | None
    refs: set[str]


def _references(value: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str):
            found.add(ref)
        for item in value.values():
            found |= _references(item)
    elif isinstance(value, list):
        for item in value:
            found |= _references(item)
    return found


def _rewrite(value: Any, mapping: dict[str, str]) -> Any:
    if isinstance(value, dict):
        out = {k: _rewrite(v, mapping) for k, v in value.items()}
        ref = out.get("reference")
        if isinstance(ref, str) and ref in mapping:
            out["reference"] = mapping[ref]
        return out
    if isinstance(value, list):
        return [_rewrite(item, mapping) for item in value]
    return value


def _parse(bundle: JsonDict) -> list[_Entry]:
    if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
        raise TransactionError("expected a Bundle of type transaction")
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries:
        raise TransactionError("the transaction has no entries")
    parsed: list[_Entry] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
            raise TransactionError(f"entry {index} has no resource")
        request = entry.get("request")
        if not isinstance(request, dict) or request.get("method") != "POST":
            raise TransactionError(f"entry {index}: only POST (create) entries are supported")
        resource = copy.deepcopy(entry["resource"])
        if request.get("url") != resource.get("resourceType"):
            raise TransactionError(f"entry {index}: request.url must be the resource type")
        full_url = entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None
        condition = request.get("ifNoneExist")
        parsed.append(
            _Entry(
                full_url=full_url,
                resource=resource,
                if_none_exist=condition if isinstance(condition, str) and condition else None,
                refs=_references(resource),
            )
        )
    full_urls = [e.full_url for e in parsed if e.full_url]
    if len(full_urls) != len(set(full_urls)):
        raise TransactionError("two entries share a fullUrl")
    return parsed


def process_transaction(store: FhirStore, bundle: JsonDict, base_url: str) -> JsonDict:
    """Create the entries in reference order; conditional creates match existing resources,
    so sending the same transaction twice creates nothing the second time."""
    entries = _parse(bundle)
    local = {e.full_url for e in entries if e.full_url}
    mapping: dict[str, str] = {}
    outcomes: dict[int, tuple[JsonDict, bool]] = {}
    pending = list(range(len(entries)))
    while pending:
        ready = [i for i in pending if not ((entries[i].refs & local) - set(mapping))]
        if not ready:
            raise TransactionError("the entries reference each other in a cycle")
        for index in ready:
            entry = entries[index]
            resource = _rewrite(entry.resource, mapping)
            if entry.if_none_exist:
                stored, created = store.conditional_create(resource, entry.if_none_exist)
            else:
                stored, created = store.create(resource), True
            outcomes[index] = (stored, created)
            if entry.full_url:
                mapping[entry.full_url] = f"{stored['resourceType']}/{stored['id']}"
            pending.remove(index)
    response_entries = []
    for index in range(len(entries)):
        stored, created = outcomes[index]
        location = f"{base_url}/{stored['resourceType']}/{stored['id']}"
        version = (stored.get("meta") or {}).get("versionId", "1")
        response_entries.append(
            {
                "fullUrl": location,
                "response": {
                    "status": "201 Created" if created else "200 OK",
                    "location": f"{location}/_history/{version}",
                },
            }
        )
    return {"resourceType": "Bundle", "type": "transaction-response", "entry": response_entries}
