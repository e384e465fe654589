"""Is this image a frontal chest radiograph the model was trained on? Decided from DICOM tags.

Accepted: Modality CR or DX (DX only "FOR PRESENTATION"), Body Part Examined CHEST / THORAX
or absent, View Position PA / AP or absent, and nothing in the descriptive tags saying lateral
or non-human (without View Position, a description naming both a frontal and a lateral view is
refused unless the View Code Sequence says frontal). Among several accepted images: PA first,
then the largest.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from cds_service.imaging.errors import NotAnalysable

RADIOGRAPH_MODALITIES = frozenset({"CR", "DX"})
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "LUNGS"})
FRONTAL_VIEWS = frozenset({"PA", "AP"})
LATERAL_VIEWS = frozenset({"LATERAL", "LAT", "LL", "RL", "LLD", "RLD", "LATERALE"})
_DESCRIPTIVE_TAGS = (
    "SeriesDescription",
    "ProtocolName",
    "AcquisitionDeviceProcessingDescription",
)
_LATERAL_WORDS = re.compile(r"\b(lateral|lat)\b", re.IGNORECASE)
_FRONTAL_WORDS = re.compile(
    r"\b(pa|ap|frontal|postero-?anterior|antero-?posterior)\b", re.IGNORECASE
)
_ANIMAL_WORDS = re.compile(
    r"\b(canine|feline|equine|bovine|porcine|murine|dog|cat|horse|veterinary)\b", re.IGNORECASE
)
LATERAL_REASON = "lateral view"
VIEW_NOT_STATED_REASON = "view not stated (the description names frontal and lateral views)"
NOT_CHEST_REASON = "not a chest image"


@dataclass(frozen=True)
class Selection:
    """The decision for one image: analysable or not, why, and how to rank it."""

    analysable: bool
    reason: str
    modality: str = ""
    body_part: str = ""
    view_position: str = ""
    pixels: int = 0

    @property
    def rank(self) -> tuple[int, int]:
        """Higher is better: PA before AP / unstated, then more pixels."""
        return (1 if self.view_position == "PA" else 0, self.pixels)

    def to_json(self) -> dict[str, Any]:
        return {
            "analysable": self.analysable,
            "reason": self.reason,
            "modality": self.modality,
            "body_part": self.body_part,
            "view_position": self.view_position,
        }


def _text(dataset: Dataset, keyword: str) -> str:
    try:
        return str(dataset.get(keyword, "") or "").strip()
    except Exception:  # noqa: BLE001 - a malformed descriptive tag must not break selection
        return ""


def _view_code_meanings(dataset: Dataset) -> list[str]:
    meanings: list[str] = []
    try:
        for item in dataset.get("ViewCodeSequence", []) or []:
            meanings.append(str(item.get("CodeMeaning", "")))
    except Exception:  # noqa: BLE001
        return []
    return meanings


def _view_named_in(texts: Sequence[str]) -> str | None:
    """Which views the words of `texts` name: "lateral", "frontal", "both" or None."""
    text = " ".join(texts)
    lateral, frontal = bool(_LATERAL_WORDS.search(text)), bool(_FRONTAL_WORDS.search(text))
    if lateral and frontal:
        return "both"
    return "lateral" if lateral else "frontal" if frontal else None


def _unstated_view_reason(descriptions: Sequence[str], view_codes: Sequence[str]) -> str | None:
    """Without View Position: the View Code Sequence decides when it names one view; else the
    descriptions, but a frontal word counts only when no lateral word is there too ("CHEST PA
    AND LAT" may be the lateral film of a two-view series)."""
    coded = _view_named_in(view_codes)
    if coded == "frontal":
        return None
    if coded == "lateral":
        return LATERAL_REASON
    described = _view_named_in(descriptions)
    if described == "lateral":
        return LATERAL_REASON
    if described == "both" or coded == "both":
        return VIEW_NOT_STATED_REASON
    return None


def decide(
    modality: str,
    body_part: str,
    view_position: str,
    descriptions: Sequence[str] = (),
    view_codes: Sequence[str] = (),
) -> str | None:
    """The reason an image is not a frontal chest radiograph, or None when it is one.
    `view_codes` are the View Code Sequence's code meanings."""
    modality, body_part = modality.upper(), body_part.upper()
    view = view_position.upper()
    if modality not in RADIOGRAPH_MODALITIES:
        return f"modality {modality}" if modality else "modality not stated"
    text = " ".join([*descriptions, *view_codes])
    if view in LATERAL_VIEWS:
        return LATERAL_REASON
    if not view:
        unstated = _unstated_view_reason(descriptions, view_codes)
        if unstated is not None:
            return unstated
    if view and view not in FRONTAL_VIEWS:
        return f"{view} view (not frontal)"
    if body_part and body_part not in CHEST_BODY_PARTS:
        return NOT_CHEST_REASON
    if _ANIMAL_WORDS.search(text):
        return "not a human chest image"
    return None


def select_dataset(dataset: Dataset) -> Selection:
    """The decision for one DICOM header (pixels need not be loaded)."""
    modality = _text(dataset, "Modality")
    body_part = _text(dataset, "BodyPartExamined")
    view = _text(dataset, "ViewPosition")
    descriptions = [_text(dataset, k) for k in _DESCRIPTIVE_TAGS]
    species = _text(dataset, "PatientSpeciesDescription")
    reason = decide(modality, body_part, view, descriptions, _view_code_meanings(dataset))
    if reason is None and species and species.lower() not in ("homo sapiens", "human"):
        reason = "not a human chest image"
    intent = _text(dataset, "PresentationIntentType").upper()
    if reason is None and modality.upper() == "DX" and intent == "FOR PROCESSING":
        reason = "DX image for processing (not for presentation)"
    try:
        size = int(dataset.get("Rows", 0) or 0) * int(dataset.get("Columns", 0) or 0)
    except (TypeError, ValueError):
        size = 0
    return Selection(
        analysable=reason is None,
        reason=reason or "frontal chest radiograph",
        modality=modality.upper(),
        body_part=body_part.upper(),
        view_position=view.upper(),
        pixels=size,
    )


def require_frontal_chest(selection: Selection) -> None:
    if not selection.analysable:
        raise NotAnalysable(selection.reason)


def best(selections: Iterable[tuple[Selection, Any]]) -> Any:
    """The item of the best analysable selection; NotAnalysable with the reasons otherwise."""
    items = list(selections)
    usable = [item for item in items if item[0].analysable]
    if usable:
        return max(usable, key=lambda item: item[0].rank)[1]
    reasons = list(dict.fromkeys(selection.reason for selection, _ in items))
    if not reasons:
        raise NotAnalysable("no image in the study")
    raise NotAnalysable("; ".join(reasons))
