"""Recognising chest imaging orders (any modality) by code and text, liberal about loose bundles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cds_service.orders import chest_orders, draft_order_resources, is_chest_imaging_order

DATA = Path(__file__).parent / "data" / "cds-hooks"


def order(
    system: str | None = None, code: str | None = None, text: str | None = None
) -> dict[str, Any]:
    concept: dict[str, Any] = {}
    if code:
        concept["coding"] = [{"system": system, "code": code}]
    if text:
        concept["text"] = text
    return {"resourceType": "ServiceRequest", "id": "o", "code": concept}


@pytest.mark.parametrize(
    "resource",
    [
        order("http://loinc.org", "36643-5"),
        order("http://loinc.org", "36554-4"),
        order("http://www.ama-assn.org/go/cpt", "71046"),
        order("urn:oid:2.16.840.1.113883.6.12", "71045"),
        order("http://snomed.info/sct", "399208008"),
        order(text="Chest X-ray PA and lateral"),
        order(text="XR CHEST 1 VIEW"),
        order(text="Portable CXR"),
        order(text="Radiograph of thorax"),
        # other modalities of the chest (public sandbox's PAMA Imaging tab orders chest CT)
        order("http://www.ama-assn.org/go/cpt", "71250"),
        order("http://www.ama-assn.org/go/cpt", "71271"),
        order("http://www.ama-assn.org/go/cpt", "71551"),
        order("http://loinc.org", "24627-2", "CT Chest"),
        order("http://snomed.info/sct", "169069000"),
        order(text="CT chest without contrast"),
        order(text="CT pulmonary angiogram"),
        order(text="MRI thorax with contrast"),
        order(text="PET/CT chest"),
        order(text="Low-dose CT lung cancer screening"),
    ],
)
def test_chest_imaging_orders_are_recognised(resource: dict[str, Any]) -> None:
    assert is_chest_imaging_order(resource)


@pytest.mark.parametrize(
    "resource",
    [
        order("http://www.ama-assn.org/go/cpt", "73030", "Shoulder x-ray"),
        order(text="Knee X-ray"),
        order("http://www.ama-assn.org/go/cpt", "72133", "Lumbar spine CT"),
        order("http://www.ama-assn.org/go/cpt", "74177", "CT abdomen and pelvis with contrast"),
        order(text="MRI brain"),
        order(text="CT head without contrast"),
        order(text="Ultrasound chest wall"),
        order("http://snomed.info/sct", "71045"),  # a CPT code under the wrong system
        {"resourceType": "MedicationRequest", "id": "m"},
    ],
)
def test_other_orders_are_not(resource: dict[str, Any]) -> None:
    assert not is_chest_imaging_order(resource)


def test_loose_shapes_of_draft_orders() -> None:
    cxr = order("http://loinc.org", "36643-5")
    assert draft_order_resources({"resourceType": "Bundle", "entry": [{"resource": cxr}]}) == [cxr]
    assert draft_order_resources([{"resource": cxr}]) == [cxr]
    assert draft_order_resources(cxr) == [cxr]
    assert draft_order_resources("junk") == []
    assert draft_order_resources({"resourceType": "Bundle", "entry": [None, {"x": 1}]}) == []


def test_selections_narrow_the_orders() -> None:
    cxr = {**order("http://loinc.org", "36643-5"), "id": "a"}
    knee = {**order(text="Knee X-ray"), "id": "b"}
    bundle = {"resourceType": "Bundle", "entry": [{"resource": cxr}, {"resource": knee}]}
    assert chest_orders({"draftOrders": bundle, "selections": ["ServiceRequest/b"]}) == []
    assert chest_orders({"draftOrders": bundle, "selections": ["ServiceRequest/a"]}) == [cxr]


def test_spec_example_order_select_has_no_chest_order() -> None:
    """The CDS Hooks spec's order-select example (diet + medication) is not a chest order."""
    request = json.loads((DATA / "order-select-request-R4.json").read_text())
    assert chest_orders(request["context"]) == []


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Chest single view", True),
        ("CHEST PORTABLE", True),
        ("XR chest for US patient", True),
        ("XR Thoracic spine 2 views", False),
        ("Troponin I - chest pain dx", False),
        ("Lung function test PA", False),
        ("XR ribs left 3 views", False),
        ("XR chest for chest pain", True),
        ("Pulmonary function test", False),
        ("CT thoracic spine", False),
        ("Echocardiogram", False),
        ("CT coronary angiography", False),
        # false positives of a bag-of-words matcher (independent review)
        ("CT head, history of chest pain", False),
        ("Pulmonary artery (PA) catheter insertion", False),
        ("Single lung transplant evaluation", False),
        ("Nuclear cardiac imaging for chest pain", False),
        ("CT abdomen pelvis; chest pain", False),
        ("CT chest abdomen pelvis with contrast", True),
        ("HRCT lungs", True),
        ("CT of the chest", True),
        # second review: missed chest orders, and symptoms that are not anatomy
        ("CXR post chest tube insertion", True),
        ("XR chest portable s/p central line insertion", True),
        ("CT chest for PE, history of head injury", True),
        ("Chest radiograph - cardiac size", True),
        ("Chest X ray", True),
        ("X ray chest", True),
        ("CTPA", True),
        ("Chest 2V", True),
        ("Chest 2 vw", True),
        ("CT CAP", True),
        ("CT chest with contrast, history of breast cancer", True),
        ("CT chest, eval spine mets", True),
        ("CT chest after rib fracture", True),
        ("XR Chest and ribs", True),
        ("XR chest 2 views", True),
        ("Chest X-ray PA/lateral", True),
        ("CT chest w/o contrast", True),
        ("CTA chest PE protocol", True),
        ("Portable chest", True),
        ("XR abdomen 2 views, chest pain", False),
        ("Chest pain, single dose aspirin", False),
        ("Ultrasound chest wall", False),
    ],
)
def test_order_words(text: str, expected: bool) -> None:
    assert is_chest_imaging_order(order(text=text)) is expected


def test_only_the_start_of_long_order_text_is_read() -> None:
    """Caller text is read for its first 256 characters only (no regex over megabytes)."""
    assert not is_chest_imaging_order(order(text="x " * 200 + "chest x-ray"))
    assert is_chest_imaging_order(order(text="chest x-ray " + "chest " * 100_000))
