"""Sentence splitting for radiology reports: section headers, numbered lists, abbreviations."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Section headers a report may carry, matched case-insensitively when followed by a colon.
_HEADER_NAME = re.compile(
    r"(?i)(?P<name>"
    r"findings\s+and\s+impression|findings|impressions?|conclusions?|summary|opinion"
    r"|interpretation|final\s+report|report|addendum|wet\s+read|notification"
    r"|recommendations?|indications?|clinical\s+(?:history|indication|information|notes?|data)"
    r"|(?:medical\s+|patient\s+)?history|comparisons?|technique|procedure|type\s+of\s+exam"
    r"|exam(?:ination)?|study|reason\s+for\s+(?:exam(?:ination)?|study|request|referral)"
    r")\s*$"
)
_HEADER_WINDOW = 48  # longer than any header name
_WORD = re.compile(r"[A-Za-z]+")
_BEFORE_HEADER = frozenset(" \t\n\r\f\v.;")

# Sections that describe why the study was done or how, not what it shows: a labeler that
# read "INDICATION: evaluate for pneumonia" would report a pneumonia the radiologist never saw.
SKIPPED_SECTIONS = frozenset(
    {
        "indication",
        "indications",
        "clinical history",
        "clinical indication",
        "clinical information",
        "clinical note",
        "clinical notes",
        "clinical data",
        "history",
        "medical history",
        "patient history",
        "comparison",
        "comparisons",
        "technique",
        "procedure",
        "type of exam",
        "exam",
        "examination",
        "study",
        "reason for exam",
        "reason for examination",
        "reason for study",
        "reason for request",
        "reason for referral",
    }
)

# Candidate sentence ends: terminal punctuation before whitespace or the end, a blank line,
# or a line break before a list marker or a capitalised line.
_BREAK = re.compile(
    r"[.!?]+(?=\s|$)|\n[ \t]*\n\s*|\n(?=[ \t]*(?:\(?\d{1,2}[.)]\s|[-*\u2022]\s|[A-Z]))"
)
# Tokens that end with a period without ending the sentence ("approx. 4 cm", "e.g. edema").
# fmt: off
_ABBREVIATIONS = frozenset({
    "approx", "e.g", "i.e", "eg", "ie", "vs", "v.s", "cf", "dr", "mr", "mrs", "ms", "st", "pt",
    "fig", "incl", "resp", "prev", "hx", "lt", "rt", "lat", "ant", "post", "sup", "inf", "a.m",
    "p.m", "sq", "est", "max", "min", "ca",
})
# fmt: on
_TOKEN_BEFORE = re.compile(r"([A-Za-z][A-Za-z.]*)$")
_DIGITS_BEFORE = re.compile(r"\(?\d{1,2}$")
_OPEN_PHRASE = re.compile(
    r"(?i)\b(?:and|or|nor|of|the|a|an|no|not|with|without|for|to|in|is|are|at|by|from)$"
)
_LIST_MARKER = re.compile(r"^\s*(?:\(?\d{1,2}[.)]|[-*\u2022])\s+")
_LETTER = re.compile(r"[A-Za-z]")


@dataclass(frozen=True, slots=True)
class Sentence:
    """One sentence: its text (a slice of the report), where it starts, and its section."""

    text: str
    start: int
    section: str | None


def _is_boundary(segment: str, match: re.Match[str]) -> bool:
    """Whether a candidate break really ends a sentence."""
    found = match.group(0)
    start = match.start()
    if found == "\n":
        # A single line break before a capital: a new line of a list, unless the line before
        # stops mid-phrase, as wrapped text does ("no focal consolidation or\nPneumothorax").
        line = segment[max(0, start - 16) : start].rstrip()
        return not line.endswith(",") and _OPEN_PHRASE.search(line) is None
    if found[0] != ".":
        return True
    # Only the last few characters matter; looking further would make splitting quadratic.
    tail = segment[max(0, start - 12) : start]
    digits = _DIGITS_BEFORE.search(tail)
    if digits is not None:
        head = segment[: start - len(tail) + digits.start()].rstrip(" \t")
        if not head or head[-1] in ".!?:;\n":
            return False  # "2." opening a numbered item, not a sentence of its own
    token = _TOKEN_BEFORE.search(tail)
    if token is None:
        return True
    word = token.group(1).lower()
    # Single letters are initials or parts of "e.g."; known abbreviations never end a sentence.
    return not (len(word) == 1 or word in _ABBREVIATIONS)


def _split_segment(text: str, start: int, end: int, section: str | None) -> list[Sentence]:
    segment = text[start:end]
    pieces: list[Sentence] = []
    cursor = 0
    for match in _BREAK.finditer(segment):
        if not _is_boundary(segment, match):
            continue
        _append(pieces, text, start + cursor, start + match.end(), section)
        cursor = match.end()
    _append(pieces, text, start + cursor, end, section)
    return pieces


def _append(out: list[Sentence], text: str, start: int, end: int, section: str | None) -> None:
    piece = text[start:end]
    marker = _LIST_MARKER.match(piece)
    if marker is not None:
        start += marker.end()
        piece = piece[marker.end() :]
    stripped = piece.strip()
    if not stripped or _LETTER.search(stripped) is None:
        return
    out.append(Sentence(stripped, start + piece.index(stripped), section))


def _headers(text: str) -> list[tuple[int, int, str]]:
    """Section headers as (start, end after the colon, normalised name)."""
    found: list[tuple[int, int, str]] = []
    colon = text.find(":")
    while colon != -1:
        window_start = max(0, colon - _HEADER_WINDOW)
        starts = [m.start() for m in _WORD.finditer(text, window_start, colon)]
        # The leftmost of the last few words first, so "clinical history" beats "history".
        for start in starts[-5:]:
            match = _HEADER_NAME.match(text, start, colon)
            if match is not None and (start == 0 or text[start - 1] in _BEFORE_HEADER):
                name = " ".join(match.group("name").lower().split())
                found.append((start, colon + 1, name))
                break
        colon = text.find(":", colon + 1)
    return found


def _segments(text: str) -> list[tuple[int, int, str | None]]:
    """The report cut at its headers, each piece with the section it belongs to."""
    segments: list[tuple[int, int, str | None]] = []
    section: str | None = None
    cursor = 0
    for h_start, h_end, name in _headers(text):
        if h_start < cursor:
            continue
        segments.append((cursor, h_start, section))
        section = name
        cursor = h_end
    segments.append((cursor, len(text), section))
    return segments


def _first_line_or_sentence_end(segment: str) -> int:
    body_start = len(segment) - len(segment.lstrip())
    line_end = segment.find("\n", body_start)
    if line_end != -1:
        return line_end
    for match in _BREAK.finditer(segment, body_start):
        if _is_boundary(segment, match):
            return match.end()
    return len(segment)


def split_sentences(text: str) -> list[Sentence]:
    """Split a report into sentences; header words ("FINDINGS:") are not part of any sentence.

    A section that says why or how the study was done (SKIPPED_SECTIONS) runs to the next
    header; when no header follows, it runs only to the end of its line, or when the report
    is one line, over its first sentence ("Indication: cough. Lungs are clear.").
    """
    sentences: list[Sentence] = []
    segments = _segments(text)
    for index, (start, end, section) in enumerate(segments):
        pieces = _split_segment(text, start, end, section)
        if section in SKIPPED_SECTIONS and index == len(segments) - 1 and pieces:
            limit = _first_line_or_sentence_end(text[start:end]) + start
            pieces = [p if p.start < limit else Sentence(p.text, p.start, None) for p in pieces]
        sentences.extend(pieces)
    return sentences
