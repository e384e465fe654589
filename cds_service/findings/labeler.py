"""Rule-based CheXpert-style labeler: report text -> a label and its evidence per observation."""

# How it works: a report is split into sentences (sentences.py); in each, mention patterns
# (mentions.py) find the observations, and the cues of cues.py govern them by one scope
# mechanism: a cue has a direction (forward, backward or both) and a window (its reach in
# words); its scope runs from the cue to the nearest mention on its side and on over the
# mentions coordinated with it ("no A, B or C"), and ends at a termination term ("but",
# "however", "which", ";", "there is" ...), at a verb that opens a new statement, or at
# the window's edge. Pseudo-cues ("no change", "not only", "partially resolved") are masked
# first; uncertainty cues are found before negation cues, so "not excluded" is a hedge.
# Sentence labels are then aggregated the CheXpert way: positive > uncertain > negative.
#
# The labelling rules are those of tests/data/labeler/README.md. Decisions on cases they
# leave open:
# - "no definite X" is negative (the radiologist reports the finding as absent);
# - "consistent with" / "compatible with" state a diagnosis: positive; "suggestive of",
#   "suggestion of", "likely", "probable", "favored", "apparent", "concerning for", "less
#   likely" are uncertain; "unlikely" negative; mentions offered as alternatives ("A or B",
#   "A/B", "A and/or B") are uncertain unless a negation governs them;
# - whole-study normal statements ("no acute cardiopulmonary process", "normal chest
#   radiograph", "negative study", "clear chest") label no single observation: they are
#   only the normal statement the No Finding rule asks for;
# - a normal cardiomediastinal silhouette, or one "not enlarged", is negative for Enlarged
#   Cardiomediastinum and Cardiomegaly; "prominent" heart, mediastinum or vessels is
#   uncertain;
# - heart size "top normal" / "upper limits of normal" is negative, "borderline" and
#   "normal to mildly enlarged" uncertain;
# - "partially / nearly / almost completely resolved" is positive; "removal of" a device is
#   negative, and a removed device alone is not a normal statement for No Finding;
# - "has not resolved" / "no resolution of" is positive (a resolution that did not happen);
# - INDICATION / HISTORY / REASON / TECHNIQUE sections are not labelled, and only to the end
#   of their line; EXAM, STUDY and COMPARISON lines are (they can carry findings);
# - a cue after its mention reaches back across a comma, a bracket or a dash when it ends its
#   phrase ("Pneumothorax, now resolved.", "Pneumothorax (none).");
# - a mention that no sentence labels (one cut by a sentence break) is uncertain: a finding
#   the labeler could not classify must not disappear.

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from dataclasses import dataclass

from cds_service.findings.cues import (
    ATTRIBUTIVE_PARTICIPLES,
    CLAUSE_FINAL_FOLLOWERS,
    CONJUNCTIONS,
    DETERMINERS,
    GAP_BLOCKERS,
    HEDGED_VERBS,
    LOCATION_WORDS,
    NEGATABLE_SIZES,
    NEGATION_CONTINUATION,
    NEGATION_CUES,
    PHRASE_ADJECTIVES,
    PRESENCE_WORDS,
    PSEUDO_CUES,
    TERMINATORS,
    TRAILING_ASIDE_OPENERS,
    TRAILING_CUE_LEAD_INS,
    UNCERTAINTY_CUES,
    CueRule,
    Direction,
)
from cds_service.findings.matching import TriggerIndex
from cds_service.findings.mentions import MENTION_RULES, MentionRule
from cds_service.findings.observations import Label, Observation
from cds_service.findings.sentences import SKIPPED_SECTIONS, Sentence, split_sentences

__all__ = ["ObservationLabel", "label_report", "labels_as_json"]

# CheXpert aggregation: a report is positive for an observation if any sentence is, else
# uncertain if any sentence is, else negative if any sentence is.
_RANK = {Label.NOT_MENTIONED: 0, Label.NEGATIVE: 1, Label.UNCERTAIN: 2, Label.POSITIVE: 3}
_LINK_FILLER_MAX = 4  # words besides connectors allowed between two coordinated mentions
# Words that stop a cue before it reaches the first mention after it.
_NEGATION_BLOCKERS = GAP_BLOCKERS | {"and", "with"}
# A hedge stops at "and", "with" and at a negation: "suggesting airways disease without
# pneumonia" hedges no pneumonia.
_HEDGE_BLOCKERS = (GAP_BLOCKERS - HEDGED_VERBS) | {"and", "with", "without", "no", "not"}
# Every mention regex with its triggers, flattened once: the hot loop of the labeler.
_MENTION_TABLE = tuple(
    (gate, "a" in gate.regex.groupindex, rule) for rule in MENTION_RULES for gate in rule.patterns
)
_CUE_GATES = (
    PSEUDO_CUES
    + TERMINATORS
    + tuple(g for rule in UNCERTAINTY_CUES + NEGATION_CUES for g in rule.patterns)
)
# One index over every regex: mention gates first (their index is their place in the table).
_INDEX = TriggerIndex(tuple(gate for gate, _, _ in _MENTION_TABLE) + _CUE_GATES)
_CUE_IDS = {gate: len(_MENTION_TABLE) + i for i, gate in enumerate(_CUE_GATES)}
# Where the phrase after a clause-final cue ends, and what sets an aside off in a gap.
_PHRASE_END = re.compile(r"[,;:!?()\[\]\u2013\u2014]|\.(?!\d)|(?<!\S)-(?!\S)")
_ASIDE_MARK = re.compile(r"[,()\u2013\u2014]|(?<!\S)-(?!\S)")
# Marks the text of skipped sections for the safety net: neither a word nor a space, so no
# mention pattern matches across it.
_SKIPPED_MARK = "\x00"
# The safety net's patterns per observation (by place in the table): all but those that only
# ever say a finding is absent.
_NET_GATES = {
    obs: frozenset(
        i
        for i, (_, _, rule) in enumerate(_MENTION_TABLE)
        if obs in rule.observations and not (rule.fixed and rule.base is Label.NEGATIVE)
    )
    for obs in Observation
}
# Alternatives right beside a mention ("scarring/atelectasis", "atelectasis or scarring"),
# and an "or" joining two mentions of a list.
_ALTERNATIVE_SPAN = 8
_ALTERNATIVE_BEFORE = re.compile(r"(?:\bor\s+|(?<![\s/(]w)(?<=\w)/)$")
_ALTERNATIVE_AFTER = re.compile(r"(?:/\w|\s+or\s+\w|\s+and/or\b)")
_WITH_SLASH = re.compile(r"\bw/")
_COURSE_WINDOW = 60
_COURSE_BEFORE = re.compile(
    r"\b(?:no|without)\s+(?:\w+\s+){0,2}?(?:change|increase|decrease|worsening|progression"
    r"|improvement)\s+(?:in|of)\b|\b(?:unchanged|stable|persistent|persisting)\b"
)
# A negation's list ("no findings to indicate A, B, or C"): the words before its first item,
# the words of each item, and how a list closes after a mention.
_LIST_LEAD_MAX = 5
_LIST_ITEM_MAX = 3
_LIST_CLOSE = re.compile(r"\s*,?\s*(?:or|nor)\b")
_LIST_CLOSE_SPAN = 8
_OR_WORDS = frozenset({"or", "nor", "and/or", "/"})
_TRIGGER_SPAN = max(len(t) for gate, _, _ in _MENTION_TABLE for t in gate.triggers)


@dataclass(frozen=True, slots=True)
class ObservationLabel:
    """What the report says about one observation and the sentence that decided it."""

    observation: Observation
    label: Label
    sentence: str | None  # the sentence that decided the label (None when not mentioned)


_OBSERVATIONS = tuple(Observation)
# Frozen, so one instance per observation serves every report that does not mention it.
_NOT_MENTIONED = {obs: ObservationLabel(obs, Label.NOT_MENTIONED, None) for obs in _OBSERVATIONS}


@dataclass(slots=True)
class _Slot:
    """Mentions sharing one anchor position; cues attach to slots, not to observations."""

    start: int
    end: int
    mentions: list[tuple[Observation | None, MentionRule]]  # None: a normal statement
    negated: bool = False
    uncertain: bool = False


_Match = tuple[
    int, int, int, int, Observation | None, MentionRule
]  # span, anchor, observation, rule
_Cue = tuple[CueRule, int, int]


@dataclass(frozen=True, slots=True)
class _SentenceResult:
    labels: dict[Observation, Label]
    normal: bool


def _lower(text: str) -> str:
    low = text.lower()
    if len(low) == len(text):
        return low
    # A few characters lower-case to two code points; keep offsets aligned with the text.
    return "".join(ch.lower() if len(ch.lower()) == 1 else ch for ch in text)


def _mask(text: str, spans: list[tuple[int, int]]) -> str:
    if not spans:
        return text
    parts: list[str] = []
    cursor = 0
    for start, end in spans:
        if start < cursor:
            start = cursor
        parts.append(text[cursor:start])
        parts.append(" " * max(0, end - start))
        cursor = max(cursor, end)
    parts.append(text[cursor:])
    return "".join(parts)


def _raw_mentions(low: str, active: frozenset[int], gated: bool) -> list[_Match]:
    """Every mention in a sentence, in order of start (one per observation it names)."""
    found: list[_Match] = []
    for index in sorted(i for i in active if i < len(_MENTION_TABLE)):
        gate, anchored, rule = _MENTION_TABLE[index]
        for match in gate.scan(low, gated):
            a_start, a_end = match.span("a") if anchored else match.span()
            # A normal statement names no observation: it still takes its place in the
            # sentence (so its "no" is spent on it), under the observation None.
            for obs in rule.observations or (None,):
                found.append((match.start(), match.end(), a_start, a_end, obs, rule))
    found.sort(key=lambda m: m[0])
    return found


def _slots(matches: list[_Match]) -> list[_Slot]:
    """Mentions with overlaps within an observation resolved, grouped into slots."""
    by_obs: dict[Observation | None, list[_Match]] = {}
    for match in matches:
        by_obs.setdefault(match[4], []).append(match)
    chosen: list[tuple[int, int, Observation | None, MentionRule]] = []
    for obs, candidates in by_obs.items():
        if len(candidates) > 1:
            # The more specific rule wins an overlap, then the longer match.
            candidates.sort(key=lambda c: (-c[5].priority, c[0] - c[1], c[0]))
        kept: list[tuple[int, int]] = []
        for start, end, a_start, a_end, _, rule in candidates:
            if any(start < k_end and k_start < end for k_start, k_end in kept):
                continue
            kept.append((start, end))
            chosen.append((a_start, a_end, obs, rule))
    chosen.sort(key=lambda c: (c[0], c[1]))
    slots: list[_Slot] = []
    for a_start, a_end, obs, rule in chosen:
        if slots and a_start < slots[-1].end:
            slots[-1].end = max(slots[-1].end, a_end)
            slots[-1].mentions.append((obs, rule))
        else:
            slots.append(_Slot(a_start, a_end, [(obs, rule)]))
    return slots


def _words(gap: str) -> list[str]:
    return gap.replace(",", " , ").split()


class _Clauses:
    """Terminator positions in a sentence, to tell whether a stretch crosses a clause."""

    __slots__ = ("starts",)

    def __init__(self, low: str, active: frozenset[int], gated: bool) -> None:
        self.starts = sorted(
            m.start() for g in TERMINATORS if _CUE_IDS[g] in active for m in g.scan(low, gated)
        )

    def crossed(self, start: int, end: int) -> bool:
        starts = self.starts
        return bool(starts) and bisect_left(starts, start) < bisect_left(starts, end)

    def next_start(self, position: int) -> int | None:
        index = bisect_left(self.starts, position)
        return self.starts[index] if index < len(self.starts) else None

    def only_relative_after(self, low: str, start: int, end: int) -> bool:
        """Whether the one terminator in the stretch is a "which" right at its start."""
        first = bisect_left(self.starts, start)
        if bisect_left(self.starts, end) - first != 1:
            return False
        which = self.starts[first]
        return low.startswith("which", which) and not low[start:which].strip(" ,")


def _link(gap: str) -> str | None:
    """How two neighbouring mentions are joined: 'and' or 'or' (a conjunction), 'comma',
    'comma+' (a comma and a word that says the next finding is present), 'adj', 'cont', or
    None (not joined)."""
    words = _words(gap)
    if not words:
        return "adj"
    if NEGATION_CONTINUATION.match(gap):
        return "cont"
    has_conj = False
    has_or = False
    fillers = 0
    for index, word in enumerate(words):
        word = word.strip(".:")
        # A participle before the next mention modifies it ("no effusion or visualized right
        # pneumothorax"); anywhere else a verb starts a new statement.
        if word in GAP_BLOCKERS and not _attributive(word, words[index + 1 :]):
            return None
        if word in ("with", "without"):
            return None  # "effusion, with or without atelectasis": not a list
        if word in CONJUNCTIONS or word in ("as", "well"):  # "as well as" joins too
            has_conj = True
            has_or = has_or or word in _OR_WORDS
            nxt = words[index + 1] if index + 1 < len(words) else ""
            if word == "and" and nxt in DETERMINERS:
                return None  # "no effusion and the heart is enlarged": a new statement
        elif word != ",":
            fillers += 1
    if fillers > _LINK_FILLER_MAX:
        return None
    present = any(w in PRESENCE_WORDS for w in words)
    if has_conj:
        if has_or:
            return "or"
        # "no pneumothorax and small effusion": the effusion is a statement of its own
        return "and!" if present else "and"
    if "," not in words:
        return None
    # "No pneumothorax, small effusions and atelectasis": a size or course word after a comma
    # says the next finding is present ('comma!'); a size a negation often carries makes it
    # present unless "or" closes the list ('comma+': "no consolidation, large effusion, or
    # pneumothorax" is one negated list).
    if present:
        return "comma!"
    return "comma+" if any(w in NEGATABLE_SIZES for w in words) else "comma"


def _chain(
    slots: list[_Slot],
    links: list[str | None],
    first: int,
    forward: bool,
    closed_after: list[bool] | None = None,
) -> list[int]:
    """The mentions a cue reaches: the first one and those coordinated with it.

    ``closed_after[i]``: an "or" / "nor" follows mention i, so a list that reaches it is
    closed there even when its last item names no finding ("no effusion, pneumothorax or
    free air").
    """
    members = [first]
    pending: list[int] = []
    presence = ""  # the strongest sign of presence among the pending items: "", "+" or "!"
    seen_conj = False
    index = first
    step = 1 if forward else -1
    while 0 <= index + step < len(slots):
        link = links[index] if forward else links[index - 1]
        nxt = index + step
        if forward and (link == "and!" or presence == "!" or (link == "and" and presence)):
            pending = []
            break  # "no A, small B and C": B and C are a statement of their own
        if link in ("and", "and!", "or", "adj", "cont"):
            members.extend(pending)
            members.append(nxt)
            pending = []
            presence = ""
            seen_conj = seen_conj or link in ("and", "and!", "or")
        elif link in ("comma", "comma+", "comma!"):
            # "no A, B or C": a comma joins a list only if a conjunction closes it; going
            # backwards the conjunction has already been seen ("A, B or C is not seen").
            if forward:
                pending.append(nxt)
                mark = link[5:]
                presence = "!" if "!" in (presence, mark) else (presence or mark)
            elif seen_conj:
                members.append(nxt)
            else:
                break
        else:
            break
        index = nxt
    if presence == "!":
        pending = []
    if pending and closed_after is not None and closed_after[pending[-1]]:  # by "or"
        members.extend(pending)
    return members


def _gap_ok(gap: str, rule: CueRule, forward: bool, negation: bool, after: str = "") -> bool:
    """Whether a cue reaches across ``gap`` to the nearest mention (few words, one clause).

    Going forward, a negation stops at a verb ("no effusion is seen and the heart is
    enlarged"), except a participle right before the mention ("no visualized pneumothorax").
    A determiner-like negation (``rule.opens_phrase``: "no", "without") also reaches across
    the commas between the adjectives of its noun phrase ("no acute, displaced rib
    fracture") and over the first items of a list that "or" closes ("no findings to indicate
    hyperinflation, pneumonia, or edema": ``after`` is the text after the mention).
    """
    words = _words(gap)
    has_comma = "," in words
    plain = [w for w in words if w != ","]
    if not forward:
        return not has_comma and len(plain) <= rule.reach
    blockers = _NEGATION_BLOCKERS if negation else _HEDGE_BLOCKERS
    if any(
        w in blockers and not (negation and _attributive(w, plain[i + 1 :]))
        for i, w in enumerate(plain)
    ):
        return False
    if not has_comma:
        return len(plain) <= rule.reach
    if not (negation and rule.opens_phrase):
        return False
    # The comma must stand between adjectives: "no, left pneumothorax" is not one phrase.
    if words[0] != "," and len(plain) <= rule.reach and all(w in PHRASE_ADJECTIVES for w in plain):
        return True
    return _list_gap(words, after)


def _attributive(word: str, rest: list[str]) -> bool:
    """Whether a participle stands before the noun it modifies: only adjectives or location
    words follow it up to the mention ("no visualized right pneumothorax")."""
    return word in ATTRIBUTIVE_PARTICIPLES and all(
        w in PHRASE_ADJECTIVES or w in LOCATION_WORDS for w in rest
    )


def _list_gap(words: list[str], after: str) -> bool:
    """Whether a gap with commas holds the first items of a list that "or" / "nor" closes
    (in the gap or just after the mention): a short lead, short items, none of them saying
    that a finding is present."""
    pieces: list[list[str]] = [[]]
    for word in words:
        if word == ",":
            pieces.append([])
        else:
            pieces[-1].append(word)
    if len(pieces[0]) > _LIST_LEAD_MAX or any(len(p) > _LIST_ITEM_MAX for p in pieces[1:]):
        return False
    if any(w in PRESENCE_WORDS for piece in pieces for w in piece):
        return False  # "no pneumothorax, small effusion or scarring": the effusion is there
    closed = any(w in ("or", "nor") for w in pieces[-1])
    return closed or _LIST_CLOSE.match(after) is not None


def _clause_final(low: str, c_end: int, slots: list[_Slot], clauses: _Clauses) -> bool:
    """Whether a cue ends its phrase: no mention stands after it before the phrase ends, and
    what does opens with one of CLAUSE_FINAL_FOLLOWERS ("none seen", "not seen on this study"),
    not with something the cue could be about ("no other abnormality")."""
    found = _PHRASE_END.search(low, c_end)
    end = found.start() if found is not None else len(low)
    terminator = clauses.next_start(c_end)
    if terminator is not None:
        end = min(end, terminator)
    after = bisect_left(slots, c_end, key=_slot_start)
    if after < len(slots) and slots[after].start < end:
        return False
    words = low[c_end:end].split()
    return not words or words[0] in CLAUSE_FINAL_FOLLOWERS


def _slot_start(slot: _Slot) -> int:
    return slot.start


def _aside_gap_ok(gap: str, reach: int) -> bool:
    """Whether a trailing cue reaches back across the commas, brackets or dashes in ``gap``.

    Only auxiliaries and adverbs may stand just before the cue ("Pneumothorax, now
    resolved"), and each stretch before them must be an aside that opens with a participle or
    a preposition ("The pneumothorax, seen on the prior study, has resolved").
    """
    pieces = [piece.split() for piece in _ASIDE_MARK.split(gap)]
    if sum(len(words) for words in pieces) > reach:
        return False
    if any(word not in TRAILING_CUE_LEAD_INS for word in pieces[-1]):
        return False
    return all(not words or words[0] in TRAILING_ASIDE_OPENERS for words in pieces[:-1])


def _reaches_back(
    low: str,
    cue: _Cue,
    index: int,
    slots: list[_Slot],
    clauses: _Clauses,
    negation: bool,
) -> bool:
    """Whether a cue after ``slots[index]`` (its nearest mention) reaches back to it."""
    rule, c_start, c_end = cue
    slot = slots[index]
    # A clause terminator stops the cue, except the "which" of a relative clause right after
    # its mention: "a pneumothorax which has resolved".
    if clauses.crossed(slot.end, c_start) and not (
        negation
        and clauses.only_relative_after(low, slot.end, c_start)
        and _clause_final(low, c_end, slots, clauses)
    ):
        return False
    gap = low[slot.end : c_start]
    if "," not in gap:
        return _gap_ok(gap, rule, False, negation)
    return _aside_gap_ok(gap, rule.reach) and _clause_final(low, c_end, slots, clauses)


def _find_cues(
    masked: str, rules: tuple[CueRule, ...], active: frozenset[int], gated: bool
) -> list[_Cue]:
    """The cues of ``rules`` in the (masked) sentence."""
    # Masking only blanks text out, so the triggers found in the sentence cover masked copies.
    return [
        (rule, *m.span())
        for rule in rules
        for g in rule.patterns
        if _CUE_IDS[g] in active
        for m in g.scan(masked, gated)
    ]


def _apply_cues(
    low: str,
    cues: list[_Cue],
    slots: list[_Slot],
    links: list[str | None],
    clauses: _Clauses,
    negation: bool,
    skip: list[tuple[int, int]],
    closed_after: list[bool],
    governed: list[tuple[int, int]],
) -> None:
    """Mark the slots each cue reaches: the nearest mention on its side and its list.

    Cues that start inside a ``skip`` span are ignored; each forward negation adds the span
    from its start to the first mention it governs to ``governed``.
    """
    for cue in cues:
        rule, c_start, c_end = cue
        if any(s <= c_start < e for s, e in skip):
            continue
        if rule.clause_final and not _clause_final(low, c_end, slots, clauses):
            continue
        targets: list[int] = []
        if rule.direction is not Direction.BACKWARD:
            for i, slot in enumerate(slots):
                if slot.start >= c_end:
                    if not clauses.crossed(c_end, slot.start) and _gap_ok(
                        low[c_end : slot.start],
                        rule,
                        True,
                        negation,
                        low[slot.end : slot.end + _LIST_CLOSE_SPAN],
                    ):
                        targets.extend(_chain(slots, links, i, True, closed_after))
                        if negation:
                            governed.append((c_start, slot.start))
                    break
        if rule.direction is not Direction.FORWARD:
            for i in range(len(slots) - 1, -1, -1):
                slot = slots[i]
                if slot.end <= c_start:
                    if _reaches_back(low, cue, i, slots, clauses, negation):
                        targets.extend(_chain(slots, links, i, False))
                    break
        for i in targets:
            if negation:
                slots[i].negated = True
            else:
                slots[i].uncertain = True


def _mark_alternatives(low: str, slots: list[_Slot], links: list[str | None]) -> None:
    """Mentions offered as alternatives are uncertain: "atelectasis or pneumonia",
    "scarring/atelectasis", "infiltrate and/or atelectasis".

    Left alone: negated mentions (a negated list, "no effusion or pneumothorax", offers no
    alternatives), two names for one finding ("pneumothorax/hydropneumothorax"), devices
    (which line it is does not make the line uncertain) and "w/" (with).
    """
    if "or" not in low and "/" not in low:
        return
    for index, slot in enumerate(slots):
        if slot.negated or slot.uncertain or _only_devices(slot):
            continue
        # "No change in the effusion or the pneumothorax", "unchanged A or B": both are
        # there; the "or" lists what did not change.
        if _COURSE_BEFORE.search(low, max(0, slot.start - _COURSE_WINDOW), slot.start):
            continue
        left = slots[index - 1] if index > 0 else None
        right = slots[index + 1] if index + 1 < len(slots) else None
        joined = (
            left is not None and links[index - 1] == "or" and _alternatives(low, left, slot)
        ) or (right is not None and links[index] == "or" and _alternatives(low, slot, right))
        # An alternative that names no finding ("scarring/atelectasis"), right beside it.
        if not joined and (left is None or slot.start - left.end > _ALTERNATIVE_SPAN):
            before = low[max(0, slot.start - _ALTERNATIVE_SPAN) : slot.start]
            joined = _ALTERNATIVE_BEFORE.search(before) is not None
        if not joined and (right is None or right.start - slot.end > _ALTERNATIVE_SPAN):
            after = low[slot.end : slot.end + _ALTERNATIVE_SPAN]
            joined = _ALTERNATIVE_AFTER.match(after) is not None
        if joined:
            slot.uncertain = True


def _only_devices(slot: _Slot) -> bool:
    return all(obs is Observation.SUPPORT_DEVICES for obs, _ in slot.mentions)


def _alternatives(low: str, left: _Slot, right: _Slot) -> bool:
    """Whether two mentions that an "or" link joins are offered as alternatives."""
    if left.negated or right.negated:
        return False
    if {obs for obs, _ in left.mentions} & {obs for obs, _ in right.mentions}:
        return False  # two names for one finding
    return _WITH_SLASH.search(low, left.end - 1, right.start) is None


def _label_sentence(low: str, active: frozenset[int], gated: bool) -> _SentenceResult | None:
    """Labels from one lower-cased sentence (``active``: the gates its triggers allow)."""
    matches = _raw_mentions(low, active, gated)
    if not matches:
        return None
    slots = _slots(matches)
    clauses = _Clauses(low, active, gated)
    links: list[str | None] = []
    for left, right in zip(slots, slots[1:], strict=False):
        if clauses.crossed(left.end, right.start):
            links.append(None)
        else:
            links.append(_link(low[left.end : right.start]))
    pseudo = sorted(
        m.span() for g in PSEUDO_CUES if _CUE_IDS[g] in active for m in g.scan(low, gated)
    )
    masked = _mask(low, pseudo)
    # Uncertainty cues are found first and masked, so the "not" in "not excluded" is never
    # read as a negation: uncertainty beats negation.
    unc_cues = _find_cues(masked, UNCERTAINTY_CUES, active, gated)
    if unc_cues:
        masked = _mask(masked, sorted((start, end) for _, start, end in unc_cues))
    neg_cues = _find_cues(masked, NEGATION_CUES, active, gated)
    closed_after = [_LIST_CLOSE.match(low, slot.end) is not None for slot in slots]
    governed: list[tuple[int, int]] = []
    _apply_cues(low, neg_cues, slots, links, clauses, True, [], closed_after, governed)
    # "No consolidation suspicious for pneumonia": a phrase that carries a negation on to the
    # next mention is not an uncertainty cue there.
    carried = [
        (slots[i].end, slots[i + 1].start)
        for i, link in enumerate(links)
        if link == "cont" and slots[i].negated
    ]
    # "No suggestion of pneumothorax", "no findings suspicious for pneumonia": a hedge inside
    # the noun phrase a negation governs is part of what is negated.
    _apply_cues(low, unc_cues, slots, links, clauses, False, carried + governed, closed_after, [])
    _mark_alternatives(low, slots, links)
    labels: dict[Observation, Label] = {}
    normal = False
    for slot in slots:
        for obs, rule in slot.mentions:
            normal = normal or rule.normal
            if obs is None:
                continue
            if rule.fixed:
                label = rule.base
            elif slot.uncertain:
                label = Label.UNCERTAIN
            elif slot.negated:
                label = Label.NEGATIVE
            else:
                label = rule.base
            if _RANK[label] > _RANK[labels.get(obs, Label.NOT_MENTIONED)]:
                labels[obs] = label
    return _SentenceResult(labels, normal)


def label_report(text: str, *, gated: bool = True) -> dict[Observation, ObservationLabel]:
    """Label a report for all 14 observations (CheXpert aggregation over its sentences).

    ``gated=False`` runs every pattern as written, without the pre-filters of ``Gated``; the
    labels must be the same (the tests use it to check the triggers).
    """
    best: dict[Observation, tuple[Label, str]] = {}
    normal_sentence: str | None = None
    first_negative: str | None = None
    labelled: list[Sentence] = []
    skipped: list[Sentence] = []
    scanned: set[int] = set()  # every gate some labelled sentence's triggers allowed
    for sentence in split_sentences(text):
        if sentence.section in SKIPPED_SECTIONS:
            skipped.append(sentence)
            continue
        labelled.append(sentence)
        low = _lower(sentence.text)
        active = _INDEX.candidates(low, gated)
        scanned |= active
        result = _label_sentence(low, active, gated)
        if result is None:
            continue
        if result.normal and normal_sentence is None:
            normal_sentence = sentence.text
        for obs, label in result.labels.items():
            # A removed device is not a normal statement (the No Finding rule).
            if (
                label is Label.NEGATIVE
                and first_negative is None
                and obs is not Observation.SUPPORT_DEVICES
            ):
                first_negative = sentence.text
            current = best.get(obs)
            if current is None or _RANK[label] > _RANK[current[0]]:
                best[obs] = (label, sentence.text)
    missing = [obs for obs in _OBSERVATIONS if obs not in best]
    for obs, evidence in _unlabelled_mentions(text, labelled, skipped, missing, scanned, gated):
        best[obs] = (Label.UNCERTAIN, evidence)
    out: dict[Observation, ObservationLabel] = {}
    for obs in _OBSERVATIONS:
        if obs in best:
            label, evidence = best[obs]
            out[obs] = ObservationLabel(obs, label, evidence)
        else:
            out[obs] = _NOT_MENTIONED[obs]
    out[Observation.NO_FINDING] = _no_finding(best, normal_sentence, first_negative)
    return out


def _unlabelled_mentions(
    text: str,
    labelled: list[Sentence],
    skipped: list[Sentence],
    missing: list[Observation],
    scanned: set[int],
    gated: bool,
) -> list[tuple[Observation, str]]:
    """The safety net: observations of ``missing`` that a mention pattern still finds in the
    labelled part of the report (one cut by a sentence break), each with the sentence where
    its first such mention starts.

    Rules that only ever say a finding is absent ("heart size is normal") are left out: at
    worst such a phrase goes unlabelled, which hides no finding. ``scanned`` holds the gates
    whose triggers the labelled sentences contain; see _outside_sentences for the rest.
    """
    wanted_gates = frozenset().union(*(_NET_GATES[obs] for obs in missing))
    if not wanted_gates or not labelled:
        return []
    parts: list[str] = []
    cursor = 0
    for sentence in skipped:
        end = sentence.start + len(sentence.text)
        parts.append(text[cursor : sentence.start])
        parts.append(_SKIPPED_MARK * (end - sentence.start))
        cursor = end
    parts.append(text[cursor:])
    low = _lower("".join(parts))
    gates = wanted_gates & scanned
    if gated:
        gates |= wanted_gates & _INDEX.candidates(_outside_sentences(low, labelled), gated)
    if not gates:
        return []
    starts = [s.start for s in labelled]
    found: dict[Observation, tuple[int, str]] = {}
    for index in gates:
        gate, _, rule = _MENTION_TABLE[index]
        wanted = [obs for obs in rule.observations if obs in missing]
        for match in gate.scan(low, gated):
            # The sentence the mention starts in, else the next one (else the last).
            at = bisect_right(starts, match.start()) - 1
            if at < 0 or match.start() >= starts[at] + len(labelled[at].text):
                at = min(at + 1, len(labelled) - 1)
            for obs in wanted:
                if obs not in found or match.start() < found[obs][0]:
                    found[obs] = (match.start(), labelled[at].text)
            break  # the first match of a pattern is the one that counts
    return [(obs, evidence) for obs, (_, evidence) in found.items()]


def _outside_sentences(low: str, labelled: list[Sentence]) -> str:
    """The text around and between the labelled sentences, for the safety net's triggers.

    A trigger is a run of letters; one that no labelled sentence holds whole has a letter
    outside them, or spans a joint with letters on both sides (a too-long sentence cut inside
    a word), where the longest trigger's length on each side of the joint covers it.
    """
    parts: list[str] = []
    joints: list[int] = []
    cursor = 0
    for sentence in labelled:
        parts.append(low[cursor : sentence.start])
        joints += (cursor, sentence.start)
        cursor = sentence.start + len(sentence.text)
    parts.append(low[cursor:])
    joints.append(cursor)
    for joint in joints:
        if low[joint - 1 : joint].isalpha() and low[joint : joint + 1].isalpha():
            parts.append(low[max(0, joint - _TRIGGER_SPAN) : joint + _TRIGGER_SPAN])
    return _SKIPPED_MARK.join(parts)


def _no_finding(
    best: dict[Observation, tuple[Label, str]],
    normal_sentence: str | None,
    first_negative: str | None,
) -> ObservationLabel:
    """Positive when nothing but devices is positive or uncertain and something was ruled out."""
    for obs, (label, _) in best.items():
        if obs is Observation.SUPPORT_DEVICES or obs is Observation.NO_FINDING:
            continue
        if label in (Label.POSITIVE, Label.UNCERTAIN):
            return ObservationLabel(Observation.NO_FINDING, Label.NOT_MENTIONED, None)
    evidence = normal_sentence or first_negative
    if evidence is None:
        return ObservationLabel(Observation.NO_FINDING, Label.NOT_MENTIONED, None)
    return ObservationLabel(Observation.NO_FINDING, Label.POSITIVE, evidence)


def labels_as_json(
    result: dict[Observation, ObservationLabel],
) -> dict[str, dict[str, str | None]]:
    """The labels as plain JSON: {observation name: {"label": ..., "sentence": ...}}."""
    return {
        obs.value: {"label": item.label.value, "sentence": item.sentence}
        for obs, item in result.items()
    }
