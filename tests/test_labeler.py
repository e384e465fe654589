"""The rule-based report labeler: mentions, negation, uncertainty, lists, sections, aggregation."""

from __future__ import annotations

import random
import re

import pytest

from cds_service.findings.labeler import ObservationLabel, label_report, labels_as_json
from cds_service.findings.observations import Label, Observation
from cds_service.findings.sentences import MAX_SENTENCE_CHARS, split_sentences

Obs = Observation
P, N, U, M = Label.POSITIVE, Label.NEGATIVE, Label.UNCERTAIN, Label.NOT_MENTIONED

# (report text, the labels it must get; observations not listed are not checked)
CASES: list[tuple[str, dict[Observation, Label]]] = [
    # --- mentions, synonyms and misspellings ---------------------------------------------
    ("Small right apical pneumothorax.", {Obs.PNEUMOTHORAX: P}),
    ("Tiny left PTX along the lateral chest wall.", {Obs.PNEUMOTHORAX: P}),
    ("Moderate left pnuemothorax, larger than before.", {Obs.PNEUMOTHORAX: P}),
    ("Bilateral pneumothoraces after the procedure.", {Obs.PNEUMOTHORAX: P}),
    (
        "Right hydropneumothorax with an air-fluid level.",
        {Obs.PNEUMOTHORAX: P, Obs.PLEURAL_EFFUSION: P},
    ),
    ("Layering left pleural effusion.", {Obs.PLEURAL_EFFUSION: P}),
    ("Trace pleural fluid at the right base.", {Obs.PLEURAL_EFFUSION: P}),
    ("Blunting of the left costophrenic angle.", {Obs.PLEURAL_EFFUSION: P}),
    ("Blunting of both costophrenic angles.", {Obs.PLEURAL_EFFUSION: P}),
    ("Small left effusoin, new since yesterday.", {Obs.PLEURAL_EFFUSION: P}),
    ("Small pericardial effusion suspected on the echo.", {Obs.PLEURAL_EFFUSION: M}),
    ("The costophrenic angles are sharp.", {Obs.PLEURAL_EFFUSION: N}),
    ("Marked cardiomegaly.", {Obs.CARDIOMEGALY: P, Obs.NO_FINDING: M}),
    ("The heart is enlarged.", {Obs.CARDIOMEGALY: P}),
    ("Enlarged cardiac silhouette, similar to the prior film.", {Obs.CARDIOMEGALY: P}),
    ("Mild cardiomegally persists.", {Obs.CARDIOMEGALY: P}),
    ("Heart size remains moderately enlarged.", {Obs.CARDIOMEGALY: P}),
    ("Heart size is normal.", {Obs.CARDIOMEGALY: N}),
    ("Normal heart size.", {Obs.CARDIOMEGALY: N}),
    ("The heart size is top normal.", {Obs.CARDIOMEGALY: N}),
    ("Heart size is at the upper limits of normal.", {Obs.CARDIOMEGALY: N}),
    ("The cardiac silhouette is within normal limits.", {Obs.CARDIOMEGALY: N}),
    ("Heart size is borderline.", {Obs.CARDIOMEGALY: U}),
    ("Borderline cardiomegaly.", {Obs.CARDIOMEGALY: U}),
    ("Heart size is top normal to mildly enlarged.", {Obs.CARDIOMEGALY: U}),
    ("The heart is not enlarged.", {Obs.CARDIOMEGALY: N}),
    (
        "Enlarged cardiomediastinal silhouette.",
        {Obs.ENLARGED_CARDIOMEDIASTINUM: P, Obs.CARDIOMEGALY: M},
    ),
    ("Widened mediastinum after the car accident.", {Obs.ENLARGED_CARDIOMEDIASTINUM: P}),
    ("The mediastinum is not widened.", {Obs.ENLARGED_CARDIOMEDIASTINUM: N}),
    (
        "Normal cardiomediastinal silhouette.",
        {Obs.ENLARGED_CARDIOMEDIASTINUM: N, Obs.CARDIOMEGALY: N},
    ),
    ("Mediastinal contours are unremarkable.", {Obs.ENLARGED_CARDIOMEDIASTINUM: N}),
    ("Mild interstitial edema.", {Obs.EDEMA: P}),
    ("Pulmonary vascular congestion.", {Obs.EDEMA: P}),
    ("Findings of fluid overload.", {Obs.EDEMA: P}),
    ("Pulmonary vascular engorgement is present.", {Obs.EDEMA: P}),
    ("Soft tissue edema of the right arm.", {Obs.EDEMA: M}),
    ("Right lower lobe consolidation.", {Obs.CONSOLIDATION: P}),
    ("Airspace consolidation in the lingula.", {Obs.CONSOLIDATION: P}),
    ("Dense left basilar consolidaton.", {Obs.CONSOLIDATION: P}),
    ("Right middle lobe pneumonia.", {Obs.PNEUMONIA: P}),
    ("Findings compatible with multifocal pnemonia.", {Obs.PNEUMONIA: P}),
    ("Findings consistent with infection.", {Obs.PNEUMONIA: P}),
    ("Bibasilar atelectasis.", {Obs.ATELECTASIS: P}),
    ("Left lower lobe collapse.", {Obs.ATELECTASIS: P}),
    ("Plate-like opacity at the left base.", {Obs.ATELECTASIS: P, Obs.LUNG_OPACITY: P}),
    ("Subsegmental atelectatic change at the right base.", {Obs.ATELECTASIS: P}),
    ("Mild left basal atelectsis.", {Obs.ATELECTASIS: P}),
    ("Patchy opacities in both lower lobes.", {Obs.LUNG_OPACITY: P}),
    ("Hazy opacification of the left hemithorax.", {Obs.LUNG_OPACITY: P}),
    ("Perihilar infiltrate.", {Obs.LUNG_OPACITY: P}),
    ("Increased haziness at the right base.", {Obs.LUNG_OPACITY: P}),
    ("Multifocal airspace disease.", {Obs.LUNG_OPACITY: P}),
    ("A 9 mm nodule projects over the left upper lobe.", {Obs.LUNG_LESION: P}),
    ("Right hilar mass.", {Obs.LUNG_LESION: P}),
    # the labelling rules: a granuloma is not a Lung Lesion mention
    ("Calcified granuloma in the right lower lobe.", {Obs.LUNG_LESION: M}),
    ("A lytic lesion in the humerus.", {Obs.LUNG_LESION: M}),
    ("Right apical pleural thickening.", {Obs.PLEURAL_OTHER: P}),
    ("Calcified pleural plaques bilaterally.", {Obs.PLEURAL_OTHER: P}),
    ("Healed left seventh rib fracture.", {Obs.FRACTURE: P}),
    ("Acute fx of the right clavicle.", {Obs.FRACTURE: P}),
    ("The left fifth rib is fractured.", {Obs.FRACTURE: P}),
    # the labelling rules: only explicit fracture words label Fracture
    ("No acute osseous abnormality.", {Obs.FRACTURE: M}),
    ("Endotracheal tube tip 3 cm above the carina.", {Obs.SUPPORT_DEVICES: P}),
    ("Right PICC terminates in the SVC.", {Obs.SUPPORT_DEVICES: P}),
    ("Left chest wall pacemaker with leads in the right heart.", {Obs.SUPPORT_DEVICES: P}),
    ("Median sternotomy wires.", {Obs.SUPPORT_DEVICES: P}),
    # surgical clips are not support devices (not in the rules' vocabulary, nor CheXpert's)
    ("Surgical clips in the right upper quadrant.", {Obs.SUPPORT_DEVICES: M}),
    ("Enteric tube courses below the diaphragm.", {Obs.SUPPORT_DEVICES: P}),
    ("Right internal jugular central venous catheter.", {Obs.SUPPORT_DEVICES: P}),
    ("A left chest port is in place.", {Obs.SUPPORT_DEVICES: P}),
    ("Left chest tube in place.", {Obs.SUPPORT_DEVICES: P}),
    ("A portable radiograph was obtained.", {Obs.SUPPORT_DEVICES: M}),
    ("The trachea is midline.", {Obs.SUPPORT_DEVICES: M}),
    ("Patchy consolodation at the left base.", {Obs.CONSOLIDATION: P}),
    ("Subtle infiltarte in the right base.", {Obs.LUNG_OPACITY: P}),
    ("Persistent pnumothorax at the right apex.", {Obs.PNEUMOTHORAX: P}),
    ("Small bilateral pleural effussions.", {Obs.PLEURAL_EFFUSION: P}),
    ("Atelactasis at the lung bases.", {Obs.ATELECTASIS: P}),
    ("Left upper lobe pnuemonia.", {Obs.PNEUMONIA: P}),
    ("Pulmonary oedema has worsened.", {Obs.EDEMA: P}),
    ("Further investigation was considered.", {Obs.CONSOLIDATION: M}),
    ("Pulmonary vascular markings are increased.", {Obs.EDEMA: P}),
    ("The pulmonary vasculature is mildly prominent.", {Obs.EDEMA: U}),
    ("Pulmonary vascularity is normal.", {Obs.EDEMA: N}),
    ("The lungs are unremarkable.", {Obs.LUNG_OPACITY: N, Obs.CONSOLIDATION: N}),
    ("Lung volumes are normal.", {Obs.LUNG_OPACITY: M}),
    # --- negation before and after, and lists ----------------------------------------------
    ("No pleural effusion.", {Obs.PLEURAL_EFFUSION: N}),
    ("Without focal consolidation.", {Obs.CONSOLIDATION: N}),
    ("Negative for pneumonia.", {Obs.PNEUMONIA: N}),
    ("The lungs are free of consolidation.", {Obs.CONSOLIDATION: N}),
    ("No evidence of pulmonary edema.", {Obs.EDEMA: N}),
    ("Pleural effusion is absent.", {Obs.PLEURAL_EFFUSION: N}),
    ("Consolidation is not seen.", {Obs.CONSOLIDATION: N}),
    ("Focal opacities are not identified.", {Obs.LUNG_OPACITY: N}),
    ("No effusion or pneumothorax.", {Obs.PLEURAL_EFFUSION: N, Obs.PNEUMOTHORAX: N}),
    (
        "No pneumothorax, effusion, or consolidation.",
        {Obs.PNEUMOTHORAX: N, Obs.PLEURAL_EFFUSION: N, Obs.CONSOLIDATION: N},
    ),
    (
        "There is no focal airspace consolidation, pleural effusion or pulmonary edema.",
        {Obs.CONSOLIDATION: N, Obs.PLEURAL_EFFUSION: N, Obs.EDEMA: N},
    ),
    ("Neither effusion nor pneumothorax.", {Obs.PLEURAL_EFFUSION: N, Obs.PNEUMOTHORAX: N}),
    ("No consolidation to suggest pneumonia.", {Obs.CONSOLIDATION: N, Obs.PNEUMONIA: N}),
    ("No opacity suspicious for pneumonia.", {Obs.LUNG_OPACITY: N, Obs.PNEUMONIA: N}),
    ("No definite focal consolidation.", {Obs.CONSOLIDATION: N}),
    ("Stable cardiomegaly without pulmonary edema.", {Obs.CARDIOMEGALY: P, Obs.EDEMA: N}),
    ("Left chest tube without pneumothorax.", {Obs.SUPPORT_DEVICES: P, Obs.PNEUMOTHORAX: N}),
    # --- scope terminators -------------------------------------------------------------------
    (
        "No pneumothorax, but a small left effusion is present.",
        {Obs.PNEUMOTHORAX: N, Obs.PLEURAL_EFFUSION: P},
    ),
    ("No effusion; mild cardiomegaly.", {Obs.PLEURAL_EFFUSION: N, Obs.CARDIOMEGALY: P}),
    (
        "No focal consolidation, however there is mild pulmonary edema.",
        {Obs.CONSOLIDATION: N, Obs.EDEMA: P},
    ),
    (
        "No effusion, although there is left basilar atelectasis.",
        {Obs.PLEURAL_EFFUSION: N, Obs.ATELECTASIS: P},
    ),
    (
        "The lungs are clear with the exception of right basilar atelectasis.",
        {Obs.LUNG_OPACITY: N, Obs.ATELECTASIS: P},
    ),
    ("No effusion and the heart is enlarged.", {Obs.PLEURAL_EFFUSION: N, Obs.CARDIOMEGALY: P}),
    (
        "No pneumothorax, small left pleural effusion.",
        {Obs.PNEUMOTHORAX: N, Obs.PLEURAL_EFFUSION: P},
    ),
    (
        "No pneumothorax is seen and there is a small effusion.",
        {Obs.PNEUMOTHORAX: N, Obs.PLEURAL_EFFUSION: P},
    ),
    (
        "The right effusion has resolved and the pneumothorax is unchanged.",
        {Obs.PLEURAL_EFFUSION: N, Obs.PNEUMOTHORAX: P},
    ),
    ("No pneumothorax at the tip of the catheter.", {Obs.PNEUMOTHORAX: N, Obs.SUPPORT_DEVICES: P}),
    # --- uncertainty ---------------------------------------------------------------------------
    ("Cannot exclude early pneumonia.", {Obs.PNEUMONIA: U}),
    ("Pneumonia can not be excluded.", {Obs.PNEUMONIA: U}),
    ("A small effusion is not excluded.", {Obs.PLEURAL_EFFUSION: U}),
    ("Infection cannot be ruled out.", {Obs.PNEUMONIA: U}),
    # the labelling rules: "aspiration" on its own is not a Pneumonia mention
    ("Aspiration is difficult to exclude.", {Obs.PNEUMONIA: M}),
    ("Left basilar opacity may represent atelectasis.", {Obs.LUNG_OPACITY: P, Obs.ATELECTASIS: U}),
    ("Edema might be present.", {Obs.EDEMA: U}),
    ("Possible small right effusion.", {Obs.PLEURAL_EFFUSION: U}),
    ("Possibly a tiny apical pneumothorax.", {Obs.PNEUMOTHORAX: U}),
    ("Probable right lower lobe pneumonia.", {Obs.PNEUMONIA: U}),
    ("Opacity at the left base, likely atelectasis.", {Obs.LUNG_OPACITY: P, Obs.ATELECTASIS: U}),
    ("Questionable nodule in the left mid lung.", {Obs.LUNG_LESION: U}),
    ("Findings suggestive of mild edema.", {Obs.EDEMA: U}),
    ("Opacity suspicious for pneumonia.", {Obs.LUNG_OPACITY: P, Obs.PNEUMONIA: U}),
    ("Right basilar opacity concerning for consolidation.", {Obs.CONSOLIDATION: U}),
    ("Atelectasis versus pneumonia in the lingula.", {Obs.ATELECTASIS: U, Obs.PNEUMONIA: U}),
    ("Scarring vs consolidation at the right base.", {Obs.CONSOLIDATION: U}),
    ("Differential includes edema and infection.", {Obs.EDEMA: U, Obs.PNEUMONIA: U}),
    ("The opacity could represent a mass.", {Obs.LUNG_LESION: U}),
    ("Heart size is borderline enlarged.", {Obs.CARDIOMEGALY: U}),
    ("Cannot exclude a small pneumothorax.", {Obs.PNEUMOTHORAX: U}),
    (
        "No definite pneumothorax, although a small one cannot be excluded.",
        {Obs.PNEUMOTHORAX: N},
    ),
    ("Minimal if any residual left effusion.", {Obs.PLEURAL_EFFUSION: U}),
    ("Pneumonia is less likely.", {Obs.PNEUMONIA: U}),
    ("Atelectasis, less likely pneumonia.", {Obs.ATELECTASIS: P, Obs.PNEUMONIA: U}),
    ("Pneumonia is unlikely.", {Obs.PNEUMONIA: N}),
    (
        "No pneumothorax seen, though a small anterior pneumothorax may be missed supine.",
        {Obs.PNEUMOTHORAX: U},
    ),
    # --- temporal ------------------------------------------------------------------------------
    ("No change in the small left effusion.", {Obs.PLEURAL_EFFUSION: P}),
    ("Unchanged moderate cardiomegaly.", {Obs.CARDIOMEGALY: P}),
    ("Persistent right lower lobe consolidation.", {Obs.CONSOLIDATION: P}),
    ("Stable small left pneumothorax.", {Obs.PNEUMOTHORAX: P}),
    ("Improving left basilar opacity.", {Obs.LUNG_OPACITY: P}),
    ("Decreased size of the right pleural effusion.", {Obs.PLEURAL_EFFUSION: P}),
    ("No significant interval change in the right pneumothorax.", {Obs.PNEUMOTHORAX: P}),
    ("The left effusion has partially resolved.", {Obs.PLEURAL_EFFUSION: P}),
    ("Interval resolution of the left pleural effusion.", {Obs.PLEURAL_EFFUSION: N}),
    ("The right lower lobe pneumonia has resolved.", {Obs.PNEUMONIA: N}),
    ("The previously seen nodule is no longer seen.", {Obs.LUNG_LESION: N}),
    ("No new consolidation.", {Obs.CONSOLIDATION: N}),
    ("Interval removal of the endotracheal tube.", {Obs.SUPPORT_DEVICES: N}),
    ("The nasogastric tube has been removed.", {Obs.SUPPORT_DEVICES: N}),
    ("No pneumothorax after chest tube removal.", {Obs.SUPPORT_DEVICES: N}),
    ("The pneumonia in the right lower lobe has resolved.", {Obs.PNEUMONIA: N}),
    ("The effusion has nearly resolved.", {Obs.PLEURAL_EFFUSION: P}),
    # --- special phrases -------------------------------------------------------------------
    ("Lungs are clear.", {Obs.LUNG_OPACITY: N, Obs.CONSOLIDATION: N, Obs.NO_FINDING: P}),
    ("The lungs are well expanded and clear.", {Obs.LUNG_OPACITY: N, Obs.CONSOLIDATION: N}),
    ("The lungs are clear of consolidation or effusion.", {Obs.PLEURAL_EFFUSION: N}),
    # global normal statements label no single observation (the labelling rules)
    (
        "No acute cardiopulmonary process.",
        {
            Obs.CONSOLIDATION: M,
            Obs.EDEMA: M,
            Obs.PNEUMONIA: M,
            Obs.PNEUMOTHORAX: M,
            Obs.PLEURAL_EFFUSION: M,
            Obs.LUNG_OPACITY: M,
            Obs.CARDIOMEGALY: M,
            Obs.NO_FINDING: P,
        },
    ),
    ("No acute cardiopulmonary abnormality.", {Obs.PNEUMOTHORAX: M, Obs.NO_FINDING: P}),
    ("Normal chest radiograph.", {Obs.PLEURAL_EFFUSION: M, Obs.NO_FINDING: P}),
    ("Normal study.", {Obs.EDEMA: M, Obs.NO_FINDING: P}),
    # --- No Finding ------------------------------------------------------------------------
    (
        "Right PICC in the SVC. No pneumothorax or effusion.",
        {Obs.SUPPORT_DEVICES: P, Obs.NO_FINDING: P},
    ),
    ("No pneumothorax. Possible left basilar atelectasis.", {Obs.NO_FINDING: M}),
    ("Right IJ catheter tip in the SVC.", {Obs.NO_FINDING: M}),
    ("", {Obs.NO_FINDING: M, Obs.PNEUMOTHORAX: M}),
    # --- sections, lists and aggregation -------------------------------------------------------
    (
        "INDICATION: Fever, evaluate for pneumonia.\nFINDINGS: Lungs are clear. No effusion.",
        {Obs.PNEUMONIA: M, Obs.LUNG_OPACITY: N, Obs.NO_FINDING: P},
    ),
    (
        "FINDINGS: 1. No pneumothorax. 2. Small left effusion. IMPRESSION: Effusion.",
        {Obs.PNEUMOTHORAX: N, Obs.PLEURAL_EFFUSION: P},
    ),
    ("No effusion. Small right effusion.", {Obs.PLEURAL_EFFUSION: P}),
    ("Possible consolidation. Right lower lobe consolidation.", {Obs.CONSOLIDATION: P}),
    ("No consolidation. Cannot exclude consolidation.", {Obs.CONSOLIDATION: U}),
    # --- a trailing cue reaches back across a comma, a bracket or a dash (any observation) ----
    ("Left effusion, now resolved.", {Obs.PLEURAL_EFFUSION: N}),
    ("Right lower lobe consolidation, not seen today.", {Obs.CONSOLIDATION: N}),
    ("Interstitial edema, cleared.", {Obs.EDEMA: N}),
    ("Nasogastric tube, since removed.", {Obs.SUPPORT_DEVICES: N}),
    ("The lingular opacity, noted in May, has cleared.", {Obs.LUNG_OPACITY: N}),
    ("Left basilar atelectasis (resolved).", {Obs.ATELECTASIS: N}),
    ("Pleural effusion \u2014 absent.", {Obs.PLEURAL_EFFUSION: N}),
    ("Consolidation (negative).", {Obs.CONSOLIDATION: N}),
    ("Effusion, none. Edema, none.", {Obs.PLEURAL_EFFUSION: N, Obs.EDEMA: N}),
    ("A left effusion which has cleared.", {Obs.PLEURAL_EFFUSION: N}),
    ("Edema cannot be seen on this film.", {Obs.EDEMA: N}),
    (
        "Interval resolution of the previously described right basilar opacity.",
        {Obs.LUNG_OPACITY: N},
    ),
    ("Removal of the previously placed left chest tube.", {Obs.SUPPORT_DEVICES: N}),
    # ... but only when the cue ends its phrase and nothing but an aside stands between.
    ("Small left effusion, no other abnormality.", {Obs.PLEURAL_EFFUSION: P}),
    ("Small left effusion - no pneumothorax.", {Obs.PLEURAL_EFFUSION: P, Obs.PNEUMOTHORAX: N}),
    ("Small left effusion, the hematoma has resolved.", {Obs.PLEURAL_EFFUSION: P}),
    ("Small left effusion, no interval change.", {Obs.PLEURAL_EFFUSION: P}),
    (
        "Left effusion, now resolved, and new right lower lobe consolidation.",
        {Obs.PLEURAL_EFFUSION: N, Obs.CONSOLIDATION: P},
    ),
    (
        "Small right pneumothorax, the left effusion has resolved.",
        {Obs.PNEUMOTHORAX: P, Obs.PLEURAL_EFFUSION: N},
    ),
    ("Moderate pulmonary edema, which persists.", {Obs.EDEMA: P}),
    # --- a resolution that did not happen is no absence ---------------------------------------
    ("Pneumothorax has not resolved.", {Obs.PNEUMOTHORAX: P}),
    ("The pneumothorax is not resolved.", {Obs.PNEUMOTHORAX: P}),
    ("No resolution of the pneumothorax.", {Obs.PNEUMOTHORAX: P}),
    ("Without resolution of the left effusion.", {Obs.PLEURAL_EFFUSION: P}),
    ("The right effusion has not yet resolved.", {Obs.PLEURAL_EFFUSION: P}),
    ("No interval resolution of the lingular consolidation.", {Obs.CONSOLIDATION: P}),
    ("Lack of clearing of the perihilar opacities.", {Obs.LUNG_OPACITY: P}),
    ("The left chest tube has not been removed.", {Obs.SUPPORT_DEVICES: P}),
    ("Edema, not resolved.", {Obs.EDEMA: P}),
    # --- section headers only where a header can stand; only why/how sections skipped --------
    ("Compared to prior study: large right pneumothorax.", {Obs.PNEUMOTHORAX: P}),
    ("Exam: Large right pneumothorax.", {Obs.PNEUMOTHORAX: P}),
    ("Study: Large right pneumothorax.", {Obs.PNEUMOTHORAX: P}),
    ("Indication: trauma\rLarge right pneumothorax.", {Obs.PNEUMOTHORAX: P}),
    ("When compared with the previous exam: new left effusion.", {Obs.PLEURAL_EFFUSION: P}),
    ("Indication: chest pain Findings: small left pneumothorax.", {Obs.PNEUMOTHORAX: P}),
    ("EXAMINATION: Chest radiograph, new right lower lobe pneumonia.", {Obs.PNEUMONIA: P}),
    ("COMPARISON: 2 days ago. Small left pneumothorax, larger.", {Obs.PNEUMOTHORAX: P}),
    ("History: fall\r\nRight rib fracture.", {Obs.FRACTURE: P}),
    (
        "INDICATION: cough, evaluate for pneumonia\nSmall left effusion.\nIMPRESSION: Effusion.",
        {Obs.PNEUMONIA: M, Obs.PLEURAL_EFFUSION: P},
    ),
    (
        "REASON FOR EXAM: rule out pneumothorax\r\nFINDINGS: Lungs are clear.",
        {Obs.PNEUMOTHORAX: M, Obs.LUNG_OPACITY: N},
    ),
    (
        "CHEST PA AND LAT INDICATION: evaluate for pneumonia\nFINDINGS: No effusion.",
        {Obs.PNEUMONIA: M, Obs.PLEURAL_EFFUSION: N},
    ),
]

# Negated pneumothorax in many phrasings: none may ever come out positive.
NEGATED_PNEUMOTHORAX = [
    "No pneumothorax.",
    "No ptx.",
    "no pnuemothorax",
    "No pneumothoraces.",
    "There is no pneumothorax.",
    "There is no evidence of pneumothorax.",
    "No evidence of a right or left pneumothorax.",
    "No apical or basilar pneumothorax.",
    "No definite pneumothorax.",
    "No residual pneumothorax.",
    "No new pneumothorax.",
    "Without pneumothorax.",
    "Negative for pneumothorax.",
    "Free of pneumothorax.",
    "Pneumothorax is not seen.",
    "Pneumothorax is not identified on this study.",
    "A pneumothorax is not clearly seen.",
    "The pneumothorax has resolved.",
    "The left pneumothorax has completely resolved.",
    "Interval resolution of the right apical pneumothorax.",
    "Resolved left pneumothorax.",
    "The previously noted pneumothorax is no longer visible.",
    "There is no longer a pneumothorax.",
    "Pneumothorax: none.",
    "Pneumothorax is absent.",
    "Neither pneumothorax nor effusion is seen.",
    "No focal consolidation, pleural effusion, or pneumothorax.",
    "No pleural effusion and no pneumothorax.",
    "There is no pleural effusion or pneumothorax.",
    "No evidence of pneumothorax following removal of the chest tube.",
    "Left chest tube in place without residual pneumothorax.",
    "No pneumothorax is identified after the biopsy.",
    "No visualized pneumothorax.",
    "Pneumothorax has not recurred.",
    "No visible pneumothorax on the upright view.",
    "No significant pneumothorax.",
    "Pneumothorax - none.",
    "I do not see a pneumothorax.",
    "The pneumothorax has been evacuated.",
    "No right-sided pneumothorax.",
    "Post thoracentesis, no pneumothorax.",
    "No pneumothorax is present, and the chest tube is in good position.",
    # Trailing cues across a comma, a bracket or a dash (review findings, verbatim).
    "Right pneumothorax, now resolved.",
    "Pneumothorax, not seen.",
    "Pneumothorax, absent.",
    "Pneumothorax, none.",
    "The right pneumothorax, seen on the prior study, has resolved.",
    "Interval resolution of the previously noted pneumothorax.",
    "The patient had a pneumothorax which has resolved.",
    "History of pneumothorax, resolved.",
    "Bilateral pneumothoraces, resolved.",
    "Pneumothorax (none).",
    "Pneumothorax \u2014 none.",
    "Pneumothorax cannot be seen.",
    # The same, in other words.
    "Left apical pneumothorax, since resolved.",
    "Small pneumothorax, not identified on today's film.",
    "PTX, negative.",
    "Pneumothorax (resolved).",
    "Pneumothorax \u2013 absent.",
    "Pneumothorax: none seen.",
    "The left pneumothorax, as described previously, has now resolved.",
    "A tiny pneumothorax, which has since resolved.",
    "Interval resolution of the previously seen apical pneumothorax.",
    "Pneumothorax can't be seen.",
]


def _labels(text: str) -> dict[Observation, Label]:
    return {obs: item.label for obs, item in label_report(text).items()}


def _case_id(case: tuple[str, dict[Observation, Label]]) -> str:
    return case[0][:48] or "<empty>"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_labels(case: tuple[str, dict[Observation, Label]]) -> None:
    text, expected = case
    labels = _labels(text)
    wrong = {obs.value: (labels[obs].value, label.value) for obs, label in expected.items()}
    wrong = {k: v for k, v in wrong.items() if v[0] != v[1]}
    assert not wrong, f"{text!r}: (got, expected) {wrong}"


@pytest.mark.parametrize("text", NEGATED_PNEUMOTHORAX)
def test_negated_pneumothorax_is_never_positive(text: str) -> None:
    label = _labels(text)[Obs.PNEUMOTHORAX]
    assert label is not P
    assert label is N


ALL_TEXTS = [text for text, _ in CASES] + NEGATED_PNEUMOTHORAX


@pytest.mark.parametrize("text", ALL_TEXTS, ids=lambda t: t[:48] or "<empty>")
def test_every_observation_is_present_and_evidence_is_from_the_text(text: str) -> None:
    result = label_report(text)
    assert list(result) == list(Observation)
    for obs, item in result.items():
        assert isinstance(item, ObservationLabel)
        assert item.observation is obs
        if item.label is M:
            assert item.sentence is None
        else:
            assert item.sentence is not None and item.sentence in text


def test_prefilters_never_change_a_label() -> None:
    """The trigger and word-start shortcuts give the labels the plain regexes give."""
    extra = [
        "Pneumonitis or aspiration pneumonia is difficult to exclude; CHF is also possible.",
        "Kerley B lines and cephalization; AICD leads; s/p CABG with sternal wires.",
        "Hydropneumothorax? Costophrenic angle blunting vs loculated fluid.",
        "Mildly prominent cardiac silhouette; mediastinal widening other than the aorta.",
    ]
    for text in ALL_TEXTS + extra:
        assert label_report(text) == label_report(text, gated=False), text


def test_prefilters_on_random_word_salad() -> None:
    """Shuffled report words hit odd corners of the patterns; still no difference."""
    rng = random.Random(20261127)
    vocabulary = sorted({w for t in ALL_TEXTS for w in re.findall(r"[\w/'-]+|[.,;:?]", t)})
    for _ in range(1500):
        text = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(3, 14)))
        assert label_report(text) == label_report(text, gated=False), text


def test_the_deciding_sentence_is_the_first_with_the_winning_label() -> None:
    text = "No effusion. Possible small effusion. Small left effusion. Large right effusion."
    result = label_report(text)[Obs.PLEURAL_EFFUSION]
    assert result.label is P
    assert result.sentence == "Small left effusion."
    result = label_report("No effusion. Possible effusion. Effusion unlikely.")[
        Obs.PLEURAL_EFFUSION
    ]
    assert (result.label, result.sentence) == (U, "Possible effusion.")


def test_no_finding_ignores_devices_but_not_other_findings() -> None:
    with_device = label_report("Endotracheal tube in place. Lungs are clear.")
    assert with_device[Obs.NO_FINDING].label is P
    assert with_device[Obs.NO_FINDING].sentence == "Lungs are clear."
    normal_phrase = label_report("Normal chest radiograph. No pneumothorax.")
    assert normal_phrase[Obs.NO_FINDING].sentence == "Normal chest radiograph."
    assert label_report("Lungs are clear. Old healed rib fracture.")[Obs.NO_FINDING].label is M


def test_labels_as_json() -> None:
    result = labels_as_json(label_report("Small right effusion. No pneumothorax."))
    assert set(result) == {obs.value for obs in Observation}
    assert result["Pleural Effusion"] == {"label": "positive", "sentence": "Small right effusion."}
    assert result["Pneumothorax"] == {"label": "negative", "sentence": "No pneumothorax."}
    assert result["Edema"] == {"label": "not_mentioned", "sentence": None}


def test_offsets_survive_characters_that_lower_case_to_two() -> None:
    text = "\u0130stanbul clinic. Small left effusion."
    result = label_report(text)[Obs.PLEURAL_EFFUSION]
    assert result.label is P and result.sentence == "Small left effusion."


def test_deterministic() -> None:
    text = "Possible left lower lobe pneumonia. No effusion. Stable cardiomegaly."
    assert label_report(text) == label_report(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "FINDINGS: Heart is normal. IMPRESSION: No acute process.",
            ["Heart is normal.", "No acute process."],
        ),
        (
            "1. Small effusion. 2. No pneumothorax.\n3. Stable nodule.",
            ["Small effusion.", "No pneumothorax.", "Stable nodule."],
        ),
        (
            "A mass of approx. 4.5 cm, e.g. a tumor, is seen. Dr. Lee was called.",
            ["A mass of approx. 4.5 cm, e.g. a tumor, is seen.", "Dr. Lee was called."],
        ),
        (
            "There is no focal\nconsolidation or effusion\n\nHeart size normal",
            ["There is no focal\nconsolidation or effusion", "Heart size normal"],
        ),
        ("- Tubes in place\n- No pneumothorax", ["Tubes in place", "No pneumothorax"]),
        ("Lines:\nRight IJ catheter\nNG tube", ["Lines:", "Right IJ catheter", "NG tube"]),
        ("No effusion or\nPneumothorax.", ["No effusion or\nPneumothorax."]),
        ("Findings:\nLungs clear.\nImpression:\nNormal.", ["Lungs clear.", "Normal."]),
    ],
)
def test_sentence_splitting(text: str, expected: list[str]) -> None:
    sentences = split_sentences(text)
    assert [s.text for s in sentences] == expected
    for sentence in sentences:
        assert text[sentence.start : sentence.start + len(sentence.text)] == sentence.text


def test_sentence_splitting_treats_a_carriage_return_as_a_line_end() -> None:
    text = "Lines:\rRight IJ catheter\r\nNG tube\r\rNo pneumothorax"
    sentences = split_sentences(text)
    assert [s.text for s in sentences] == [
        "Lines:",
        "Right IJ catheter",
        "NG tube",
        "No pneumothorax",
    ]
    for sentence in sentences:
        assert text[sentence.start : sentence.start + len(sentence.text)] == sentence.text


def test_headers_only_open_a_line_or_follow_a_sentence() -> None:
    sections = [s.section for s in split_sentences("Compared to the prior study: new effusion.")]
    assert sections == [None]
    sections = [s.section for s in split_sentences("Cough. Exam: effusion.\nStudy: no edema.")]
    assert sections == [None, "exam", "study"]


def test_skipped_sections() -> None:
    sections = [s.section for s in split_sentences("History: cough. Findings: Clear lungs.")]
    assert sections == ["history", "findings"]
    # With no header after it, a history section ends with its first sentence.
    text = "Indication: chest pain. Small left pneumothorax."
    assert _labels(text)[Obs.PNEUMOTHORAX] is P
    assert _labels("COMPARISON: Radiograph of 3 May.\nNo pneumothorax.")[Obs.PNEUMOTHORAX] is N
    # A skipped section ends with its line, whatever follows on the next.
    assert _labels("Indication: chest pain\nSmall left pneumothorax.")[Obs.PNEUMOTHORAX] is P
    assert _labels("History: chest pain\rSmall left pneumothorax.")[Obs.PNEUMOTHORAX] is P
    assert _labels("Technique: PA and lateral, rule out pneumonia")[Obs.PNEUMONIA] is M


def test_a_mention_no_sentence_labels_is_uncertain_not_lost() -> None:
    # A blank line cuts "pleural air" (a pneumothorax) into two sentences, neither a mention.
    text = "Pleural\n\nair at the right apex."
    assert [s.text for s in split_sentences(text)] == ["Pleural", "air at the right apex."]
    result = label_report(text)
    assert result[Obs.PNEUMOTHORAX].label is U
    assert result[Obs.PNEUMOTHORAX].sentence == "Pleural"
    assert result[Obs.NO_FINDING].label is M
    assert label_report(text) == label_report(text, gated=False)
    # A too-long sentence cut between the two words.
    text = "-" * (MAX_SENTENCE_CHARS - 10) + " pleural air."
    result = label_report(text)[Obs.PNEUMOTHORAX]
    assert result.label is U and result.sentence is not None and result.sentence in text
    # Nothing is added for a skipped section, nor for a phrase that only says "normal".
    text = "Indication: evaluate pleural\n\nFindings: air-fluid level in the stomach."
    assert _labels(text)[Obs.PNEUMOTHORAX] is M
    assert _labels("The heart size is\n\nnormal.")[Obs.CARDIOMEGALY] is M


def test_a_too_long_sentence_is_cut_into_pieces() -> None:
    text = "Small left effusion, " * 200 + "no pneumothorax and " * 100 + "clear lungs."
    sentences = split_sentences(text)
    assert len(sentences) > 1
    for sentence in sentences:
        assert len(sentence.text) <= MAX_SENTENCE_CHARS
        assert text[sentence.start : sentence.start + len(sentence.text)] == sentence.text


def test_a_200_kb_sentence_is_labelled() -> None:
    """Labelling time is linear in a sentence's length (it used to be quadratic)."""
    unit = "stable small left pleural effusion with adjacent patchy opacity, no pneumothorax, "
    text = unit * (200_000 // len(unit) + 1) + "; mild cardiomegaly"
    assert len(text) > 200_000 and "." not in text
    labels = _labels(text)
    assert labels[Obs.PLEURAL_EFFUSION] is P
    assert labels[Obs.LUNG_OPACITY] is P
    assert labels[Obs.PNEUMOTHORAX] is N
    assert labels[Obs.CARDIOMEGALY] is P
    # No comma or semicolon at all: the pieces are cut at spaces.
    text = "small left effusion and " * 9000 + "a tiny right pneumothorax"
    labels = _labels(text)
    assert labels[Obs.PLEURAL_EFFUSION] is P and labels[Obs.PNEUMOTHORAX] is P
