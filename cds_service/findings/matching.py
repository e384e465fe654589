"""Fast regex matching for the labeler: patterns gated by trigger substrings, and their index."""

from __future__ import annotations

import re
from dataclasses import dataclass

_WORD_CHAR = re.compile(r"\w")


@dataclass(frozen=True, eq=False)
class GatedPattern:
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

    def __init__(self, gates: tuple[GatedPattern, ...]) -> None:
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


def gated_pattern(triggers: str, *alternatives: str) -> GatedPattern:
    """One gated regex from its triggers ("a|b") and its alternatives."""
    full = "|".join(alternatives)
    word_start = all(alt.startswith(r"\b") for alt in alternatives)
    fast = "|".join(alt[2:] for alt in alternatives) if word_start else full
    return GatedPattern(tuple(triggers.split("|")), re.compile(fast), re.compile(full), word_start)


def patterns(*alternatives: tuple[str, str]) -> tuple[GatedPattern, ...]:
    """Gated regexes, each given as ("trigger|trigger", regex)."""
    return tuple(gated_pattern(triggers, regex) for triggers, regex in alternatives)


def up_to_words(n: int, excluded: str = "") -> str:
    """A regex for up to ``n`` words (lazily), none of them one of the ``excluded`` alternatives."""
    guard = rf"(?!(?:{excluded})\b)" if excluded else ""
    return rf"(?:{guard}[\w/-]+\s+){{0,{n}}}?"
