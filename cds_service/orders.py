"""Decide whether a hook's draft orders include a chest radiograph order (codes, then words)."""

from __future__ import annotations

import re
from typing import Any

from cds_service.fhir.shapes import as_dict, as_list, codings, concept_texts, dicts

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

# Order text is matched word by word (no backtracking regex over caller text), and only its
# first MAX_TEXT characters are read.
MAX_TEXT = 256
WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)?")
CHEST_WORDS = frozenset({"chest", "thorax", "cxr"})
RADIOGRAPH_WORDS = frozenset(
    {
        "x-ray",
        "xray",
        "xr",
        "radiograph",
        "radiographs",
        "radiography",
        "radiographic",
        "film",
        "films",
        "portable",
        "view",
        "views",
        "pa",
        "ap",
        "lateral",
        "single",
        "cxr",
    }
)
# Words that make an order something else: another modality, or a structure of the chest wall.
OTHER_WORDS = frozenset(
    {
        "ct",
        "cta",
        "computed",
        "tomography",
        "mri",
        "mr",
        "magnetic",
        "pet",
        "ultrasound",
        "sonography",
        "echo",
        "echocardiogram",
        "spine",
        "rib",
        "ribs",
        "sternum",
        "pain",
        "troponin",
        "function",
        "fluoroscopy",
    }
)


def _words(text: str) -> set[str]:
    return set(WORD.findall(text[:MAX_TEXT].lower()))


def text_is_chest_radiograph(text: str) -> bool:
    words = _words(text)
    if words & OTHER_WORDS:
        return False
    if "cxr" in words:
        return True
    return bool(words & CHEST_WORDS) and bool(words & RADIOGRAPH_WORDS)


def is_chest_radiograph_order(resource: dict[str, Any]) -> bool:
    """True for a ServiceRequest-like resource ordering a chest radiograph."""
    for coding in codings(resource.get("code")):
        system = str(coding.get("system", "")).rstrip("/")
        code = str(coding.get("code", "")).strip()
        key = "cpt" if system in CPT_SYSTEMS else system
        if code in CHEST_RADIOGRAPH_CODES.get(key, frozenset()):
            return True
    return any(text_is_chest_radiograph(text) for text in concept_texts(resource.get("code")))


def draft_order_resources(draft_orders: Any) -> list[dict[str, Any]]:
    """Resources in `draftOrders`, liberal about Bundles without `type` or bare lists."""
    if isinstance(draft_orders, dict) and draft_orders.get("resourceType") == "Bundle":
        items = [as_dict(e.get("resource")) for e in dicts(draft_orders.get("entry"))]
    elif isinstance(draft_orders, list):
        items = [as_dict(e.get("resource", e)) for e in dicts(draft_orders)]
    elif isinstance(draft_orders, dict) and "resourceType" in draft_orders:
        items = [draft_orders]
    else:
        items = []
    return [r for r in items if r]


def chest_orders(context: dict[str, Any]) -> list[dict[str, Any]]:
    """Chest radiograph orders among the draft orders (only the selected ones, when given)."""
    orders = draft_order_resources(context.get("draftOrders"))
    selections = as_list(context.get("selections"))
    if selections:
        wanted = {str(s) for s in selections}
        selected = [o for o in orders if f"{o.get('resourceType')}/{o.get('id')}" in wanted]
        orders = selected or orders
    return [o for o in orders if is_chest_radiograph_order(o)]
