"""Interoperability: the FHIR R4 resources we write pass validators that share no code with us.

tests/interop/fhir_checker/check.mjs runs FHIR.js (npm `fhir`: R4 definitions, required value
sets, unexpected elements) and the official FHIR R4 JSON schema (with ajv) over the resources
and the write-back transaction Bundle. Both run offline once `npm ci` has installed them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cds_service.fhir_out.bundle import transaction_bundle
from cds_service.findings.observations import Observation
from cds_service.results import Finding
from tests.interop.npm import ensure_installed
from tests.test_fhir_resources import DEVICE, analysis, build, chest_study

CHECKER_DIR = Path(__file__).parent / "fhir_checker"
NODE_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def checker() -> Path:
    """The checker with its locked dependencies installed (`npm ci` on a fresh clone)."""
    ensure_installed(CHECKER_DIR, "fhir", "FHIR interoperability tests")
    return CHECKER_DIR / "check.mjs"


def run_checker(checker: Path, resources: list[dict[str, Any]], tmp_path: Path) -> list[Any]:
    node = shutil.which("node")
    assert node
    source = tmp_path / "resources.json"
    source.write_text(json.dumps(resources), encoding="utf-8")
    # The --name=value form keeps a path starting with '-' a value.
    run = subprocess.run(
        [node, str(checker), f"--input={source}"],
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_S,
    )
    assert run.returncode == 0, f"checker failed ({run.returncode}):\n{run.stdout}\n{run.stderr}"
    results: list[Any] = json.loads(run.stdout)["results"]
    assert len(results) == len(resources)
    return results


def everything_we_write() -> list[dict[str, Any]]:
    """Real and simulated reports, with and without findings, and their transaction Bundles."""
    real = build()
    simulated = build(device=dataclasses.replace(DEVICE, simulated=True))
    quiet = build(
        analysis((Finding(Observation.PNEUMOTHORAX, "absent", "No pneumothorax."),)),
        study=chest_study(instances=2, started=None),
    )
    resources: list[dict[str, Any]] = []
    for built in (real, simulated, quiet):
        resources += [*built.all(), transaction_bundle(built)]
    return resources


def test_every_resource_passes_both_independent_validators(checker: Path, tmp_path: Path) -> None:
    resources = everything_we_write()
    results = run_checker(checker, resources, tmp_path)
    kinds = {r["resourceType"] for r in results}
    assert kinds == {"DiagnosticReport", "Observation", "Device", "Provenance", "Bundle"}
    for resource, result in zip(resources, results, strict=True):
        assert result["resourceType"] == resource["resourceType"]
        assert result["fhirjs"]["errors"] == [], result
        assert result["fhirjs"]["valid"] is True, result
        assert result["schema"] == {"valid": True, "errors": []}, result


def test_the_validators_do_catch_what_we_must_never_write(checker: Path, tmp_path: Path) -> None:
    """The checker is not a rubber stamp: broken copies fail in each validator."""
    report = build().diagnostic_report
    bad_status = {**copy.deepcopy(report), "status": "draft"}
    bad_instant = {**copy.deepcopy(report), "issued": "2024-03-01"}
    r5_element = {**copy.deepcopy(report), "study": [{"reference": "ImagingStudy/cxr-1"}]}
    empty_text = {**copy.deepcopy(report), "conclusion": ""}
    results = run_checker(checker, [bad_status, bad_instant, r5_element, empty_text], tmp_path)
    status, instant, r5, empty = results
    assert not status["fhirjs"]["valid"] and not status["schema"]["valid"]
    assert any("status" in e for e in status["fhirjs"]["errors"])
    assert not instant["schema"]["valid"]
    assert any(".issued" in e for e in instant["schema"]["errors"])
    assert not r5["fhirjs"]["valid"] and not r5["schema"]["valid"]
    assert not empty["schema"]["valid"]
