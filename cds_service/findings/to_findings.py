"""Labeler output -> the Findings stored with an analysis (mentioned observations only)."""

from __future__ import annotations

from cds_service.findings.labeler import ObservationLabel, label_report
from cds_service.findings.observations import Label, Observation
from cds_service.results import Finding, FindingState

_STATES: dict[Label, FindingState] = {
    Label.POSITIVE: "present",
    Label.NEGATIVE: "absent",
    Label.UNCERTAIN: "uncertain",
}


def findings_from_labels(labels: dict[Observation, ObservationLabel]) -> tuple[Finding, ...]:
    """One Finding per mentioned observation, with the sentence that decided it.
    No Finding is left out: "no major finding" is decided from the other observations."""
    found = []
    for observation, label in labels.items():
        if observation is Observation.NO_FINDING or label.label is Label.NOT_MENTIONED:
            continue
        found.append(Finding(observation, _STATES[label.label], evidence=label.sentence or ""))
    return tuple(found)


def findings_from_report(text: str) -> tuple[Finding, ...]:
    return findings_from_labels(label_report(text))
