"""FHIR R4 transaction Bundles for the sandbox: POST entries (conditional or not), urn:uuid refs."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ehr_sandbox.fhir.store import FhirStore

JsonDict = dict[str, Any]
MAX_ENTRIES = 1000


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
    if len(entries) > MAX_ENTRIES:
        raise TransactionError(f"a transaction may hold at most {MAX_ENTRIES} entries")
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


def _order(entries: list[_Entry]) -> list[int]:
    """Entries in an order where every referenced entry comes first (Kahn's algorithm)."""
    index_of = {e.full_url: i for i, e in enumerate(entries) if e.full_url}
    needs = [{index_of[r] for r in e.refs if r in index_of} for e in entries]
    users: list[list[int]] = [[] for _ in entries]
    for index, deps in enumerate(needs):
        for dep in deps:
            users[dep].append(index)
    waiting = [len(deps) for deps in needs]
    ready = [i for i, count in enumerate(waiting) if count == 0]
    order: list[int] = []
    while ready:
        index = ready.pop()
        order.append(index)
        for user in users[index]:
            waiting[user] -= 1
            if waiting[user] == 0:
                ready.append(user)
    if len(order) != len(entries):
        raise TransactionError("the entries reference each other in a cycle")
    return order


def process_transaction(
    store: FhirStore,
    bundle: JsonDict,
    base_url: str,
    keep: Callable[[JsonDict], bool] | None = None,
) -> JsonDict:
    """Create the entries in reference order; conditional creates match existing resources
    (only those `keep` accepts), so sending the same transaction twice creates nothing the
    second time. All or nothing:
    when an entry fails, the resources this transaction created are deleted again, and
    subscribers hear of the creations only once every entry has been stored."""
    entries = _parse(bundle)
    mapping: dict[str, str] = {}
    outcomes: dict[int, tuple[JsonDict, bool]] = {}
    created: list[JsonDict] = []
    with store.held_changes():
        try:
            for index in _order(entries):
                entry = entries[index]
                resource = _rewrite(entry.resource, mapping)
                if entry.if_none_exist:
                    stored, is_new = store.conditional_create(resource, entry.if_none_exist, keep)
                else:
                    stored, is_new = store.create(resource), True
                if is_new:
                    created.append(stored)
                outcomes[index] = (stored, is_new)
                if entry.full_url:
                    mapping[entry.full_url] = f"{stored['resourceType']}/{stored['id']}"
        except Exception:
            for resource in reversed(created):
                store.delete(resource["resourceType"], resource["id"])
            raise
    response_entries = []
    for index in range(len(entries)):
        stored, is_new = outcomes[index]
        location = f"{base_url}/{stored['resourceType']}/{stored['id']}"
        version = (stored.get("meta") or {}).get("versionId", "1")
        response_entries.append(
            {
                "fullUrl": location,
                "response": {
                    "status": "201 Created" if is_new else "200 OK",
                    "location": f"{location}/_history/{version}",
                },
            }
        )
    return {"resourceType": "Bundle", "type": "transaction-response", "entry": response_entries}
