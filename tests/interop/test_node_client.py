"""Interoperability: an independent Node.js CDS Hooks 2.0 client against the real service.

The client (tests/interop/node_cds_client/client.mjs) is written from the CDS Hooks 2.0 spec
with the `jose` npm package and shares no code with the project: it signs its own ES384 JWTs,
computes prefetch from the discovery templates, and validates responses by itself. Requirement
IDs refer to ../shared/standards/cds-hooks-2.0-service-requirements.csv.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ehr_sandbox.app import SANDBOX_CLIENT_ID
from tests.conftest import SandboxHandle, ServiceHandle, analyse_seeded
from tests.interop.npm import ensure_installed

CLIENT_DIR = Path(__file__).parent / "node_cds_client"
PATIENT = "cxr-demo-1"
NODE_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def node_client() -> Path:
    """The client with its locked dependencies installed (`npm ci` on a fresh clone)."""
    ensure_installed(CLIENT_DIR, "jose", "CDS Hooks interoperability tests")
    return CLIENT_DIR / "client.mjs"


def run_client(
    client: Path, scenario: str, service: ServiceHandle, sandbox: SandboxHandle
) -> dict[str, Any]:
    node = shutil.which("node")
    assert node
    options = {
        "scenario": scenario,
        "service": service.base,
        "fhir": sandbox.fhir,
        "patient": PATIENT,
        "key": str(sandbox.sandbox.settings.signing_key_file),
        "iss": sandbox.base,
        # An access token may start with '-': the --name=value form keeps it a value.
        "token": sandbox.token(PATIENT),
        "subject": SANDBOX_CLIENT_ID,
        "scope": "patient/ImagingStudy.rs",
    }
    args = [node, str(client), *(f"--{name}={value}" for name, value in options.items())]
    run = subprocess.run(args, capture_output=True, text=True, timeout=NODE_TIMEOUT_S)
    assert run.returncode == 0, f"client failed ({run.returncode}):\n{run.stdout}\n{run.stderr}"
    result: dict[str, Any] = json.loads(run.stdout)
    assert result["scenario"] == scenario
    return result


def test_discovery_is_valid_for_an_independent_client(
    node_client: Path, service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    """Reqs 3-13, 36, 55-59, checked by the Node client's own validator."""
    result = run_client(node_client, "discovery", service, sandbox)
    assert result["status"] == 200
    assert result["problems"] == []
    assert result["valid"] is True
    hooks = sorted(s["hook"] for s in result["services"])
    assert hooks == ["order-select", "order-sign", "patient-view"]


def test_patient_view_cards_pass_the_independent_validator(
    node_client: Path, service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    """Reqs 3, 74, 80-147: cards computed from the client's own prefetch."""
    analyse_seeded(service, sandbox)
    result = run_client(node_client, "patient-view", service, sandbox)
    assert result["status"] == 200, result
    assert result["problems"] == []
    assert result["sentPrefetchKeys"], result["prefetch"]
    assert all(p["status"] == 200 for p in result["prefetch"].values())
    assert len(result["cards"]) >= 1
    assert all(card["summary"].startswith("SIMULATED") for card in result["cards"])


def test_order_select_with_a_cpt_coded_draft_order(
    node_client: Path, service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    """A CPT 71046 ServiceRequest in draftOrders (Bundle, type collection) gets prior findings."""
    analyse_seeded(service, sandbox)
    result = run_client(node_client, "order-select", service, sandbox)
    assert result["status"] == 200, result
    assert result["problems"] == []
    assert len(result["cards"]) >= 1
    assert all(card["summary"].startswith("SIMULATED: Prior ") for card in result["cards"])


def test_forged_and_replayed_client_jwts_are_refused(
    node_client: Path, service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    """Reqs 176, 195, 201, 203: JWTs made by another JOSE library."""
    result = run_client(node_client, "attacks", service, sandbox)
    assert result["results"], result
    refused = {name: status for name, status in result["results"].items() if status == 401}
    assert refused == result["results"]
    assert {
        "no_authorization",
        "alg_none",
        "hs256_public_jwk_as_secret",
        "wrong_aud_discovery_url",
        "expired",
        "foreign_key_same_kid",
    } <= set(refused)
    assert result["replay"] == {"first": 200, "second": 401}


def test_cors_preflight_without_a_jwt(
    node_client: Path, service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    """Req 208: a browser-based client's preflight succeeds without Authorization."""
    result = run_client(node_client, "cors", service, sandbox)
    assert result["problems"] == []
    assert len(result["results"]) == 3
    for preflight in result["results"]:
        assert 200 <= preflight["status"] < 300, preflight
        allowed = preflight["headers"]["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "content-type" in allowed
