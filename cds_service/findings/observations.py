"""The vocabulary shared by the labeler, the evaluation set, FHIR mapping and cards."""

from __future__ import annotations

from enum import StrEnum


class Observation(StrEnum):
    """The 14 CheXpert observations (Irvin et al., AAAI 2019), named as CheXpert names them."""

    NO_FINDING = "No Finding"
    ENLARGED_CARDIOMEDIASTINUM = "Enlarged Cardiomediastinum"
    CARDIOMEGALY = "Cardiomegaly"
    LUNG_LESION = "Lung Lesion"
    LUNG_OPACITY = "Lung Opacity"
    EDEMA = "Edema"
    CONSOLIDATION = "Consolidation"
    PNEUMONIA = "Pneumonia"
    ATELECTASIS = "Atelectasis"
    PNEUMOTHORAX = "Pneumothorax"
    PLEURAL_EFFUSION = "Pleural Effusion"
    PLEURAL_OTHER = "Pleural Other"
    FRACTURE = "Fracture"
    SUPPORT_DEVICES = "Support Devices"


class Label(StrEnum):
    """What a report says about one observation."""

    POSITIVE = "positive"
    NEGATIVE = "negative"
    UNCERTAIN = "uncertain"
    NOT_MENTIONED = "not_mentioned"


# The major findings the cards flag and the FHIR output codes (SNOMED CT; STANDARDS.md lists
# them as "verify before relying on them").
# Lung Opacity has no code here: none could be verified, so it is coded by text only.
MAJOR_FINDINGS: dict[Observation, tuple[str | None, str]] = {
    Observation.PNEUMOTHORAX: ("36118008", "Pneumothorax"),
    Observation.PLEURAL_EFFUSION: ("60046008", "Pleural effusion"),
    Observation.CONSOLIDATION: ("95436008", "Lung consolidation"),
    Observation.PNEUMONIA: ("233604007", "Pneumonia"),
    Observation.EDEMA: ("19242006", "Pulmonary edema"),
    Observation.CARDIOMEGALY: ("8186001", "Cardiomegaly"),
    Observation.LUNG_OPACITY: (None, "Lung opacity"),
    Observation.ATELECTASIS: ("46621007", "Atelectasis"),
}
CRITICAL_FINDINGS = frozenset({Observation.PNEUMOTHORAX})
