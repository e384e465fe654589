"""Feedback on AI cards is stored per finding and exported as the site's review record."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

from cds_service.fhir.prefetch import PREFETCH_KEY
from tests.conftest import (
    SandboxHandle,
    ServiceHandle,
    analyse_seeded,
    patient_view_body,
)
from tests.conftest import (
    signed_post as post,
)

PV = "cxr-ai-patient-view"


def test_override_feedback_is_exported_with_its_finding(
    service: ServiceHandle, sandbox: SandboxHandle
) -> None:
    analyse_seeded(service, sandbox)
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": sandbox.studies[0]}],
    }
    cards = post(
        service,
        sandbox,
        PV,
        patient_view_body(fhirServer=sandbox.fhir, prefetch={PREFETCH_KEY: bundle}),
    ).json()
    card = cards["cards"][0]
    reasons = {r["code"]: r for r in card["overrideReasons"]}
    assert set(reasons) == {"finding-already-known", "disagree-with-ai", "image-quality"}
    assert all(r["display"] for r in reasons.values())
    item = {
        "card": card["uuid"],
        "outcome": "overridden",
        "overrideReason": {"reason": reasons["disagree-with-ai"], "userComment": "old scar"},
        "outcomeTimestamp": "2026-11-27T10:00:00Z",
    }
    assert post(service, sandbox, PV + "/feedback", {"feedback": [item]}).status_code == 200
    assert post(service, sandbox, PV + "/feedback", {"feedback": [item]}).json()["duplicates"] == 1

    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cds_service.cli",
            "feedback",
            "export",
            "--format",
            "csv",
            "--db",
            str(service.settings.database),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    [row] = list(csv.DictReader(io.StringIO(run.stdout)))
    uid = sandbox.studies[0]["identifier"][0]["value"].removeprefix("urn:oid:")
    assert row["study_uid"] == uid
    assert row["source"] == sandbox.fhir
    assert row["finding"] in {
        "Cardiomegaly",
        "Consolidation",
        "Pleural Effusion",
        "Pneumothorax",
        "no-major-finding",
    }
    assert row["ai_state"] in {"present", "uncertain", "absent"}
    assert row["outcome"] == "overridden"
    assert row["override_reason_code"] == "disagree-with-ai"
    assert row["user_comment"] == "old scar"
    assert "cxr-demo" not in run.stdout  # no patient identifiers in the export


def test_export_without_a_database_says_so(tmp_path: object) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "cds_service.cli", "feedback", "export", "--db", "/nonexistent.db"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "no database" in run.stderr


def test_export_fills_the_reason_display_from_the_offered_reasons() -> None:
    from cds_service.jobs.feedback_export import export_csv

    class Log:
        def feedback_rows(self) -> list[dict[str, object]]:
            def row(reason: dict[str, str]) -> dict[str, object]:
                item = {"card": "c", "outcome": "overridden", "overrideReason": {"reason": reason}}
                return {"received_at": "t", "service_id": PV, "body": json.dumps(item)}

            return [
                row({"code": "disagree-with-ai"}),  # the CDS Hooks sandbox sends the code alone
                row({"code": "image-quality", "system": "urn:other"}),  # not a reason we offered
                row({"code": "image-quality", "display": "As the EHR put it"}),
            ]

    out = io.StringIO()
    assert export_csv(Log(), out) == 3  # type: ignore[arg-type]
    displays = [r["override_reason_display"] for r in csv.DictReader(io.StringIO(out.getvalue()))]
    assert displays == ["Disagree with AI finding", "", "As the EHR put it"]
