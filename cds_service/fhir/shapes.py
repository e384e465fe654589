"""Lenient readers for caller-supplied FHIR JSON: a wrong type at any depth reads as absent."""

from __future__ import annotations

from typing import Any


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def as_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def dicts(value: Any) -> list[dict[str, Any]]:
    """The objects in a JSON array (anything else in it, or a non-array, is skipped)."""
    return [item for item in as_list(value) if isinstance(item, dict)]


def codings(concept: Any) -> list[dict[str, Any]]:
    """The Codings of a CodeableConcept, or the Coding itself when given a bare Coding."""
    concept = as_dict(concept)
    if "coding" in concept:
        return dicts(concept["coding"])
    return [concept] if "code" in concept else []


def concept_texts(concept: Any) -> list[str]:
    """`text` and every coding `display` of a CodeableConcept (or a Coding)."""
    concept = as_dict(concept)
    texts = [concept["text"]] if as_str(concept.get("text")) else []
    texts += [c["display"] for c in codings(concept) if as_str(c.get("display"))]
    return texts
