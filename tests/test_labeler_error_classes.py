"""The labeler on the error classes found on real reports (issue 11, classes A to F).

Each class is a general mechanism, so each is tested with several phrasings in the style of
real reports, not only the examples that exposed it. Observations not listed in a case are
not checked here; tests/test_labeler.py covers the rest of the labeler.
"""

from __future__ import annotations

import pytest

from cds_service.findings.labeler import label_report
from cds_service.findings.observations import Label, Observation

P, N, U, M = Label.POSITIVE, Label.NEGATIVE, Label.UNCERTAIN, Label.NOT_MENTIONED
PTX = Observation.PNEUMOTHORAX
EFFUSION = Observation.PLEURAL_EFFUSION
FRACTURE = Observation.FRACTURE
CONSOLIDATION = Observation.CONSOLIDATION
OPACITY = Observation.LUNG_OPACITY
ATELECTASIS = Observation.ATELECTASIS
PNEUMONIA = Observation.PNEUMONIA
EDEMA = Observation.EDEMA
LESION = Observation.LUNG_LESION
DEVICES = Observation.SUPPORT_DEVICES
HEART = Observation.CARDIOMEGALY
MEDIASTINUM = Observation.ENLARGED_CARDIOMEDIASTINUM
NO_FINDING = Observation.NO_FINDING
CLINICAL = tuple(o for o in Observation if o not in (NO_FINDING, DEVICES))

Case = tuple[str, dict[Observation, Label]]

# A. A negation reaches through the participles, adjectives and commas of its noun phrase
# and over the list that follows, and stops where a new clause starts.
NEGATION_SCOPE: list[Case] = [
    ("No visualized pneumothorax.", {PTX: N}),
    ("No visualized pneumothorax or large pleural effusion.", {PTX: N, EFFUSION: N}),
    ("No visible pneumothorax.", {PTX: N}),
    ("No demonstrable pneumothorax.", {PTX: N}),
    ("No radiographically evident pneumothorax.", {PTX: N}),
    ("No definitely identified pneumothorax on this supine film.", {PTX: N}),
    ("There is no evidence of a visualized pneumothorax.", {PTX: N}),
    ("Without visible pneumothorax or effusion.", {PTX: N, EFFUSION: N}),
    ("No acute, displaced rib fractures.", {FRACTURE: N}),
    ("No displaced, acute rib fracture is identified.", {FRACTURE: N}),
    (
        "No identified pneumothorax, pleural effusion, or focal consolidation.",
        {PTX: N, EFFUSION: N, CONSOLIDATION: N},
    ),
    (
        "No focal airspace consolidation, visualized pneumothorax or sizable effusion.",
        {PTX: N, EFFUSION: N, CONSOLIDATION: N},
    ),
    ("No pneumothorax is visualized and the heart is enlarged.", {PTX: N, HEART: P}),
    ("No visualized pneumothorax, but small left pleural effusion.", {PTX: N, EFFUSION: P}),
    ("No pleural effusion, moderate cardiomegaly.", {EFFUSION: N, HEART: P}),
    ("No pneumothorax. Moderate right pleural effusion.", {PTX: N, EFFUSION: P}),
    ("No pneumothorax; however, there is a small left effusion.", {PTX: N, EFFUSION: P}),
    # pseudo-triggers look like negations and are not
    ("No change in the small left pleural effusion.", {EFFUSION: P}),
    ("No significant interval change in the right apical pneumothorax.", {PTX: P}),
    ("Not only is there a right pneumothorax but also a left effusion.", {PTX: P, EFFUSION: P}),
    # a negation opens a list whose first items are not findings
    (
        "The lungs are clear without findings to indicate hyperinflation, pneumonia, or edema.",
        {PNEUMONIA: N, EDEMA: N},
    ),
    ("No signs of air trapping, pneumothorax or effusion.", {PTX: N, EFFUSION: N}),
    ("No acute process, small left pleural effusion.", {EFFUSION: P}),
    # a negated finding carries its negation to what it would support
    ("No infiltrates to support pneumonia.", {PNEUMONIA: N, OPACITY: N}),
    ("No focal areas of consolidation to support pneumonia.", {PNEUMONIA: N}),
]

# B. Global normal statements label no single observation; they are normal statements for
# No Finding only.
GLOBAL_NORMAL: list[str] = [
    "No acute cardiopulmonary abnormality.",
    "No acute cardiopulmonary process.",
    "No acute cardiopulmonary disease.",
    "No acute intrathoracic process.",
    "No active cardiopulmonary disease.",
    "Normal chest radiograph.",
    "Unremarkable chest radiograph.",
    "No radiographic evidence of acute cardiopulmonary disease.",
    "Negative chest.",
    "Negative study.",
    "The examination is negative.",
    "Chest clear.",
    "Clear chest.",
    "Normal two views of the chest.",
    "Normal radiographic appearance of the chest.",
]
GLOBAL_NORMAL_WITH_FINDINGS: list[Case] = [
    ("Stable cardiomegaly. No acute cardiopulmonary process.", {HEART: P, EDEMA: M, PTX: M}),
    ("No acute cardiopulmonary disease. Small left pleural effusion.", {EFFUSION: P, PTX: M}),
    ("No acute bony abnormality.", {FRACTURE: M}),
    ("No acute osseous abnormality.", {FRACTURE: M}),
    ("No acute osseous abnormalities. No pneumothorax.", {FRACTURE: M, PTX: N, NO_FINDING: P}),
]

# C. Alternatives ("A or B", "A/B", "A and/or B") and hedges ("apparent") are uncertain.
ALTERNATIVES: list[Case] = [
    ("Bibasilar scarring/atelectasis.", {ATELECTASIS: U}),
    ("Left basilar atelectasis/scarring.", {ATELECTASIS: U}),
    ("Scarring or atelectasis in the lingula.", {ATELECTASIS: U}),
    ("Atelectasis and/or scarring at the left base.", {ATELECTASIS: U}),
    ("Linear opacities at the bases, atelectasis versus scarring.", {OPACITY: P, ATELECTASIS: U}),
    (
        "Small bilateral effusions with adjacent infiltrate or atelectasis.",
        {EFFUSION: P, ATELECTASIS: U, OPACITY: U},
    ),
    ("Apparent old rib fractures on the left.", {FRACTURE: U}),
    ("Apparent small left pleural effusion.", {EFFUSION: U}),
    ("There is apparently a small right pneumothorax.", {PTX: U}),
    ("No apparent pneumothorax.", {PTX: N}),
    ("Pneumonia is favored over atelectasis.", {PNEUMONIA: U, ATELECTASIS: U}),
    ("Linear density favored to represent subsegmental atelectasis.", {ATELECTASIS: U}),
    ("Suggestion of a small pleural effusion on the frontal view.", {EFFUSION: U}),
    ("Volume loss in the lingula, with or without superimposed infection.", {PNEUMONIA: U}),
    ("Findings suggesting airways disease without lobar pneumonia.", {PNEUMONIA: N}),
    ("Atypical pneumonia should be included in the differential.", {PNEUMONIA: U}),
    # negation still wins over the "or" of a negated list
    ("No pneumothorax or effusion.", {PTX: N, EFFUSION: N}),
    ("Pneumothorax or effusion is not seen.", {PTX: N, EFFUSION: N}),
    ("No focal consolidation, effusion, or pneumothorax.", {CONSOLIDATION: N, PTX: N}),
]

# D. Words that name something else are not mentions.
NOT_MENTIONS: list[Case] = [
    ("Calcified granulomas in the right upper lobe.", {LESION: M}),
    ("Scattered calcified granulomas. Lungs are otherwise clear.", {LESION: M, NO_FINDING: P}),
    ("Calcified granuloma. No pneumothorax.", {LESION: M, PTX: N, NO_FINDING: P}),
    (
        "The chest tube tip projects outside the thoracic cavity.",
        {LESION: M, DEVICES: P},
    ),
    ("Air in the pleural cavity is not seen.", {LESION: M}),
    ("Surgical clips are noted in the right upper abdomen.", {DEVICES: M}),
    ("Cholecystectomy clips in the right upper quadrant.", {DEVICES: M}),
    ("Status post median sternotomy.", {DEVICES: M}),
    ("Status post sternotomy and CABG. No pneumothorax.", {DEVICES: M, NO_FINDING: P}),
    ("Intact median sternotomy wires.", {DEVICES: P}),
    ("Evidence of previous granulomatous infection.", {PNEUMONIA: M}),
    ("Sequelae of prior granulomatous disease.", {PNEUMONIA: M, LESION: M}),
    ("Old granulomatous infection with calcified hilar nodes.", {PNEUMONIA: M}),
    ("Focal density in the left lower lobe.", {OPACITY: M}),
    ("Increased retrocardiac density.", {OPACITY: M}),
    ("Volume loss in the left lower lobe.", {ATELECTASIS: M}),
    (
        "Differential includes pneumonia, edema or hemorrhage.",
        {PNEUMONIA: U, EDEMA: U},
    ),
    ("Aspiration is a consideration.", {PNEUMONIA: M}),
    ("Mild peribronchial cuffing.", {EDEMA: M}),
    ("Kerley B lines at the bases.", {EDEMA: M}),
    ("Opacification of the ethmoid air cells and maxillary sinuses.", {OPACITY: M}),
    ("Sinus opacification.", {OPACITY: M}),
    ("The pulmonary parenchyma is clear.", {OPACITY: N, CONSOLIDATION: N}),
    ("The lungs are well - expanded and clear.", {OPACITY: N, CONSOLIDATION: N}),
]

# E. A present pneumothorax in other words.
PLEURAL_AIR: list[Case] = [
    ("Almost completely resolved right apical pleural air collection.", {PTX: P}),
    ("Small air collection within the right pleural space.", {PTX: P}),
    ("Tiny residual apical pleural air.", {PTX: P}),
    ("Persistent small air collection in the left pleural space.", {PTX: P}),
    ("Nearly completely resolved left pneumothorax.", {PTX: P}),
    ("Almost entirely resolved right pneumothorax.", {PTX: P}),
    ("The pleural air collection has resolved.", {PTX: N}),
    ("No pleural air collection.", {PTX: N}),
]

# F. A removed device is not a normal statement; "not enlarged" hearts are negative.
REMOVALS_AND_HEART: list[Case] = [
    ("Previously seen left-sided PICC line has been removed.", {DEVICES: N, NO_FINDING: M}),
    ("Interval removal of the endotracheal tube.", {DEVICES: N, NO_FINDING: M}),
    ("The chest tube has been removed. No pneumothorax.", {DEVICES: N, PTX: N, NO_FINDING: P}),
    ("The heart silhouette is not enlarged.", {HEART: N, NO_FINDING: P}),
    ("Cardiomediastinal silhouette is not enlarged.", {HEART: N, MEDIASTINUM: N}),
    ("The cardiac silhouette is not enlarged.", {HEART: N}),
    ("Heart size is not significantly enlarged.", {HEART: N}),
    ("The heart and mediastinum are not enlarged.", {HEART: N, MEDIASTINUM: N}),
]


def _labels(text: str) -> dict[Observation, Label]:
    return {obs: item.label for obs, item in label_report(text).items()}


def _check(case: Case) -> None:
    text, expected = case
    labels = _labels(text)
    wrong = {
        obs.value: (labels[obs].value, label.value)
        for obs, label in expected.items()
        if labels[obs] is not label
    }
    assert not wrong, f"{text!r}: (got, expected) {wrong}"


def _id(case: Case) -> str:
    return case[0][:60]


@pytest.mark.parametrize("case", NEGATION_SCOPE, ids=_id)
def test_a_negation_scope(case: Case) -> None:
    _check(case)


@pytest.mark.parametrize("text", GLOBAL_NORMAL)
def test_b_global_normal_statements_label_no_single_observation(text: str) -> None:
    labels = _labels(text)
    assert {obs: labels[obs] for obs in CLINICAL} == dict.fromkeys(CLINICAL, M)
    assert labels[NO_FINDING] is P


@pytest.mark.parametrize("case", GLOBAL_NORMAL_WITH_FINDINGS, ids=_id)
def test_b_global_normal_statements_beside_findings(case: Case) -> None:
    _check(case)


@pytest.mark.parametrize("case", ALTERNATIVES, ids=_id)
def test_c_alternatives_and_hedges(case: Case) -> None:
    _check(case)


@pytest.mark.parametrize("case", NOT_MENTIONS, ids=_id)
def test_d_words_that_name_something_else(case: Case) -> None:
    _check(case)


@pytest.mark.parametrize("case", PLEURAL_AIR, ids=_id)
def test_e_pneumothorax_in_other_words(case: Case) -> None:
    _check(case)


@pytest.mark.parametrize("case", REMOVALS_AND_HEART, ids=_id)
def test_f_device_removal_and_heart_size(case: Case) -> None:
    _check(case)


ALL_CASES = (
    NEGATION_SCOPE
    + GLOBAL_NORMAL_WITH_FINDINGS
    + ALTERNATIVES
    + NOT_MENTIONS
    + PLEURAL_AIR
    + REMOVALS_AND_HEART
)


@pytest.mark.parametrize("case", [c for c in ALL_CASES if c[1].get(PTX) is N], ids=_id)
def test_no_negated_pneumothorax_is_ever_positive_or_uncertain(case: Case) -> None:
    """The safety property behind the critical card, checked on every negated case."""
    assert _labels(case[0])[PTX] is N


@pytest.mark.parametrize("case", ALL_CASES, ids=_id)
def test_prefilters_agree_on_every_case(case: Case) -> None:
    fast = {o: item.label for o, item in label_report(case[0]).items()}
    plain = {o: item.label for o, item in label_report(case[0], gated=False).items()}
    assert fast == plain


# A normal state said of a list of subjects applies to each; pleural spaces and lungs "clear".
NORMAL_LISTS: list[Case] = [
    (
        "The heart, pulmonary vasculature and mediastinum are within normal limits.",
        {HEART: N, EDEMA: N, MEDIASTINUM: N},
    ),
    (
        "The cardiac silhouette, mediastinum, and pulmonary vasculature are unremarkable.",
        {HEART: N, MEDIASTINUM: N, EDEMA: N},
    ),
    (
        "Heart size, mediastinal contour, and pulmonary vascularity are within normal limits.",
        {HEART: N, MEDIASTINUM: N, EDEMA: N},
    ),
    ("The heart and pulmonary vasculature are normal.", {HEART: N, EDEMA: N}),
    ("The heart is enlarged and the mediastinum is normal.", {HEART: P, MEDIASTINUM: N}),
    ("Heart size and pulmonary vascularity are increased.", {HEART: P}),
    ("The pleural spaces are clear.", {EFFUSION: N}),
    ("Clear right lung.", {OPACITY: N, CONSOLIDATION: N}),
    ("Clear, hyperaerated lungs.", {OPACITY: N, CONSOLIDATION: N}),
    ("Stents in the left anterior descending artery.", {DEVICES: M}),
    ("Compatible with scarring or subsegmental atelectasis.", {ATELECTASIS: U}),
    ("Focal subsegmental atelectasis/scarring in the left mid lung.", {ATELECTASIS: U}),
    ("Left basilar subsegmental atelectasis.", {ATELECTASIS: P}),
    ("Left or right lower lobe atelectasis cannot be told apart.", {ATELECTASIS: P}),
]


@pytest.mark.parametrize("case", NORMAL_LISTS, ids=_id)
def test_normal_state_of_a_list_and_other_real_phrasings(case: Case) -> None:
    _check(case)


# From the independent review of this change: a broadened negation or hedge must never hide
# a present finding or raise a false alert. Each was right before the change or is a
# pre-existing defect the review found.
REVIEW_PRESENT: list[Case] = [
    ("Effusion not seen, small left pneumothorax.", {PTX: P, EFFUSION: N}),
    ("Pneumothorax not identified, small left effusion.", {EFFUSION: P, PTX: N}),
    ("Chest tube removed, small left pneumothorax.", {PTX: P}),
    ("Effusion resolved, small right pneumothorax.", {PTX: P}),
    ("Pneumothorax no longer seen, small left effusion persists.", {EFFUSION: P}),
    ("Pneumonia unlikely, small left effusion.", {EFFUSION: P}),
    ("Patient not rotated, small right pneumothorax.", {PTX: P}),
    ("No mediastinal shift, large left pneumothorax and effusion.", {PTX: P, EFFUSION: P}),
    ("No comparison, large left pneumothorax and effusion.", {PTX: P, EFFUSION: P}),
    ("No hyperinflation, right lower lobe consolidation and effusion.", {CONSOLIDATION: P}),
    ("No prior exam, moderate cardiomegaly and edema.", {HEART: P, EDEMA: P}),
    ("No tension seen in the large left pneumothorax.", {PTX: P}),
    ("No re-expansion noted of the large left pneumothorax.", {PTX: P}),
    ("No response noted in the left pleural effusion.", {EFFUSION: P}),
    (
        "No acute cardiopulmonary process, small left pneumothorax and effusion.",
        {PTX: P, EFFUSION: P, NO_FINDING: M},
    ),
    ("No consolidation, large right pneumothorax and small effusion.", {PTX: P, EFFUSION: P}),
    ("No pneumothorax, small effusions and bibasilar atelectasis.", {EFFUSION: P}),
    ("Left chest tube w/pneumothorax.", {PTX: P}),
    ("Small left pneumothorax and/or hydropneumothorax.", {PTX: P}),
    ("Pneumothorax/hydropneumothorax.", {PTX: P}),
    ("Left effusion/hemothorax.", {EFFUSION: P}),
    ("Left IJ or subclavian line in place.", {DEVICES: P}),
    ("IJ/PICC line in the SVC.", {DEVICES: P}),
    ("No, left pneumothorax.", {PTX: P}),
    ("No acute, left pneumothorax.", {PTX: P}),
    ("Small left pleural effusion, with or without atelectasis.", {EFFUSION: P, ATELECTASIS: U}),
    ("No pneumothorax, small effusion.", {PTX: N, EFFUSION: P}),
    (
        "Without focal consolidation, large effusion or pneumothorax.",
        {CONSOLIDATION: N, EFFUSION: N, PTX: N},
    ),
]
REVIEW_NEGATED: list[Case] = [
    ("Pneumothorax no longer apparent.", {PTX: N}),
    ("Pneumothorax is not readily apparent.", {PTX: N}),
    ("Effusion is not clearly apparent.", {EFFUSION: N}),
    ("No readily apparent pneumothorax.", {PTX: N}),
    ("Without any apparent pneumothorax.", {PTX: N}),
    ("No pneumothorax or apparent effusion.", {EFFUSION: N}),
    ("No suggestion of pneumothorax.", {PTX: N}),
    ("No radiographic suggestion of pneumothorax.", {PTX: N}),
    ("No evidence or suggestion of pneumothorax.", {PTX: N}),
    ("No suggestion of pneumothorax or effusion.", {PTX: N, EFFUSION: N}),
    ("No findings suspicious for pneumothorax.", {PTX: N}),
    ("No concern for pneumothorax.", {PTX: N}),
    ("Nothing to suggest pneumothorax.", {PTX: N}),
    ("No effusion, pneumothorax or free air.", {PTX: N, EFFUSION: N}),
    ("No pneumothorax, effusion, or XXXX.", {PTX: N, EFFUSION: N}),
    ("No XXXX, XXXX, pneumothorax.", {PTX: N}),
    ("Pneumothorax isn't seen.", {PTX: N}),
    ("There isn\u2019t a pneumothorax.", {PTX: N}),
    ("Pneumothorax: neg.", {PTX: N}),
]


@pytest.mark.parametrize("case", REVIEW_PRESENT, ids=_id)
def test_review_present_findings_stay_present(case: Case) -> None:
    _check(case)


@pytest.mark.parametrize("case", REVIEW_NEGATED, ids=_id)
def test_review_negated_findings_stay_negative(case: Case) -> None:
    _check(case)


# From the second independent review.
SECOND_REVIEW: list[Case] = [
    # a normal list never outranks what is said of one of its subjects
    ("Enlarged heart, mediastinum and hila are normal.", {HEART: P}),
    (
        "There is an enlarged cardiac silhouette, and the mediastinum and hila are normal.",
        {HEART: P},
    ),
    ("Widened mediastinum, heart and hila are normal.", {MEDIASTINUM: P, HEART: N}),
    ("Increased heart size, mediastinal and hilar contours are normal.", {HEART: P}),
    ("Borderline heart size, mediastinum and hila are normal.", {HEART: U}),
    ("Prominent pulmonary vasculature, heart and mediastinum are normal.", {EDEMA: U, HEART: N}),
    ("Heart size and mediastinum are normal or mildly enlarged.", {HEART: M}),
    # "nothing" does not reach over commas
    ("Nothing new, cardiomegaly and effusion.", {HEART: P, EFFUSION: P}),
    ("Nothing acute, consolidation in the right lower lobe.", {CONSOLIDATION: P}),
    ("Nothing more than mild pulmonary edema.", {EDEMA: P}),
    (
        "Nothing to suggest pneumonia, cardiomegaly and small effusions.",
        {PNEUMONIA: N, HEART: P, EFFUSION: P},
    ),
    # a presence word keeps an item present even when "or" closes the list
    ("No pneumothorax, increasing left effusion or hemorrhage.", {PTX: N, EFFUSION: U}),
    ("No pneumothorax and small left effusion.", {PTX: N, EFFUSION: P}),
    # a course word governs its list: no alternatives there
    ("No change in the left effusion or the right pneumothorax.", {PTX: P, EFFUSION: P}),
    ("No interval increase in the right pneumothorax or subcutaneous emphysema.", {PTX: P}),
    ("Unchanged right pneumothorax or left effusion.", {PTX: P, EFFUSION: P}),
    # pre-existing defects it found
    ("No visualized right pneumothorax.", {PTX: N}),
    # the same participle rule joins the items of a negated list
    ("No effusion or visualized right pneumothorax.", {PTX: N, EFFUSION: N}),
    ("No pleural effusion or identified left apical pneumothorax.", {PTX: N, EFFUSION: N}),
    (
        "No focal consolidation, effusion or visualized right pneumothorax.",
        {PTX: N, EFFUSION: N, CONSOLIDATION: N},
    ),
    ("No effusion seen, left pneumothorax.", {PTX: P}),
    ("No identified left apical pneumothorax.", {PTX: N}),
    ("No residual, recurrent pneumothorax.", {PTX: N}),
    ("No new, large pneumothorax.", {PTX: N}),
    ("Can't see a pneumothorax.", {PTX: N}),
    ("The pneumothorax is gone.", {PTX: N}),
    ("The pneumothorax isn't resolved.", {PTX: P}),
    ("The left effusion hasn't completely resolved.", {EFFUSION: P}),
]


@pytest.mark.parametrize("case", SECOND_REVIEW, ids=_id)
def test_second_review(case: Case) -> None:
    _check(case)
