"""Decide whether a hook's draft orders include a chest radiograph order (codes, then text)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
CPT_SYSTEMS = frozenset({"http://www.ama-assn.org/go/cpt", "urn:oid:2.16.840.1.113883.6.12"})

# Chest radiograph order codes (STANDARDS.md). CPT 71010/71020 were retired in 2018 but still
# appear in older order catalogues.
CHEST_RADIOGRAPH_CODES: dict[str, frozenset[str]] = {
    LOINC: frozenset({"36643-5", "36554-4", "24648-8", "36572-6"}),
    SNOMED: frozenset({"399208008"}),
    "cpt": frozenset({"71045", "71046", "71047", "71048", "71010", "71020"}),
}

_CHEST = r"(chest|thorax|thoracic|lungs?)"
_RADIOGRAPH = r"(x-?ray|xr|radiograph\w*|film|plain film|cr|dx|pa|ap)"
_TEXT_PATTERNS = (
    re.compile(rf"\b{_CHEST}\b.*\b{_RADIOGRAPH}\b", re.IGNORECASE),
    re.compile(rf"\b{_RADIOGRAPH}\b.*\b{_CHEST}\b", re.IGNORECASE),
    re.compile(r"\bcxr\b", re.IGNORECASE),
)
_NOT_RADIOGRAPH = re.compile(r"\b(ct|computed tomography|mri?|magnetic|pet|ultrasound|us)\b", re.I)


def _codings(resource: dict[str, Any]) -> Iterator[dict[str, Any]]:
    code = resource.get("code")
    if isinstance(code, dict):
        for coding in code.get("coding") or []:
            if isinstance(coding, dict):
                yield coding


def _texts(resource: dict[str, Any]) -> Iterator[str]:
    code = resource.get("code")
    if isinstance(code, dict):
        if isinstance(code.get("text"), str):
            yield code["text"]
        for coding in _codings(resource):
            if isinstance(coding.get("display"), str):
                yield coding["display"]


def is_chest_radiograph_order(resource: dict[str, Any]) -> bool:
    """True for a ServiceRequest-like resource ordering a chest radiograph."""
    for coding in _codings(resource):
        system = str(coding.get("system", "")).rstrip("/")
        code = str(coding.get("code", "")).strip()
        key = "cpt" if system in CPT_SYSTEMS else system
        if code in CHEST_RADIOGRAPH_CODES.get(key, frozenset()):
            return True
    for text in _texts(resource):
        if _NOT_RADIOGRAPH.search(text):
            continue
        if any(pattern.search(text) for pattern in _TEXT_PATTERNS):
            return True
    return False


def draft_order_resources(draft_orders: Any) -> list[dict[str, Any]]:
    """Resources in `draftOrders`, liberal about Bundles without `type` or bare lists."""
    if isinstance(draft_orders, dict) and draft_orders.get("resourceType") == "Bundle":
        entries = draft_orders.get("entry") or []
        items = [e.get("resource") for e in entries if isinstance(e, dict)]
    elif isinstance(draft_orders, list):
        items = [e.get("resource", e) if isinstance(e, dict) else None for e in draft_orders]
    elif isinstance(draft_orders, dict) and "resourceType" in draft_orders:
        items = [draft_orders]
    else:
        items = []
    return [r for r in items if isinstance(r, dict)]


def chest_orders(context: dict[str, Any]) -> list[dict[str, Any]]:
    """Chest radiograph orders among the draft orders (only the selected ones, when given)."""
    orders = draft_order_resources(context.get("draftOrders"))
    selections = context.get("selections")
    if isinstance(selections, list) and selections:
        wanted = {str(s) for s in selections}
        selected = [o for o in orders if f"{o.get('resourceType')}/{o.get('id')}" in wanted]
        orders = selected or orders
    return [o for o in orders if is_chest_radiograph_order(o)]
