"""The labeler's mention vocabulary: which phrases name each observation, and with what label."""

from __future__ import annotations

from dataclasses import dataclass

from cds_service.findings.matching import GatedPattern, patterns, up_to_words
from cds_service.findings.observations import Label, Observation


@dataclass(frozen=True)
class MentionRule:
    """A pattern that mentions one or more observations.

    The anchor is the named group ``a`` when the pattern has one (for "heart size is not
    enlarged" the anchor is "enlarged", so the "not" before it is a cue), else the whole match.
    """

    observations: tuple[Observation, ...]
    patterns: tuple[GatedPattern, ...]
    base: Label = Label.POSITIVE
    fixed: bool = False  # the base label holds whatever cues surround the mention
    priority: int = 0  # wins overlaps with other rules for the same observation
    normal: bool = False  # a whole-study normal statement, evidence for No Finding


_COP = r"(?:is|are|was|were|appears?|remains?|seems?|looks?)"
# Words that may sit between a subject and its state without changing what is said about it.
_STATE_GAP = up_to_words(3, "and|but|or|with|normal")
_NORMAL_GAP = up_to_words(
    4, "not|no|enlarged|enlarging|increased|large|prominent|borderline|widened"
)
_HEART = (
    r"(?:heart(?:\s+size)?|cardiac\s+(?:size|silhouette|shadow|contours?|diameter|outline)"
    r"|size\s+of\s+the\s+(?:heart|cardiac\s+silhouette)|cardiothoracic\s+ratio)"
)
# A normal state said of a list of subjects applies to each of them: "the heart, mediastinum
# and pulmonary vasculature are within normal limits". The lookahead runs from one subject
# over the rest of the list (no verb or negation in it) to the plural verb and the state.
_LIST_TAIL = (
    r"(?:\s*,|\s+and\b)(?:(?!\b(?:is|are|was|were|has|have|with|without|no|not|but|which"
    r"|enlarged|enlarging|increased|large|widened|prominent|borderline)\b)"
    r"[^.;:]){0,60}?\b(?:are|appear|remain)\s+(?:\w+ly\s+)?"
)
_LIST_TO_NORMAL_STATE = (
    rf"(?={_LIST_TAIL}(?:within\s+(?:normal\s+limits|limits\s+of\s+normal)|normal"
    r"|unremarkable)\b(?!\s+(?:to|or|versus|vs)\b))"
)
_LIST_TO_ENLARGED_STATE = rf"(?={_LIST_TAIL}(?:enlarged|increased|widened)\b)"
_CMS = r"cardio[- ]?mediastinal\s+(?:silhouettes?|contours?|shadow|size|structures)"
_MEDIASTINUM = r"(?:mediastinal\s+(?:silhouettes?|contours?|shadow|width)|mediastinum)"
_NORMAL_STATE = (
    r"(?P<a>normal|within\s+normal\s+limits|unremarkable"
    r"|(?:at\s+)?(?:the\s+)?upper\s+(?:limits?|range)\s+of\s+normal|(?:top|upper|high)[- ]normal)"
    r"\b(?!\s+(?:to|or|versus|vs)\b)"
)
# What may stand between "no" and a whole-study phrase: "no definite radiographic evidence of".
_NO_MODIFIERS = (
    r"(?:(?:definite|significant|radiographic|convincing|evidence\s+of|signs?\s+of|an?|any"
    r"|other)\s+)*"
)
_ENLARGED = r"(?P<a>enlarged|enlarging|increased|large|widened|wide|widening)\b"

# Whole-study normal statements ("no acute cardiopulmonary process", "normal chest
# radiograph") name no single observation: by the labelling rules they label none, and are
# only the normal statement the No Finding rule asks for. Their rule has no observations.
NORMAL_STATEMENT: tuple[Observation, ...] = ()


def _normal_in_a_list(observation: Observation, triggers: str, subject: str) -> MentionRule:
    """``subject`` (a regex) as one of a list of subjects said to be normal: negative, at the
    lowest priority, so any other mention of the same subject wins."""
    return MentionRule(
        (observation,),
        patterns((triggers, rf"\b(?P<a>{subject}){_LIST_TO_NORMAL_STATE}")),
        base=Label.NEGATIVE,
        fixed=True,
        priority=-1,
    )


MENTION_RULES: tuple[MentionRule, ...] = (
    # --- Cardiomegaly -----------------------------------------------------------------------
    MentionRule(
        (Observation.CARDIOMEGALY,),
        patterns(
            ("cardiom", r"\bcardiom[aei]{0,2}g[aei]{0,2}l{1,2}[ae]?y\b"),
            (
                "heart|cardi",
                r"\b(?:enlarged|enlarging|large|increased)\s+(?:heart\s+size|heart"
                r"|cardiac\s+(?:silhouette|shadow|contours?|size))\b",
            ),
            ("enlargement", r"\b(?:cardiac|heart)\s+enlargement\b"),
            (
                "enlargement",
                r"\benlargement\s+of\s+the\s+(?:heart|cardiac\s+(?:silhouette|shadow))\b",
            ),
            ("increase", r"\bincreased?\s+in\s+(?:the\s+)?(?:heart|cardiac)\s+size\b"),
            ("heart|cardi", rf"\b{_HEART}\s+(?:{_COP}\s+)?{_STATE_GAP}{_ENLARGED}"),
            ("heart|cardi", rf"\b(?P<a>{_HEART}){_LIST_TO_ENLARGED_STATE}"),
        ),
    ),
    MentionRule(
        (Observation.CARDIOMEGALY,),
        patterns(
            (
                "normal",
                rf"\b{_HEART}\s+(?:{_COP}\s+)?{_STATE_GAP}(?P<a>(?:(?:top|upper|high)[- ])?normal"
                r"\s+(?:to|or|versus|vs\.?)\s+(?:\w+\s+)?(?:enlarged|large|increased))",
            ),
        ),
        base=Label.UNCERTAIN,
        fixed=True,
        priority=3,
    ),
    MentionRule(
        (Observation.CARDIOMEGALY,),
        patterns(
            (
                "borderline|prominent",
                rf"\b{_HEART}\s+(?:{_COP}\s+)?{_STATE_GAP}"
                r"(?P<a>borderline|prominent)\b",
            ),
            (
                "borderline",
                r"\bborderline\s+(?:enlarged\s+)?(?P<a>heart\s+size|cardiac\s+(?:size|silhouette))\b",
            ),
            (
                "prominen",
                r"\bprominen(?:t|ce\s+of\s+the)\s+(?:heart|cardiac\s+(?:silhouette|contours?"
                r"|shadow))\b",
            ),
        ),
        base=Label.UNCERTAIN,
    ),
    MentionRule(
        (Observation.CARDIOMEGALY,),
        patterns(
            ("normal|unremarkable", rf"\b{_HEART}\s+(?:{_COP}\s+)?{_NORMAL_GAP}{_NORMAL_STATE}"),
            (
                "normal",
                r"\b(?:normal|top[- ]normal|upper[- ]normal|normal[- ]sized?)\s+(?:heart|cardiac)"
                r"(?:\s+(?:size|silhouette|contours?|shadow))?\b",
            ),
        ),
        base=Label.NEGATIVE,
        fixed=True,
        priority=2,
    ),
    # A normal cardiomediastinal silhouette includes a heart of normal size (decision: negative
    # for both; "enlarged cardiomediastinal silhouette" stays Enlarged Cardiomediastinum only).
    MentionRule(
        (Observation.ENLARGED_CARDIOMEDIASTINUM, Observation.CARDIOMEGALY),
        patterns(
            ("normal|unremarkable", rf"\b{_CMS}\s+(?:{_COP}\s+)?{_NORMAL_GAP}{_NORMAL_STATE}"),
            ("normal", rf"\bnormal(?:[- ]appearing)?\s+{_CMS}\b"),
            (
                "normal|unremarkable",
                r"\b(?:heart|cardiac)\s+(?:size\s+)?and\s+mediastin(?:um|al)"
                rf"(?:\s+(?:contours?|silhouettes?|shadow))?\s+(?:{_COP}\s+)?{_NORMAL_GAP}"
                + _NORMAL_STATE,
            ),
            (
                "normal",
                r"\bnormal\s+(?:heart|cardiac)\s+(?:size\s+)?and\s+mediastin(?:um|al\s+\w+)\b",
            ),
            # "not enlarged" says normal as plainly as "normal" does.
            (
                "not",
                rf"\b(?:{_CMS}|(?:heart|cardiac)\s+(?:size\s+)?and\s+mediastin(?:um|al)"
                rf"(?:\s+(?:contours?|silhouettes?|shadow))?)\s+(?:{_COP}\s+)?"
                r"not\s+(?:\w+ly\s+)?(?P<a>enlarged|widened|increased)\b",
            ),
        ),
        base=Label.NEGATIVE,
        fixed=True,
        priority=2,
    ),
    # --- Enlarged Cardiomediastinum ---------------------------------------------------------
    MentionRule(
        (Observation.ENLARGED_CARDIOMEDIASTINUM,),
        patterns(
            ("mediastin", rf"\b(?:{_CMS}|{_MEDIASTINUM})\s+(?:{_COP}\s+)?{_STATE_GAP}{_ENLARGED}"),
            (
                "mediastin",
                r"\b(?:enlarged|enlarging|widened|wide|large)\s+(?:(?:superior|upper)\s+)?"
                rf"(?:{_CMS}|{_MEDIASTINUM})",
            ),
            ("mediastin", r"\b(?:cardio[- ]?)?mediastinal\s+(?:widening|enlargement)\b"),
            ("mediastin", r"\bwidening\s+of\s+the\s+(?:superior\s+)?mediastinum\b"),
        ),
    ),
    MentionRule(
        (Observation.ENLARGED_CARDIOMEDIASTINUM,),
        patterns(
            (
                "prominen",
                rf"\b(?:{_CMS}|{_MEDIASTINUM})\s+(?:{_COP}\s+)?{_STATE_GAP}(?P<a>prominent)\b",
            ),
            ("prominen", rf"\bprominen(?:t|ce\s+of\s+the)\s+(?:{_CMS}|{_MEDIASTINUM})"),
            ("prominen", r"\bmediastinal\s+prominence\b"),
        ),
        base=Label.UNCERTAIN,
    ),
    MentionRule(
        (Observation.ENLARGED_CARDIOMEDIASTINUM,),
        patterns(
            (
                "normal|unremarkable",
                rf"\b{_MEDIASTINUM}\s+(?:{_COP}\s+)?{_NORMAL_GAP}{_NORMAL_STATE}",
            ),
            ("normal", rf"\bnormal\s+{_MEDIASTINUM}"),
        ),
        base=Label.NEGATIVE,
        fixed=True,
        priority=2,
    ),
    # --- Lung Lesion (a granuloma is not a lesion mention: the labelling rules) ------------
    MentionRule(
        (Observation.LUNG_LESION,),
        patterns(
            ("nodul", r"\bnodul\w*"),
            ("mass", r"\bmass(?:es)?\b(?!\s+effect)|\bmass[- ]?like\b"),
            (
                "lesion",
                r"\blesion(?<!osseous lesion)(?<!lytic lesion)(?<!bony lesion)(?<!bone lesion)"
                r"(?<!skin lesion)(?<!sclerotic lesion)(?<!blastic lesion)"
                r"(?<!destructive lesion)s?\b",
            ),
            (
                "tumo|neoplas|malignan|carcinoma|metasta|cancer",
                r"\b(?:tumou?rs?|neoplasms?|neoplastic|malignan\w+|carcinoma|metasta\w+|cancer)\b",
            ),
            # A cavity in the lung, not the thoracic or pleural cavity.
            (
                "cavit",
                r"\b(?<!thoracic )(?<!pleural )(?<!chest )(?<!abdominal )(?<!peritoneal )"
                r"(?<!pericardial )(?<!oral )(?<!nasal )(?<!body )cavit(?:y|ies|ary|ation)\b",
            ),
        ),
    ),
    # --- Lung Opacity -----------------------------------------------------------------------
    MentionRule(
        (Observation.LUNG_OPACITY,),
        patterns(
            (
                "opac|opec",
                r"\b(?<!sinus )op[ae]c\w*\b(?!\s+of\s+the\s+(?:\w+\s+){0,2}?"
                r"(?:sinus|sinuses|ethmoid|maxillary|frontal|sphenoid|mastoid|air\s+cells|antrum)\b)",
            ),
            ("infilt", r"\binfilt\w*"),
            ("haz", r"\bhaz(?:y|iness)\b"),
            ("space", r"\bair[- ]?space\s+(?:disease|process|filling)\b"),
            ("glass", r"\bground[- ]glass\b"),
        ),
    ),
    # "Lungs are clear": the issue maps it to negative Lung Opacity and Consolidation
    # ("lungs are unremarkable" and "normal lungs" say the same).
    MentionRule(
        (Observation.LUNG_OPACITY, Observation.CONSOLIDATION),
        patterns(
            (
                "clear",
                r"\b(?:lungs?|(?:pulmonary|lung)\s+parenchyma)(?:\s+(?:fields?|parenchyma|bases))?\s*:?"
                r"\s+(?:{cop}\s+)?{gap}"
                r"(?P<a>clear)\b(?!\s+of\b)".format(cop=_COP, gap=up_to_words(3, "not|no|and")),
            ),
            (
                "clear",
                rf"\blungs?(?:\s+(?:fields?|parenchyma|bases))?\s+(?:{_COP}\s+)?(?:[\w-]+\s+){{0,4}}?"
                r"and\s+(?P<a>clear)\b",
            ),
            (
                "clear",
                r"\bclear,?\s+(?:(?:left|right|bilateral|hyper\w+|well[- ]expanded|expanded)\s+)?"
                r"lungs?\b",
            ),
            (
                "normal|unremarkable",
                r"\blungs?(?:\s+(?:fields?|parenchyma))?\s+(?:are|is|appears?|remains?)\s+"
                r"(?:\w+ly\s+)?(?P<a>unremarkable|normal|within\s+normal\s+limits)\b",
            ),
            ("normal|unremarkable", r"\b(?:normal|unremarkable)\s+lungs\b"),
        ),
        base=Label.NEGATIVE,
        fixed=True,
    ),
    # --- Edema ------------------------------------------------------------------------------
    MentionRule(
        (Observation.EDEMA,),
        patterns(
            (
                "edem",
                r"\bo?edem(?<!tissue edem)(?<!subcutaneous edem)(?<!wall edem)[ae]\w*",
            ),
            ("edmea", r"\bedmea\b"),
            (
                "congest|engorg|redistribution|plethora",
                r"\b(?:vascular|venous|pulmonary|central|perihilar|interstitial|hilar)\s+"
                r"(?:congestion|engorgement|redistribution|plethora)\b",
            ),
            ("congest", r"\bcongest(?:ion|ed|ive)\b"),
            ("engorg", r"\bengorge\w*"),
            ("overload", r"\b(?:fluid|volume)\s+overload(?:ed)?\b"),
            # Kerley lines, cephalization and peribronchial cuffing are signs, not labelled on
            # their own (the labelling rules).
            ("venous", r"\bpulmonary\s+venous\s+hypertension\b"),
            ("chf|failure", r"\bchf\b|\bheart\s+failure\b"),
        ),
    ),
    MentionRule(
        (Observation.EDEMA,),
        patterns(
            (
                "vascul",
                r"\b(?:pulmonary\s+)?vascula(?:ture|rity|r\s+markings)\s+(?:{cop}\s+)?{gap}"
                r"(?P<a>increased|engorged|congested|indistinct)\b".format(
                    cop=_COP, gap=up_to_words(2, "and|but|or|with")
                ),
            ),
        ),
    ),
    MentionRule(
        (Observation.EDEMA,),
        patterns(
            (
                "prominen",
                r"\bprominen(?:t|ce\s+of\s+the)\s+(?:pulmonary\s+)?vascul\w+\b"
                r"|\b(?:pulmonary\s+)?vascular\s+prominence\b"
                r"|\b(?:pulmonary\s+)?vascula(?:ture|rity|r\s+markings)\s+(?:is|are|appears?)\s+"
                r"(?:\w+\s+)?prominent\b",
            ),
        ),
        base=Label.UNCERTAIN,
    ),
    MentionRule(
        (Observation.EDEMA,),
        patterns(
            (
                "normal|unremarkable",
                r"\b(?:pulmonary\s+)?vascula(?:ture|rity|r\s+markings)\s+"
                rf"(?:{_COP}\s+)?{_NORMAL_GAP}{_NORMAL_STATE}",
            ),
            ("normal", r"\bnormal\s+(?:pulmonary\s+)?vascula(?:ture|rity)\b"),
        ),
        base=Label.NEGATIVE,
        fixed=True,
        priority=2,
    ),
    # --- Consolidation ----------------------------------------------------------------------
    MentionRule(
        (Observation.CONSOLIDATION,),
        patterns(
            ("sol|sil", r"\bcon{1,2}s{1,2}[oi]l{1,2}[aeio]?d\w*"),
            ("bronchogram", r"\bair\s+bronchograms?\b"),
        ),
    ),
    # --- Pneumonia --------------------------------------------------------------------------
    MentionRule(
        (Observation.PNEUMONIA,),
        patterns(
            ("mon", r"\b(?:broncho)?pn?[eu]{1,3}mon(?:ia|ai|a)s?\b|\bpneumoni(?:c|tis)\b"),
            ("pna", r"\bpna\b"),
            # "Previous granulomatous infection" is history, not a current pneumonia.
            (
                "infect",
                r"\b(?<!granulomatous )(?<!previous )(?<!prior )(?<!old )(?<!remote )"
                r"(?<!healed )(?<!past )infect(?:ions?|ious)\b",
            ),
        ),
    ),
    # --- Atelectasis ------------------------------------------------------------------------
    MentionRule(
        (Observation.ATELECTASIS,),
        patterns(
            # Type words belong to the mention, so "scarring or subsegmental atelectasis"
            # reads as one alternative.
            (
                "atel|atal",
                r"\b(?:(?:sub-?segmental|segmental|plate[- ]?like|discoid|linear|bibasilar"
                r"|basilar|bibasal|basal|chronic|obstructive|compressive|passive|dependent"
                r"|rounded|lobar)\s+)*at[ae]l[ae]?c?t[a-z]*",
            ),
            (
                "collaps",
                r"\bcollaps(?<!vertebral collaps)(?<!body collaps)(?<!height collaps)"
                r"(?<!compression collaps)(?:e|ed|es|ing)\b",
            ),
            ("segmental", r"\bsub-?segmental\b"),
            ("plate", r"\bplate[- ]?like\b"),
            ("discoid", r"\bdiscoid\b"),
        ),
    ),
    # --- Pneumothorax -----------------------------------------------------------------------
    MentionRule(
        (Observation.PNEUMOTHORAX,),
        patterns(
            ("thor|thro|tor|tro", r"\b(?:hydro)?pn?[eu]{0,3}m[aeo]?th?(?:or|ro)[aeo]?(?:x|c\w*)\b"),
            ("ptx", r"\bptx\b"),
            (
                "air",
                r"\bpleural\s+air(?:\s+collections?)?\b|\bair(?:\s+collections?)?\s+(?:in|within)"
                r"\s+the\s+(?:[a-z]+\s+){0,2}?pleural\s+(?:space|cavity)\b",
            ),
            ("sulcus", r"\bdeep\s+sulcus\s+sign\b"),
        ),
    ),
    # --- Pleural Effusion -------------------------------------------------------------------
    MentionRule(
        (Observation.PLEURAL_EFFUSION,),
        patterns(
            (
                "fus|fs",
                r"\be(?<!pericardial e)(?<!joint e)f{1,2}u?s{1,2}(?:ion|oin|on|ino)s?\b",
            ),
            (
                "fluid",
                r"\bpleural\s+fluid\b|\bfluid\s+(?:in|within)\s+the\s+(?:\w+\s+)?pleural\s+spaces?\b"
                r"|\b(?:layering|fissural|subpulmonic|loculated)\s+fluid\b|\bfluid\s+layering\b",
            ),
            ("thora", r"\b(?:hydro|hemo|haemo|chylo|hydropneumo)thora(?:x|ces)\b"),
            ("empyema", r"\bempyema\b"),
            (
                "blunt",
                r"\bblunt(?:ing|ed)\s+(?:of\s+)?(?:the\s+)?(?:(?:left|right|bilateral|both|lateral"
                r"|posterior)\s+)*(?:costophrenic|costo-phrenic|cp)\s+(?:angles?|sulcus|sulci"
                r"|recess)|\b(?:costophrenic|cp)\s+(?:angle\s+)?blunting\b",
            ),
            (
                "blunt",
                rf"\b(?:costophrenic|cp)\s+(?:angles?|sulcus|sulci)\s+(?:{_COP}\s+)?{up_to_words(2)}"
                r"(?P<a>blunt(?:ing|ed)?)\b",
            ),
        ),
    ),
    MentionRule(
        (Observation.PLEURAL_EFFUSION,),
        patterns(
            (
                "costo|cp",
                r"\b(?:costophrenic|cp)\s+(?:angles?|sulcus|sulci|recess(?:es)?)\s+(?:{cop}\s+)?"
                r"{gap}(?P<a>sharp|clear|preserved|normal)\b".format(
                    cop=_COP, gap=up_to_words(2, "not|no")
                ),
            ),
            ("sharp", r"\bsharp\s+(?:costophrenic|cp)\s+(?:angles?|sulci)\b"),
            (
                "clear",
                rf"\bpleural\s+spaces?\s+(?:{_COP}\s+)?(?:\w+ly\s+)?(?P<a>clear)\b(?!\s+of\b)",
            ),
        ),
        base=Label.NEGATIVE,
        fixed=True,
        priority=2,
    ),
    # --- Pleural Other ----------------------------------------------------------------------
    MentionRule(
        (Observation.PLEURAL_OTHER,),
        patterns(
            (
                "pleura",
                r"\bpleural(?:[- ]based|[- ]parenchymal)?\s+(?:thicken\w*|plaques?|scarring|scar"
                r"|calcifications?|fibrosis)\b|\bthickening\s+of\s+the\s+pleura\b",
            ),
            ("cap", r"\bapical\s+(?:pleural\s+)?cap(?:ping|s)?\b"),
            ("fibrothorax", r"\bfibrothorax\b"),
        ),
    ),
    # --- Fracture ---------------------------------------------------------------------------
    MentionRule(
        (Observation.FRACTURE,),
        patterns(
            (
                "frac|fx|broken",
                r"\bfract?(?:ure|rue|ur|ue)[sd]?\b|\bfracure[sd]?\b|\bfx\b|\bbroken\s+ribs?\b",
            ),
        ),
    ),
    # --- Support Devices --------------------------------------------------------------------
    MentionRule(
        (Observation.SUPPORT_DEVICES,),
        patterns(
            ("tub", r"\btubes?\b|\btubing\b"),
            ("ett|endotracheal|trach", r"\bett\b|\bendotracheal\b|\btracheostomy\b|\btrach\b"),
            (
                "cath|picc|cvc|swan|introducer|sheath|port|hickman",
                r"\bcatheters?\b|\bport[- ]?a[- ]?cath\b|\bpicc\b|\bcvc\b|\bswan[- ]?ganz\b"
                r"|\bintroducer\b|\bsheath\b|\b(?:medi|power\s*)?ports?\b|\bhickman\b"
                r"|\bpermcath\b",
            ),
            (
                "line",
                r"\b(?:central|venous|arterial|midline|dialysis|hemodialysis|ij|jugular|subclavian"
                r"|femoral|pa|pulmonary\s+artery|triple[- ]lumen|double[- ]lumen)\s+(?:venous\s+)?"
                r"lines?\b|\blines?\s+and\s+tubes?\b|\btubes?\s+and\s+lines?\b",
            ),
            (
                "pace|icd|defib|recorder",
                r"\bpace(?:maker|r)s?\b|\baicd\b|\bicd\b|\bdefibrillators?\b|\bloop\s+recorder\b",
            ),
            (
                "lead|wire|generator|electrode|device",
                r"\b(?:pacing|pacer|pacemaker|icd|aicd|defibrillator|cardiac|transvenous|epicardial"
                r"|ekg|ecg|monitoring)\s+(?:leads?|wires?|generator|electrodes?|device)\b",
            ),
            ("lead", r"\bleads?\s+(?:terminat\w+|project\w*|tips?|in\s+the)\b"),
            (
                "stern|wire",
                r"\bsternal\s+(?:wires?|sutures?|cerclage)\b|\b(?:guide)?wires?\b",
            ),
            (
                "hardware|drain",
                r"\bhardware\b|\bdrains?\b",
            ),
            ("cannula|shunt", r"\bcannula\w*|\bshunt\b"),
            (
                "valve|annuloplasty|tav",
                r"\b(?:valve\s+(?:replacement|prosthesis)|prosthetic\s+(?:\w+\s+)?valve"
                r"|annuloplasty|tavr|tavi)\b",
            ),
            (
                "vad|impella|iabp|ecmo|balloon",
                r"\b(?:lvad|rvad|impella|iabp|ecmo)\b|\b(?:intra[- ]?aortic\s+)?balloon\s+pump\b",
            ),
            ("device", r"\bdevices?\b"),
        ),
    ),
    # --- A normal state said of a list of subjects ("the heart, mediastinum and vasculature
    # are normal"). Lowest priority: any other mention of the same subject wins ("enlarged
    # heart, mediastinum and hila are normal" keeps the enlarged heart).
    _normal_in_a_list(Observation.CARDIOMEGALY, "heart|cardi", _HEART),
    _normal_in_a_list(Observation.ENLARGED_CARDIOMEDIASTINUM, "mediastin", _MEDIASTINUM),
    _normal_in_a_list(
        Observation.EDEMA, "vascula", r"(?:pulmonary\s+)?vascula(?:ture|rity|r\s+markings)"
    ),
    # --- Whole-study normal phrases ---------------------------------------------------------
    MentionRule(
        NORMAL_STATEMENT,
        patterns(
            (
                "acute|active",
                rf"\b(?:no|without|negative\s+for|free\s+of)\s+{_NO_MODIFIERS}"
                r"(?:acute|active)\s+(?:(?:cardiopulmonary|cardio-pulmonary"
                r"|intrathoracic|thoracic|chest|pulmonary|lung|cardiothoracic"
                r"|cardiac\s+or\s+pulmonary)\s+)?(?P<a>process(?:es)?|abnormalit(?:y|ies)|disease"
                r"|findings?|pathology|changes?)\b",
            ),
            (
                "abnormal|pathology",
                r"\b(?:no|without)\s+(?:(?:significant|radiographic|definite|acute)\s+)+"
                r"(?P<a>abnormalit(?:y|ies)|pathology)\b(?!\s+(?:of|in)\b)",
            ),
            (
                "normal",
                r"\bnormal\s+(?:(?:frontal|pa|ap|portable|upright|supine|two[- ]view"
                r"|single[- ]view|and|lateral)\s+)*(?:chest\s+)?(?P<a>radiographs?|x-?rays?"
                r"|radiography|study|films?|cxr|chest|exam(?:ination)?)\b",
            ),
            (
                "normal|unremarkable",
                rf"\b(?:chest|study|exam(?:ination)?|radiograph)\s+(?:{_COP}\s+)?(?P<a>within\s+normal"
                r"\s+limits|normal|unremarkable)\b",
            ),
            (
                "unremarkable",
                r"\bunremarkable\s+(?:chest\s+)?(?P<a>radiographs?|x-?rays?|study"
                r"|exam(?:ination)?|chest)\b",
            ),
            (
                "normal",
                r"\bnormal\s+(?:(?:radiographic|two|2|frontal|lateral|pa|ap|single)\s+)*"
                r"(?P<a>views?|appearance|radiographs?)\s+of\s+the\s+chest\b",
            ),
            (
                "negative",
                r"\bnegative\s+(?:(?:frontal|pa|ap|portable|two[- ]view|lateral|and)\s+)*"
                r"(?:chest\s+)?(?P<a>chest|study|exam(?:ination)?|radiographs?|x-?rays?|films?)\b"
                r"(?!\s+for\b)",
            ),
            (
                "negative|clear",
                rf"\b(?:chest|study|exam(?:ination)?|radiographs?)\s+(?:{_COP}\s+)?"
                r"(?P<a>negative|clear)\b(?!\s+(?:for|of)\b)",
            ),
            ("clear", r"\bclear\s+(?P<a>chest)\b"),
        ),
        base=Label.NEGATIVE,
        fixed=True,
        normal=True,
    ),
)
