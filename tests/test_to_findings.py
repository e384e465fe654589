"""From labels to stored findings: the simulated backend goes through the real labeler."""

from __future__ import annotations

from cds_service.findings.observations import Observation
from cds_service.findings.to_findings import findings_from_report
from cds_service.inference.simulated import SimulatedBackend


def test_mentioned_observations_become_findings_with_evidence() -> None:
    findings = {
        f.key: f
        for f in findings_from_report(
            "Small left pleural effusion. No pneumothorax. Possible early consolidation."
        )
    }
    assert findings[Observation.PLEURAL_EFFUSION].state == "present"
    assert findings[Observation.PLEURAL_EFFUSION].evidence == "Small left pleural effusion."
    assert findings[Observation.PNEUMOTHORAX].state == "absent"
    assert findings[Observation.CONSOLIDATION].state == "uncertain"
    assert Observation.NO_FINDING not in findings
    assert Observation.FRACTURE not in findings


def test_simulated_results_are_labelled_from_their_text() -> None:
    backend = SimulatedBackend()
    seen_states = set()
    for index in range(40):
        result = backend.analyse(f"1.2.826.0.1.{index}", {"resourceType": "ImagingStudy"})
        assert result.report_text.startswith("SIMULATED")
        for finding in result.findings:
            assert finding.evidence in result.report_text
            seen_states.add((finding.key, finding.state))
    assert (Observation.PNEUMOTHORAX, "present") in seen_states
    assert (Observation.PNEUMOTHORAX, "absent") in seen_states
