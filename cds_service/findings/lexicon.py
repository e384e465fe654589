"""The labeler's vocabulary: mention patterns per observation and the cue phrases around them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from cds_service.findings.observations import Label, Observation

Obs = Observation
POS, NEG, UNC = Label.POSITIVE, Label.NEGATIVE, Label.UNCERTAIN
_WORD_CHAR = re.compile(r"\w")


@dataclass(frozen=True, eq=False)
class Gated:
    """A regex with the trigger substrings that every one of its matches contains.

    Two speed-ups over a plain ``finditer``, both exact: a sentence that holds none of the
    triggers is never scanned (TriggerIndex), and a leading ``\\b`` is checked in Python
    rather than by the regex, because ``re`` only scans quickly for patterns that start with
    a literal or a character set. ``full`` is the regex as written; the tests check that
    both ways give the same labels.
    """

    triggers: tuple[str, ...]
    regex: re.Pattern[str]
    full: re.Pattern[str]
    word_start: bool

    def scan(self, text: str, fast: bool = True) -> list[re.Match[str]]:
        """Matches in order, as ``full.finditer`` gives them (triggers not checked)."""
        if not fast:
            return list(self.full.finditer(text))
        if not self.word_start:
            return list(self.regex.finditer(text))
        found: list[re.Match[str]] = []
        search = self.regex.search
        pos = 0
        while (match := search(text, pos)) is not None:
            start = match.start()
            if start and _WORD_CHAR.match(text, start - 1):
                pos = start + 1  # not at a word start: "\\b" would have failed here
                continue
            found.append(match)
            pos = max(match.end(), start + 1)
        return found


_LETTERS = re.compile(r"[a-z]+")
_CACHE_LIMIT = 50_000


class TriggerIndex:
    """Which of many gated regexes may match a text, found word by word.

    A trigger made of letters only can occur only inside one run of letters, so the
    triggers each distinct word contains are worked out once and cached; the few triggers
    with other characters (";", "s/p", "?") are looked for in the whole text.
    """

    def __init__(self, gates: tuple[Gated, ...]) -> None:
        self.gates = gates
        by_trigger: dict[str, list[int]] = {}
        for index, gate in enumerate(gates):
            for trigger in gate.triggers:
                by_trigger.setdefault(trigger, []).append(index)
        entries = [(trigger, frozenset(ids)) for trigger, ids in by_trigger.items()]
        self._in_words = tuple(e for e in entries if _LETTERS.fullmatch(e[0]))
        self._elsewhere = tuple(e for e in entries if not _LETTERS.fullmatch(e[0]))
        self._all = frozenset(range(len(gates)))
        self._cache: dict[str, frozenset[int]] = {}

    def _word(self, word: str) -> frozenset[int]:
        ids: set[int] = set()
        for trigger, gate_ids in self._in_words:
            if trigger in word:
                ids |= gate_ids
        found = frozenset(ids)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = found
        return found

    def candidates(self, text: str, fast: bool = True) -> frozenset[int]:
        """Indexes of the gates whose triggers occur in ``text`` (all of them if not fast)."""
        if not fast:
            return self._all
        cache = self._cache
        hit: set[int] = set()
        for word in _LETTERS.findall(text):
            ids = cache.get(word)
            hit.update(self._word(word) if ids is None else ids)
        for trigger, gate_ids in self._elsewhere:
            if trigger in text:
                hit.update(gate_ids)
        return frozenset(hit)


def _g(triggers: str, *alternatives: str) -> Gated:
    """One gated regex from its triggers ("a|b") and its alternatives."""
    full = "|".join(alternatives)
    word_start = all(alt.startswith(r"\b") for alt in alternatives)
    fast = "|".join(alt[2:] for alt in alternatives) if word_start else full
    return Gated(tuple(triggers.split("|")), re.compile(fast), re.compile(full), word_start)


@dataclass(frozen=True)
class MentionRule:
    """A pattern that mentions one or more observations.

    The anchor is the named group ``a`` when the pattern has one (for "heart size is not
    enlarged" the anchor is "enlarged", so the "not" before it is a cue), else the whole match.
    """

    observations: tuple[Observation, ...]
    patterns: tuple[Gated, ...]
    base: Label = POS
    fixed: bool = False  # the base label holds whatever cues surround the mention
    priority: int = 0  # wins overlaps with other rules for the same observation
    normal: bool = False  # a whole-study "normal" phrase, evidence for No Finding


class Direction(Enum):
    """Which side of a cue the mentions it governs lie on."""

    FORWARD = "forward"
    BACKWARD = "backward"
    BOTH = "both"


@dataclass(frozen=True)
class CueRule:
    """A negation or uncertainty cue; ``reach`` is the most words between cue and mention.

    A ``clause_final`` cue counts only where it ends its phrase: "pneumothorax: none" but not
    "pneumothorax, no other abnormality" (see CLAUSE_FINAL_FOLLOWERS).
    """

    patterns: tuple[Gated, ...]
    direction: Direction
    reach: int
    clause_final: bool = False


def _gs(*alternatives: tuple[str, str]) -> tuple[Gated, ...]:
    """Gated regexes, each given as ("trigger|trigger", regex)."""
    return tuple(_g(triggers, regex) for triggers, regex in alternatives)


_m = _gs


def _words(n: int, excluded: str = "") -> str:
    """Up to ``n`` words (lazily), none of them one of the ``excluded`` alternatives."""
    guard = rf"(?!(?:{excluded})\b)" if excluded else ""
    return rf"(?:{guard}[\w/-]+\s+){{0,{n}}}?"


_COP = r"(?:is|are|was|were|appears?|remains?|seems?|looks?)"
# Words that may sit between a subject and its state without changing what is said about it.
_STATE_GAP = _words(3, "and|but|or|with|normal")
_NORMAL_GAP = _words(4, "not|no|enlarged|enlarging|increased|large|prominent|borderline|widened")
_HEART = (
    r"(?:heart(?:\s+size)?|cardiac\s+(?:size|silhouette|shadow|contours?|diameter|outline)"
    r"|size\s+of\s+the\s+(?:heart|cardiac\s+silhouette)|cardiothoracic\s+ratio)"
)
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

# Whole-study normal phrases. The issue asks for these to count as negative for the six
# acute observations below; Cardiomegaly, Lesion, Pleural Other, Fracture and devices are
# left alone because "no acute process" says nothing about a stable enlarged heart or a port.
NORMAL_STUDY_NEGATES = (
    Obs.CONSOLIDATION,
    Obs.EDEMA,
    Obs.PNEUMONIA,
    Obs.PNEUMOTHORAX,
    Obs.PLEURAL_EFFUSION,
    Obs.LUNG_OPACITY,
)

MENTION_RULES: tuple[MentionRule, ...] = (
    # --- Cardiomegaly -----------------------------------------------------------------------
    MentionRule(
        (Obs.CARDIOMEGALY,),
        _m(
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
        ),
    ),
    MentionRule(
        (Obs.CARDIOMEGALY,),
        _m(
            (
                "normal",
                rf"\b{_HEART}\s+(?:{_COP}\s+)?{_STATE_GAP}(?P<a>(?:(?:top|upper|high)[- ])?normal"
                r"\s+(?:to|or|versus|vs\.?)\s+(?:\w+\s+)?(?:enlarged|large|increased))",
            ),
        ),
        base=UNC,
        fixed=True,
        priority=3,
    ),
    MentionRule(
        (Obs.CARDIOMEGALY,),
        _m(
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
        base=UNC,
    ),
    MentionRule(
        (Obs.CARDIOMEGALY,),
        _m(
            ("normal|unremarkable", rf"\b{_HEART}\s+(?:{_COP}\s+)?{_NORMAL_GAP}{_NORMAL_STATE}"),
            (
                "normal",
                r"\b(?:normal|top[- ]normal|upper[- ]normal|normal[- ]sized?)\s+(?:heart|cardiac)"
                r"(?:\s+(?:size|silhouette|contours?|shadow))?\b",
            ),
        ),
        base=NEG,
        fixed=True,
        priority=2,
    ),
    # A normal cardiomediastinal silhouette includes a heart of normal size (decision: negative
    # for both; "enlarged cardiomediastinal silhouette" stays Enlarged Cardiomediastinum only).
    MentionRule(
        (Obs.ENLARGED_CARDIOMEDIASTINUM, Obs.CARDIOMEGALY),
        _m(
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
        ),
        base=NEG,
        fixed=True,
        priority=2,
    ),
    # --- Enlarged Cardiomediastinum ---------------------------------------------------------
    MentionRule(
        (Obs.ENLARGED_CARDIOMEDIASTINUM,),
        _m(
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
        (Obs.ENLARGED_CARDIOMEDIASTINUM,),
        _m(
            (
                "prominen",
                rf"\b(?:{_CMS}|{_MEDIASTINUM})\s+(?:{_COP}\s+)?{_STATE_GAP}(?P<a>prominent)\b",
            ),
            ("prominen", rf"\bprominen(?:t|ce\s+of\s+the)\s+(?:{_CMS}|{_MEDIASTINUM})"),
            ("prominen", r"\bmediastinal\s+prominence\b"),
        ),
        base=UNC,
    ),
    MentionRule(
        (Obs.ENLARGED_CARDIOMEDIASTINUM,),
        _m(
            (
                "normal|unremarkable",
                rf"\b{_MEDIASTINUM}\s+(?:{_COP}\s+)?{_NORMAL_GAP}{_NORMAL_STATE}",
            ),
            ("normal", rf"\bnormal\s+{_MEDIASTINUM}"),
        ),
        base=NEG,
        fixed=True,
        priority=2,
    ),
    # --- Lung Lesion (a calcified granuloma is a healed nodule: decision, positive) ---------
    MentionRule(
        (Obs.LUNG_LESION,),
        _m(
            ("nodul", r"\bnodul\w*"),
            ("mass", r"\bmass(?:es)?\b(?!\s+effect)|\bmass[- ]?like\b"),
            (
                "lesion",
                r"\blesion(?<!osseous lesion)(?<!lytic lesion)(?<!bony lesion)(?<!bone lesion)"
                r"(?<!skin lesion)(?<!sclerotic lesion)(?<!blastic lesion)s?\b",
            ),
            ("granulom", r"\bgranuloma(?:s|ta|tous)?\b"),
            (
                "tumo|neoplas|malignan|carcinoma|metasta|cancer",
                r"\b(?:tumou?rs?|neoplasms?|neoplastic|malignan\w+|carcinoma|metasta\w+|cancer)\b",
            ),
            ("cavit", r"\bcavit(?:y|ies|ary|ation)\b"),
        ),
    ),
    # --- Lung Opacity -----------------------------------------------------------------------
    MentionRule(
        (Obs.LUNG_OPACITY,),
        _m(
            ("opac|opec", r"\bop[ae]c\w*"),
            ("infilt", r"\binfilt\w*"),
            ("haz", r"\bhaz(?:y|iness)\b"),
            ("space", r"\bair[- ]?space\s+(?:disease|process|filling)\b"),
            ("glass", r"\bground[- ]glass\b"),
            (
                "densit",
                r"\b(?:patchy|focal|parenchymal|airspace|increased|hazy|streaky|reticular|nodular"
                r"|retrocardiac|basilar|bibasilar|perihilar|ill[- ]defined)\s+densit(?:y|ies)\b",
            ),
        ),
    ),
    # "Lungs are clear": the issue maps it to negative Lung Opacity and Consolidation
    # ("lungs are unremarkable" and "normal lungs" say the same).
    MentionRule(
        (Obs.LUNG_OPACITY, Obs.CONSOLIDATION),
        _m(
            (
                "clear",
                r"\blungs?(?:\s+(?:fields?|parenchyma|bases))?\s*:?\s+(?:{cop}\s+)?{gap}"
                r"(?P<a>clear)\b(?!\s+of\b)".format(cop=_COP, gap=_words(3, "not|no|and")),
            ),
            (
                "clear",
                rf"\blungs?(?:\s+(?:fields?|parenchyma|bases))?\s+(?:{_COP}\s+)?(?:\w+\s+){{0,3}}?"
                r"and\s+(?P<a>clear)\b",
            ),
            ("clear", r"\bclear\s+lungs?\b"),
            (
                "normal|unremarkable",
                r"\blungs?(?:\s+(?:fields?|parenchyma))?\s+(?:are|is|appears?|remains?)\s+"
                r"(?:\w+ly\s+)?(?P<a>unremarkable|normal|within\s+normal\s+limits)\b",
            ),
            ("normal|unremarkable", r"\b(?:normal|unremarkable)\s+lungs\b"),
        ),
        base=NEG,
        fixed=True,
    ),
    # --- Edema ------------------------------------------------------------------------------
    MentionRule(
        (Obs.EDEMA,),
        _m(
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
            ("cephali", r"\bcephali[sz]ation\b"),
            ("kerley|septal", r"\bkerley\s*(?:b\s+)?lines?\b|\bseptal\s+lines?\b"),
            ("cuffing", r"\bperibronchial\s+cuffing\b"),
            ("venous", r"\bpulmonary\s+venous\s+hypertension\b"),
            ("chf|failure", r"\bchf\b|\bheart\s+failure\b"),
        ),
    ),
    MentionRule(
        (Obs.EDEMA,),
        _m(
            (
                "vascul",
                r"\b(?:pulmonary\s+)?vascula(?:ture|rity|r\s+markings)\s+(?:{cop}\s+)?{gap}"
                r"(?P<a>increased|engorged|congested|indistinct)\b".format(
                    cop=_COP, gap=_words(2, "and|but|or|with")
                ),
            ),
        ),
    ),
    MentionRule(
        (Obs.EDEMA,),
        _m(
            (
                "prominen",
                r"\bprominen(?:t|ce\s+of\s+the)\s+(?:pulmonary\s+)?vascul\w+\b"
                r"|\b(?:pulmonary\s+)?vascular\s+prominence\b"
                r"|\b(?:pulmonary\s+)?vascula(?:ture|rity|r\s+markings)\s+(?:is|are|appears?)\s+"
                r"(?:\w+\s+)?prominent\b",
            ),
        ),
        base=UNC,
    ),
    MentionRule(
        (Obs.EDEMA,),
        _m(
            (
                "normal|unremarkable",
                r"\b(?:pulmonary\s+)?vascula(?:ture|rity|r\s+markings)\s+"
                rf"(?:{_COP}\s+)?{_NORMAL_GAP}{_NORMAL_STATE}",
            ),
            ("normal", r"\bnormal\s+(?:pulmonary\s+)?vascula(?:ture|rity)\b"),
        ),
        base=NEG,
        fixed=True,
        priority=2,
    ),
    # --- Consolidation ----------------------------------------------------------------------
    MentionRule(
        (Obs.CONSOLIDATION,),
        _m(
            ("sol|sil", r"\bcon{1,2}s{1,2}[oi]l{1,2}[aeio]?d\w*"),
            ("bronchogram", r"\bair\s+bronchograms?\b"),
        ),
    ),
    # --- Pneumonia --------------------------------------------------------------------------
    MentionRule(
        (Obs.PNEUMONIA,),
        _m(
            ("mon", r"\b(?:broncho)?pn?[eu]{1,3}mon(?:ia|ai|a)s?\b|\bpneumoni(?:c|tis)\b"),
            ("pna", r"\bpna\b"),
            ("infect", r"\binfect(?:ions?|ious)\b"),
            ("aspiration", r"\baspiration\b"),
        ),
    ),
    # --- Atelectasis ------------------------------------------------------------------------
    MentionRule(
        (Obs.ATELECTASIS,),
        _m(
            ("atel|atal", r"\bat[ae]l[ae]?c?t[a-z]*"),
            (
                "collaps",
                r"\bcollaps(?<!vertebral collaps)(?<!body collaps)(?<!height collaps)"
                r"(?<!compression collaps)(?:e|ed|es|ing)\b",
            ),
            ("loss", r"\bvolume\s+loss\b"),
            ("segmental", r"\bsub-?segmental\b"),
            ("plate", r"\bplate[- ]?like\b"),
            ("discoid", r"\bdiscoid\b"),
        ),
    ),
    # --- Pneumothorax -----------------------------------------------------------------------
    MentionRule(
        (Obs.PNEUMOTHORAX,),
        _m(
            ("thor|thro|tor|tro", r"\b(?:hydro)?pn?[eu]{0,3}m[aeo]?th?(?:or|ro)[aeo]?(?:x|c\w*)\b"),
            ("ptx", r"\bptx\b"),
            ("air", r"\bpleural\s+air\b|\bair\s+in\s+the\s+pleural\s+space\b"),
            ("sulcus", r"\bdeep\s+sulcus\s+sign\b"),
        ),
    ),
    # --- Pleural Effusion -------------------------------------------------------------------
    MentionRule(
        (Obs.PLEURAL_EFFUSION,),
        _m(
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
                rf"\b(?:costophrenic|cp)\s+(?:angles?|sulcus|sulci)\s+(?:{_COP}\s+)?{_words(2)}"
                r"(?P<a>blunt(?:ing|ed)?)\b",
            ),
        ),
    ),
    MentionRule(
        (Obs.PLEURAL_EFFUSION,),
        _m(
            (
                "costo|cp",
                r"\b(?:costophrenic|cp)\s+(?:angles?|sulcus|sulci|recess(?:es)?)\s+(?:{cop}\s+)?"
                r"{gap}(?P<a>sharp|clear|preserved|normal)\b".format(
                    cop=_COP, gap=_words(2, "not|no")
                ),
            ),
            ("sharp", r"\bsharp\s+(?:costophrenic|cp)\s+(?:angles?|sulci)\b"),
        ),
        base=NEG,
        fixed=True,
        priority=2,
    ),
    # --- Pleural Other ----------------------------------------------------------------------
    MentionRule(
        (Obs.PLEURAL_OTHER,),
        _m(
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
        (Obs.FRACTURE,),
        _m(
            (
                "frac|fx|broken",
                r"\bfract?(?:ure|rue|ur|ue)[sd]?\b|\bfracure[sd]?\b|\bfx\b|\bbroken\s+ribs?\b",
            ),
        ),
    ),
    MentionRule(
        (Obs.FRACTURE,),
        _m(
            (
                "osseous|bony|skeletal",
                rf"\b(?:no|without)\s+{_NO_MODIFIERS}(?:(?:acute|displaced)\s+)*"
                r"(?:osseous|bony|skeletal)\s+(?P<a>abnormalit(?:y|ies)|injury|injuries)\b",
            ),
        ),
        base=NEG,
        fixed=True,
    ),
    # --- Support Devices --------------------------------------------------------------------
    MentionRule(
        (Obs.SUPPORT_DEVICES,),
        _m(
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
                r"\bsternotomy\b|\bsternal\s+(?:wires?|sutures?|cerclage)\b|\b(?:guide)?wires?\b",
            ),
            (
                "clip|stent|coil|staple|hardware|drain",
                r"\bclips?\b|\bstents?\b|\bcoils?\b|\bstaples\b|\bhardware\b|\bdrains?\b",
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
    # --- Whole-study normal phrases ---------------------------------------------------------
    MentionRule(
        NORMAL_STUDY_NEGATES,
        _m(
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
        ),
        base=NEG,
        fixed=True,
        normal=True,
    ),
)

# --- Cues ------------------------------------------------------------------------------------

# Phrases that look like cues but are not: "no change in the effusion" says the effusion is
# there; "partially resolved" says some of it still is.
PSEUDO_CUES = _gs(
    (
        "chang|increas|decreas|improvement|worsening|progression|growth|difference",
        r"\bno\s+(?:(?:significant|substantial|appreciable|definite|major|marked|further"
        r"|interval|apparent|visible|radiographic|other)\s+)*(?:change|increase|decrease"
        r"|improvement|worsening|progression|growth|difference)",
    ),
    (
        "without",
        r"\bwithout\s+(?:(?:significant|substantial|interval|appreciable)\s+)*(?:change"
        r"|increase|worsening|progression)",
    ),
    (
        "changed|worsened|improved",
        r"\bnot\s+(?:significantly\s+|substantially\s+|appreciably\s+)?(?:changed|worsened"
        r"|improved)\b",
    ),
    (
        "resol|clear",
        r"\b(?:nearly|almost|largely|partially|partly|incompletely|mostly|near[- ]completely"
        r"|not\s+completely|not\s+fully|incomplete|partial|near[- ]complete|nearly\s+complete"
        r"|near[- ]total|slight|some|gradual|continued|ongoing)\s+(?:resolution|resolved"
        r"|resolving|clearing|cleared)\b",
    ),
    ("only", r"\bnot\s+only\b"),
    # A resolution that did not happen: "has not resolved", "no resolution of the effusion".
    (
        "resolv|clear|remov|evacuat|disappear",
        r"\b(?:not|never)\s+(?:yet\s+)?(?:been\s+)?(?:resolved|resolving|cleared|clearing"
        r"|removed|evacuated|disappeared)\b",
    ),
    (
        "resolution|clearing|removal|disappearance",
        r"\b(?:no|without|lack\s+of|absence\s+of|failure\s+of)\s+(?:(?:significant|substantial"
        r"|appreciable|definite|further|interval|apparent|complete|radiographic|any)\s+)*"
        r"(?:resolution|clearing|removal|disappearance)\b",
    ),
)

_HEDGE_WORDS = (
    r"\b(?:may|might|could|possible|possibly|probable|probably|likely|presumed|presumably"
    r"|presumptive|questionable|suspected|suspect|equivocal|indeterminate|borderline"
    r"|uncertain|perhaps|potential|potentially|conceivably)\b"
)
_EXCLUDE = r"(?:entirely\s+|completely\s+|totally\s+|definitely\s+|fully\s+)?"

UNCERTAINTY_CUES: tuple[CueRule, ...] = (
    CueRule(
        _gs(
            (
                "exclude|rule",
                rf"\b(?:cannot|can\s+not|can't|could\s+not)\s+(?:be\s+)?{_EXCLUDE}"
                r"(?:exclude[ds]?|rule[ds]?\s+out)\b",
            ),
            (
                "exclude|rule",
                r"\b(?:difficult|hard|unable)\s+to\s+(?:exclude|rule\s+out)\b"
                r"|\bnot\s+(?:entirely\s+|completely\s+)?(?:exclude|rule\s+out)\b"
                r"|\brule\s+out\b|\bto\s+exclude\b",
            ),
            (
                "may|might|could|possib|probab|likely|presum|question|suspect|equivocal"
                "|indetermin|borderline|uncertain|perhaps|potential|conceiv",
                _HEDGE_WORDS,
            ),
            ("any", r"\bif\s+any\b"),
            ("question|suspici", r"\bquestion\s+of\b|\b(?:suspicious|suspicion)\s+(?:for|of)\b"),
            (
                "concern|worrisome|suggestive",
                r"\b(?:concerning|concern|worrisome)\s+for\b|\bsuggestive\s+of\b",
            ),
            ("suggest", r"\bsuggest(?<!to suggest)(?:s|ing|ed)?\b"),
            (
                "differential",
                r"\bdifferential(?:\s+diagnosis)?(?:\s+(?:includes?|of|would\s+include"
                r"|considerations?\s+includes?))?\b",
            ),
            ("consider", r"\bconsider(?:ed)?\b|\bconsideration\s+(?:of|for)\b"),
            (
                "raise",
                r"\braises?\s+(?:the\s+)?(?:possibility|question|concern)\s+(?:of|for)\b",
            ),
            (
                "eval|assess|r/o",
                r"\b(?:evaluate|evaluation|assess|assessment|eval)\s+for\b|\br/o\b",
            ),
        ),
        Direction.FORWARD,
        6,
    ),
    CueRule(
        _gs(
            (
                "excluded|ruled",
                rf"\b(?:cannot|can\s+not|can't|could\s+not|not)\s+(?:be\s+)?{_EXCLUDE}"
                r"(?:excluded|ruled\s+out)\b",
            ),
            (
                "possible|suspected|question|likely|probable|consider|possibility|differential"
                "|certain|indetermin|equivocal",
                r"\b(?:is|are|remains?)\s+(?:also\s+)?(?:possible|suspected|questioned"
                r"|questionable|likely|probable|considered|a\s+consideration|a\s+possibility"
                r"|in\s+the\s+differential|not\s+certain|uncertain|indeterminate|equivocal)\b",
            ),
            ("exclude", r"\b(?:difficult|hard)\s+to\s+exclude\b"),
            (
                "may|might|could",
                r"\b(?:may|might|could)\s+(?:also\s+)?(?:not\s+)?(?:be\s+)?(?:present|seen|developing"
                r"|exist|coexist|contribut\w+|superimposed|missed|obscured|hidden|masked"
                r"|underestimated|occult)\b",
            ),
            ("likely", r"\b(?:less|more)\s+likely\b"),
            ("any", r"\bif\s+any\b"),
        ),
        Direction.BACKWARD,
        5,
    ),
    CueRule(
        _gs(("vs|versus|v.s", r"\bversus\b|\bvs\b\.?|\bv\.s\."), ("?", r"\?")),
        Direction.BOTH,
        3,
    ),
)


def _not_after(words: str, auxiliaries: str) -> str:
    """``\bword`` for each word, unless an auxiliary stands before it ("has resolved")."""
    alternatives = []
    for word in words.split("|"):
        guards = "".join(f"(?<!{aux} {word})" for aux in auxiliaries.split("|"))
        alternatives.append(rf"\b{word}\b{guards}")
    return "|".join(alternatives)


NEGATION_CUES: tuple[CueRule, ...] = (
    CueRule(_gs(("no", r"\bno\b(?!\s+longer\b)")), Direction.FORWARD, 7),
    CueRule(
        _gs(
            (
                "without|negative|free|clear|absence|lack|neither|nor|rather",
                r"\b(?:without|negative\s+for|free\s+of|clear\s+of|absence\s+of|lack\s+of|neither"
                r"|nor|rather\s+than)\b",
            ),
            (
                "resolution|removal|clearing|disappearance|exclusion|longer",
                r"\b(?:resolution\s+of|removal\s+of|clearing\s+of|disappearance\s+of"
                r"|exclusion\s+of|no\s+longer)\b",
            ),
            # "Resolution of the previously noted pneumothorax": the participle is part of the
            # cue, so it does not stop the cue the way a verb would.
            (
                "resolution|removal|clearing|disappearance",
                r"\b(?:resolution|removal|clearing|disappearance)\s+of\s+(?:the\s+)?"
                r"(?:(?:previously|prior|recently|formerly|earlier|initially)\s+)?(?:noted|seen"
                r"|described|demonstrated|identified|visualized|reported|documented|evident"
                r"|present|placed|shown)\b",
            ),
            ("unlikely", r"\bunlikely(?:\s+to\s+(?:represent|be))?\b"),
        ),
        Direction.FORWARD,
        6,
    ),
    # Adjectival forms ("resolved pneumothorax") reach only a few words: "the effusion has
    # resolved and the pneumothorax is unchanged" must not negate the pneumothorax.
    CueRule(
        _gs(
            (
                "resolved|removed|absent",
                _not_after("resolved|removed|absent", "has|have|had|is|are|been|now|since"),
            ),
        ),
        Direction.FORWARD,
        2,
    ),
    CueRule(_gs(("not", r"\bnot\b")), Direction.FORWARD, 3),
    # After the mention; the verb before the cue ("is not seen") is just a word in the gap.
    CueRule(
        _gs(
            (
                "not|longer|can't",
                r"\b(?:not|no\s+longer|cannot|can't|could\s+not)\s+(?:\w+ly\s+)?(?:be\s+)?"
                r"(?:seen|identified|visualized"
                r"|visible|appreciated|appreciable|evident|present|demonstrated|detected|noted"
                r"|apparent|observed|shown|depicted|recurred|reaccumulated|developed"
                r"|re-?demonstrated|identifiable|found)\b",
            ),
            (
                "absent|resolved|cleared|disappeared|removed|evacuated|withdrawn|removal",
                r"\b(?:absent|resolved|cleared|disappeared|removed|evacuated|withdrawn|removal)\b",
            ),
            ("ruled|excluded", r"\b(?:ruled\s+out|excluded)\b"),
            ("unlikely", r"\bunlikely\b"),
        ),
        Direction.BACKWARD,
        6,
    ),
    # "Pneumothorax: none", "- none", "(none)", "\u2014 none", ", none": the punctuation is part
    # of the cue, which must end its phrase ("Pneumothorax - no effusion" is not negated).
    CueRule(
        _gs(
            (
                "no|negative|absent",
                r"[:,(\u2013\u2014-]\s*(?:none|negative|absent|no|not\s+seen)\b",
            ),
        ),
        Direction.BACKWARD,
        6,
        clause_final=True,
    ),
)

# What a clause-final cue may be followed by before its phrase ends (at a comma, a full stop,
# a bracket, a dash or a clause terminator): "Pneumothorax, not seen on this study" ends,
# "Pneumothorax, no other abnormality" does not. A phrase with a mention in it never ends.
# fmt: off
CLAUSE_FINAL_FOLLOWERS = frozenset({
    "on", "in", "at", "from", "since", "compared", "today", "now", "currently", "anymore",
    "any", "longer", "seen", "identified", "noted", "visible", "visualized", "present",
    "evident", "demonstrated", "detected", "appreciated", "bilaterally", "radiographically",
    "interval", "as", "per", "after", "following", "when", "again",
})
# fmt: on
# How a trailing cue reaches back across a comma, a bracket or a dash ("Right pneumothorax,
# seen on the prior study, has now resolved"): the words just before the cue may only be
# these, and each stretch set off before that must open with one of TRAILING_ASIDE_OPENERS.
# fmt: off
TRAILING_CUE_LEAD_INS = frozenset({
    "now", "since", "has", "have", "had", "been", "is", "are", "was", "were", "completely",
    "entirely", "totally", "fully", "subsequently", "already", "also", "both", "all", "then",
    "which", "that", "interval", "again", "it", "they",
})
TRAILING_ASIDE_OPENERS = frozenset({
    "seen", "noted", "described", "demonstrated", "identified", "visualized", "visible",
    "present", "evident", "reported", "documented", "previously", "recently", "initially",
    "as", "on", "in", "at", "from", "since", "per", "when", "after", "before", "following",
    "compared", "which", "that",
})
# fmt: on

# Where a cue's reach ends: a new clause. "No effusion, but a small pneumothorax" keeps the
# pneumothorax out of the negation.
TERMINATORS = _gs(
    (";", ";"),
    (
        "but|however|though|which|whereas|while|except|besides|yet",
        r"\b(?:but|however|although|though|which|whereas|while|except|excepting|besides|yet)\b",
    ),
    (
        "exception|aside|apart|than",
        r"\bwith\s+the\s+exception\s+of\b|\b(?:aside|apart)\s+from\b|\bother\s+than\b",
    ),
    ("there", r"\bthere\s+(?:is|are|was|were|has|have|had)\b"),
    (
        "post|s/p|setting",
        r"\bstatus\s+post\b|\bs/p\b|\bin\s+the\s+setting\s+of\b",
    ),
)

# After a negated mention these keep the negation going: "no consolidation to suggest
# pneumonia" negates the pneumonia too, and "suggest" is not an uncertainty cue there.
NEGATION_CONTINUATION = re.compile(
    r"^\s*,?\s*(?:(?:is|are)\s+)?(?:(?:seen|identified|present|noted)\s+)?"
    r"(?:to\s+(?:suggest|indicate|represent)|that\s+(?:would\s+)?(?:suggests?|indicates?)"
    r"|suggest(?:ive|ing)(?:\s+of)?|suspicious\s+for|concerning\s+for|worrisome\s+for"
    r"|characteristic\s+of|typical\s+of|consistent\s+with|compatible\s+with|diagnostic\s+of"
    r"|to\s+account\s+for|such\s+as)\s+(?:[\w-]+\s+){0,3}$"
)

# Words that end a cue's reach when they sit between the cue and the mention: a verb means
# the mention belongs to another statement ("no effusion and the heart is enlarged").
# fmt: off
GAP_BLOCKERS = frozenset({
    "is", "are", "was", "were", "be", "been", "being", "has", "have", "had", "seen", "noted",
    "identified", "present", "demonstrated", "appears", "appear", "remains", "remain",
    "persists", "persist", "shows", "show", "shown", "visualized", "evident", "observed",
    "there", "represents", "represent", "reflects", "reflect", "measuring", "measures",
    "terminates", "terminating", "projects", "projecting", "overlies", "overlying", "extends",
    "extending", "courses", "coursing", "consistent", "compatible",
})
# fmt: on
# Verbs an uncertainty cue reaches through: "may represent", "could be", "likely reflects".
# fmt: off
HEDGED_VERBS = frozenset({
    "be", "been", "is", "are", "represent", "represents", "reflect", "reflects", "indicate",
    "indicates", "include", "includes", "have", "has", "consistent", "compatible",
})
# fmt: on
CONJUNCTIONS = frozenset({"and", "or", "nor", "and/or", "/", "&"})
DETERMINERS = frozenset({"the", "a", "an", "this", "that", "his", "her", "its", "their"})
