"""The sandbox's CDS client prints any service's answer without crashing."""

from __future__ import annotations

from typing import Any

import pytest

from ehr_sandbox.cds_client import HookCall, format_cards, render_template


@pytest.mark.parametrize(
    "response",
    [
        {"cards": [{"summary": "s"}]},
        {"cards": [1, None, {"source": "x", "links": "y"}]},
        {"cards": "none"},
        ["not", "an", "object"],
        "plain text",
    ],
)
def test_format_cards_tolerates_non_conformant_services(response: Any) -> None:
    text = format_cards(HookCall("http://svc/cds-services/x", {}, 200, response))
    assert text.startswith("== http://svc/cds-services/x -> HTTP 200")


def test_format_cards_shows_a_conformant_card() -> None:
    card = {
        "summary": "AI flags effusion",
        "indicator": "warning",
        "source": {"label": "M"},
        "links": [{"label": "Open", "url": "https://app", "type": "smart"}],
    }
    text = format_cards(HookCall("u", {}, 200, {"cards": [card]}))
    assert "[WARNING ] AI flags effusion" in text and "link (smart): Open -> https://app" in text


def test_prefetch_tokens() -> None:
    context = {"patientId": "p1", "userId": "Practitioner/u9", "draftOrders": {"x": 1}}
    assert render_template("Patient/{{context.patientId}}", context) == "Patient/p1"
    assert render_template("X?p={{userPractitionerId}}", context) == "X?p=u9"
    assert render_template("X?e={{context.encounterId}}", context) is None
    assert render_template("X?d={{context.draftOrders}}", context) is None
