"""Decide whether a hook's draft orders include a chest imaging order (codes, then words).

Any modality counts (radiograph, CT, MR, PET of the chest): whoever orders chest imaging
should see what the AI flagged on the patient's recent chest radiographs. Imaging of other
body parts, and orders that only mention the chest (troponin for chest pain), do not count.
"""

from __future__ import annotations

import re
from typing import Any

from cds_service.fhir.shapes import as_dict, as_list, codings, concept_texts, dicts

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
CPT_SYSTEMS = frozenset({"http://www.ama-assn.org/go/cpt", "urn:oid:2.16.840.1.113883.6.12"})

# Chest imaging order codes (STANDARDS.md; CPT descriptors from the AMA code set). CPT
# 71010/71020 were retired in 2018 but still appear in older order catalogues. Codes not
# listed here are still recognised by their text ("PET/CT chest", "MRI thorax").
CHEST_IMAGING_CODES: dict[str, frozenset[str]] = {
    LOINC: frozenset(
        {
            "36643-5",  # XR Chest 2 Views
            "36554-4",  # XR Chest Single view
            "24648-8",  # XR Chest PA upright
            "36572-6",  # XR Chest PA and Lateral (older catalogues)
            "24627-2",  # CT Chest
            "29252-4",  # CT Chest WO contrast
        }
    ),
    SNOMED: frozenset({"399208008", "169069000"}),  # plain chest X-ray; CT of chest
    "cpt": frozenset(
        {
            "71045", "71046", "71047", "71048", "71010", "71020",  # radiographs
            "71250", "71260", "71270",  # CT thorax without / with / without and with contrast
            "71271",  # CT thorax, low dose, lung cancer screening
            "71275",  # CT angiography, chest
            "71550", "71551", "71552",  # MRI chest
            "71555",  # MR angiography, chest
        }
    ),
}  # fmt: skip

# Order text is matched word by word (no backtracking regex over caller text), and only its
# first MAX_TEXT characters are read.
MAX_TEXT = 256
WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)?")
# A chest word and an imaging word must stand within NEAR words of each other ("CT of the
# chest" but not "CT head, history of chest pain"). Strong chest words pair with a modality
# within NEAR words, or with a view word right beside them ("chest PA", "portable chest");
# "lung" and "pulmonary" only with a modality ("CT pulmonary angiogram", not "pulmonary artery
# (PA) catheter"). "Chest pain" names a symptom, not the body part imaged.
NEAR = 2
# Not counted in the distance: articles and bare numbers ("Chest 2 vw").
FILLER_WORDS = frozenset({"of", "the", "a", "an"})
CHEST_WORDS = frozenset({"chest", "thorax", "thoracic"})
LUNG_WORDS = frozenset({"lung", "lungs", "pulmonary"})
SYMPTOM_WORDS = frozenset({"pain", "tightness", "discomfort"})  # "chest pain" is not anatomy
# Order names that say chest imaging on their own.
SELF_SUFFICIENT = frozenset({"cxr", "ctpa"})
MODALITY_WORDS = frozenset(
    {
        "xray", "xr", "radiograph", "radiographs", "radiography", "radiographic", "film",
        "films", "ct", "cta", "computed", "tomography", "hrct", "ldct", "mri", "mr", "mra",
        "magnetic", "pet", "pet-ct", "imaging", "scan", "angiogram", "angiography",
    }
)  # fmt: skip
VIEW_WORDS = frozenset(
    {"portable", "view", "views", "vw", "2v", "pa", "ap", "lateral", "single", "frontal"}
)
# Words that, right beside the chest word, make the order about something else: a structure
# of the chest wall or spine, or an examination that is not imaging of the lungs.
OTHER_WORDS = frozenset(
    {
        "spine", "vertebra", "vertebrae", "rib", "ribs", "sternum", "clavicle", "shoulder",
        "breast", "wall", "ultrasound", "sonography", "echo", "echocardiogram", "nuclear",
        "function", "fluoroscopy", "biopsy", "physiotherapy",
    }
)  # fmt: skip


def _words(text: str) -> list[str]:
    """Lower-case words without fillers; "x ray" and "x-ray" become "xray", "ct cap" (chest,
    abdomen, pelvis) becomes "ct chest"."""
    raw = [w for w in WORD.findall(text[:MAX_TEXT].lower()) if w not in FILLER_WORDS]
    words: list[str] = []
    for word in raw:
        if word.isdigit():
            continue
        if word == "x-ray" or (word == "ray" and words and words[-1] == "x"):
            if word == "ray":
                words.pop()
            word = "xray"
        elif word == "cap" and words and words[-1] == "ct":
            word = "chest"
        words.append(word)
    return words


def _names_chest_imaging(words: list[str], at: int) -> bool:
    word = words[at]
    after = words[at + 1] if at + 1 < len(words) else ""
    if word in CHEST_WORDS and after in SYMPTOM_WORDS:
        return False
    beside = set(words[max(0, at - 1) : at + 2])
    if beside & OTHER_WORDS:
        return False
    near = set(words[max(0, at - NEAR) : at + NEAR + 1])
    if near & MODALITY_WORDS:
        return True
    return word in CHEST_WORDS and bool(beside & VIEW_WORDS)


def text_is_chest_imaging(text: str) -> bool:
    words = _words(text)
    if SELF_SUFFICIENT.intersection(words):
        return True
    return any(
        _names_chest_imaging(words, at)
        for at, word in enumerate(words)
        if word in CHEST_WORDS or word in LUNG_WORDS
    )


def is_chest_imaging_order(resource: dict[str, Any]) -> bool:
    """True for a ServiceRequest-like resource ordering imaging of the chest (any modality)."""
    for coding in codings(resource.get("code")):
        system = str(coding.get("system", "")).rstrip("/")
        code = str(coding.get("code", "")).strip()
        key = "cpt" if system in CPT_SYSTEMS else system
        if code in CHEST_IMAGING_CODES.get(key, frozenset()):
            return True
    return any(text_is_chest_imaging(text) for text in concept_texts(resource.get("code")))


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
    """Chest imaging orders among the draft orders (only the selected ones, when given)."""
    orders = draft_order_resources(context.get("draftOrders"))
    selections = as_list(context.get("selections"))
    if selections:
        wanted = {str(s) for s in selections}
        selected = [o for o in orders if f"{o.get('resourceType')}/{o.get('id')}" in wanted]
        orders = selected or orders
    return [o for o in orders if is_chest_imaging_order(o)]
