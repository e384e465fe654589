"""The labeler's cue vocabulary: negation and uncertainty cues, pseudo-cues, scope ends."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from cds_service.findings.matching import GatedPattern, patterns


class Direction(Enum):
    """Which side of a cue the mentions it governs lie on."""

    FORWARD = "forward"
    BACKWARD = "backward"
    BOTH = "both"


@dataclass(frozen=True)
class CueRule:
    """A negation or uncertainty cue; ``reach`` is the most words between cue and mention.

    A ``clause_final`` cue counts only where it ends its phrase: "pneumothorax: none" but not
    "pneumothorax, no other abnormality" (see CLAUSE_FINAL_FOLLOWERS). An ``opens_phrase``
    cue is a determiner-like negation ("no", "without") that governs the noun phrase after
    it, adjectives and commas included ("no acute, displaced rib fracture").
    """

    patterns: tuple[GatedPattern, ...]
    direction: Direction
    reach: int
    clause_final: bool = False
    opens_phrase: bool = False


# --- Cues ------------------------------------------------------------------------------------

# Phrases that look like cues but are not: "no change in the effusion" says the effusion is
# there; "partially resolved" says some of it still is.
PSEUDO_CUES = patterns(
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
        r"|near[- ]total|slight|some|gradual|continued|ongoing)"
        r"\s+(?:(?:completely|entirely|totally|fully)\s+)?(?:resolution|resolved"
        r"|resolving|clearing|cleared)\b",
    ),
    ("only", r"\bnot\s+only\b"),
    # A resolution that did not happen: "has not resolved", "no resolution of the effusion".
    (
        "resolv|clear|remov|evacuat|disappear",
        r"\b(?:not|never|(?:is|are|has|have|was|were)n[\'’]t)\s+(?:yet\s+)?(?:been\s+)?"
        r"(?:(?:completely|entirely|fully|totally)\s+)?(?:resolved|resolving|cleared|clearing"
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
    r"|apparently"
    r"|presumptive|questionable|suspected|suspect|equivocal|indeterminate|borderline"
    r"|uncertain|perhaps|potential|potentially|conceivably)\b"
)
_EXCLUDE = r"(?:entirely\s+|completely\s+|totally\s+|definitely\s+|fully\s+)?"

UNCERTAINTY_CUES: tuple[CueRule, ...] = (
    CueRule(
        patterns(
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
                "may|might|could|possib|probab|likely|presum|apparent|question|suspect|equivocal"
                "|indetermin|borderline|uncertain|perhaps|potential|conceiv",
                _HEDGE_WORDS,
            ),
            ("any", r"\bif\s+any\b"),
            # "Apparent old rib fractures", "an apparent effusion": the adjective that opens
            # its phrase hedges; after a verb or a negation ("is not apparent", "no apparent")
            # it means "evident" and is part of what is said.
            ("apparent", r"^\s*(?:\d{1,2}[.)]\s*)?apparent\b|\b(?:an?|with|some)\s+apparent\b"),
            ("question|suspici", r"\bquestion\s+of\b|\b(?:suspicious|suspicion)\s+(?:for|of)\b"),
            (
                "concern|worrisome|suggestive|suggestion",
                r"\b(?:concerning|concern|worrisome)\s+for\b|\bsuggesti(?:ve|on)\s+of\b",
            ),
            # "with or without superimposed infection": the "without" is not a negation.
            ("without", r"\bwith\s+or\s+without\b"),
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
        patterns(
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
            (
                "included|considered",
                r"\b(?:should|may|must|could|might)\s+(?:also\s+)?be\s+(?:included|considered)\b",
            ),
            ("any", r"\bif\s+any\b"),
        ),
        Direction.BACKWARD,
        5,
    ),
    CueRule(
        patterns(("vs|versus|v.s", r"\bversus\b|\bvs\b\.?|\bv\.s\."), ("?", r"\?")),
        Direction.BOTH,
        3,
    ),
    # "pneumonia is favored over atelectasis", "favored to represent atelectasis"
    CueRule(patterns(("favor", r"\bfavou?r(?:ed|s)?\b")), Direction.BOTH, 4),
)


def _not_after(words: str, auxiliaries: str) -> str:
    """``\bword`` for each word, unless an auxiliary stands before it ("has resolved")."""
    alternatives = []
    for word in words.split("|"):
        guards = "".join(f"(?<!{aux} {word})" for aux in auxiliaries.split("|"))
        alternatives.append(rf"\b{word}\b{guards}")
    return "|".join(alternatives)


NEGATION_CUES: tuple[CueRule, ...] = (
    CueRule(
        patterns(
            ("no", r"\bno\b(?!\s+longer\b)"),
            (
                "without|negative|free|clear|absence|lack|neither|nor|rather",
                r"\b(?:without|negative\s+for|free\s+of|clear\s+of|absence\s+of|lack\s+of|neither"
                r"|nor|rather\s+than)\b",
            ),
        ),
        Direction.FORWARD,
        7,
        opens_phrase=True,
    ),
    CueRule(
        patterns(
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
        patterns(
            (
                "resolved|removed|absent",
                _not_after("resolved|removed|absent", "has|have|had|is|are|been|now|since"),
            ),
        ),
        Direction.FORWARD,
        2,
    ),
    # "Nothing to suggest pneumonia": a pronoun, not a determiner, so it does not reach over
    # commas ("nothing acute, consolidation at the right base").
    CueRule(
        patterns(
            ("nothing", r"\bnothing\b(?!\s+(?:more|other|else)\s+than\b)"),
            (
                "see|identify|visuali|detect",
                r"\b(?:can(?:not|[\'’]t|\s+not)|do(?:es)?\s+not|don[\'’]t|doesn[\'’]t)\s+"
                r"(?:see|identify|visuali[sz]e|detect)\b",
            ),
        ),
        Direction.FORWARD,
        6,
    ),
    CueRule(
        patterns(("not", r"\bnot\b"), ("n't|n’t", r"\b(?:is|are|was|were)n[\'’]t\b")),
        Direction.FORWARD,
        3,
    ),
    # After the mention; the verb before the cue ("is not seen") is just a word in the gap.
    CueRule(
        patterns(
            (
                "not|longer|can't|can’t|n't|n’t",
                r"\b(?:not|no\s+longer|cannot|can[\'’]t|could\s+not|(?:is|are|was|were)n[\'’]t)\s+"
                r"(?:\w+ly\s+)?(?:be\s+)?"
                r"(?:seen|identified|visualized"
                r"|visible|appreciated|appreciable|evident|present|demonstrated|detected|noted"
                r"|apparent|observed|shown|depicted|recurred|reaccumulated|developed"
                r"|re-?demonstrated|identifiable|found)\b",
            ),
            (
                "absent|resolved|cleared|disappeared|removed|evacuated|withdrawn|removal|gone",
                r"\b(?:absent|resolved|cleared|disappeared|removed|evacuated|withdrawn|removal"
                r"|gone)\b",
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
        patterns(
            (
                "no|neg|absent",
                r"[:,(\u2013\u2014-]\s*(?:none|negative|neg|absent|no|not\s+seen)\b",
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
TERMINATORS = patterns(
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
    r"(?:to\s+(?:suggest|indicate|represent|support)|that\s+(?:would\s+)?(?:suggests?|indicates?)"
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
# Participles that may stand before the noun a negation governs, as adjectives: "no
# visualized pneumothorax", "no identified effusion". After the mention they are verbs, and a
# verb there is not in a forward gap at all.
# fmt: off
ATTRIBUTIVE_PARTICIPLES = frozenset({
    "seen", "noted", "identified", "present", "demonstrated", "shown", "visualized", "evident",
    "observed",
})
# fmt: on
# What a determiner-like negation ("no", "without") may reach across a comma through: only
# adjectives of one noun phrase ("no acute, displaced rib fracture"), never a noun of its own
# ("no acute process, pneumothorax"), a participle ("not seen, pneumothorax") or a size word,
# which says that what follows is present ("no effusion, small pneumothorax"). "xxxx" is the
# de-identification token of public report sets, a word of unknown kind.
# fmt: off
PHRASE_ADJECTIVES = frozenset({
    "a", "an", "any", "the", "acute", "new", "significant", "definite", "focal", "discrete",
    "gross", "frank", "overt", "obvious", "visible", "demonstrable", "appreciable", "evident",
    "convincing", "displaced", "nondisplaced", "non-displaced", "loculated", "visualized",
    "identifiable", "pleural", "lobar", "segmental", "rib", "other", "recurrent", "additional",
    "further",
    "radiographic", "free", "layering", "xxxx", "residual", "large", "sizable", "sizeable",
    "tension",
})
# Where a finding lies: words that may follow an attributive participle before the noun
# ("no visualized right apical pneumothorax").
# fmt: off
LOCATION_WORDS = frozenset({
    "left", "right", "bilateral", "unilateral", "apical", "basilar", "basal", "bibasilar",
    "lateral", "medial", "upper", "lower", "middle", "lobe", "lung", "anterior", "posterior",
    "residual", "recurrent", "new", "large", "small", "tension",
})
# fmt: on
# Words that say a finding is present; a list item holding one is a new statement ("no
# pneumothorax, small effusions and atelectasis" leaves the effusions present), even when
# "or" closes the list. Size words a negation often carries ("no large effusion") are in
# NEGATABLE_SIZES: an item with one of those is negated when "or" closes the list ("no
# consolidation, large effusion, or pneumothorax").
# fmt: off
PRESENCE_WORDS = frozenset({
    "small", "mild", "severe", "trace", "tiny", "minimal", "stable", "persistent",
    "increasing", "increased", "worsening", "worsened", "enlarging", "marked", "extensive",
    "dense", "unchanged", "redemonstrated", "again", "moderate", "decreasing", "decreased",
    "improving", "improved",
})
NEGATABLE_SIZES = frozenset({"large", "sizable", "sizeable", "big", "massive", "significant"})
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
