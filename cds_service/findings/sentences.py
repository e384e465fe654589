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
# A header opens a line or follows a finished sentence: "Compared to prior study: large
# pneumothorax" is a sentence, not a STUDY section. A capitalised header may also stand after
# a space mid-line ("CHEST PA AND LAT INDICATION: cough", "Indication: cough Findings: ...").
_LINE_OR_SENTENCE_END = frozenset("\n.!?;")
_BLANKS = " \t\f\v"

# Sections that say why the study was done or how, not what it shows: a labeler that read
# "INDICATION: evaluate for pneumonia" would report a pneumonia the radiologist never saw.
# Only these are skipped, and only to the end of their line (split_sentences): EXAM, STUDY
# and COMPARISON lines can carry findings ("Exam: Large right pneumothorax.").
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
        "technique",
        "reason for exam",
        "reason for examination",
        "reason for study",
        "reason for request",
        "reason for referral",
    }
)
# A sentence longer than this is cut at its last comma or semicolon before the limit (else at
# a space, else anywhere): labelling a sentence costs more than linear time in its length.
MAX_SENTENCE_CHARS = 1000

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


def _opens_header(text: str, start: int) -> bool:
    """Whether a header name at ``start`` stands where a header can: see _LINE_OR_SENTENCE_END."""
    before = start
    while before and text[before - 1] in _BLANKS:
        before -= 1
    if before == 0 or text[before - 1] in _LINE_OR_SENTENCE_END:
        return True
    return before < start and text[start].isupper()


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
            if match is not None and _opens_header(text, start):
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


def _bounded(sentence: Sentence) -> list[Sentence]:
    """The sentence cut into pieces of at most MAX_SENTENCE_CHARS characters."""
    text = sentence.text
    pieces: list[Sentence] = []
    cursor = 0
    while len(text) - cursor > MAX_SENTENCE_CHARS:
        limit = cursor + MAX_SENTENCE_CHARS
        cut = max(text.rfind(",", cursor + 1, limit), text.rfind(";", cursor + 1, limit))
        if cut == -1:
            cut = text.rfind(" ", cursor + 1, limit)
        end = limit if cut == -1 else cut + 1
        _append(pieces, text, cursor, end, sentence.section)
        cursor = end
    _append(pieces, text, cursor, len(text), sentence.section)
    return [Sentence(p.text, sentence.start + p.start, p.section) for p in pieces]


def _line_breaks(text: str) -> str:
    """The text with every line end a plain "\\n" and the same length ("\\r\\n" -> " \\n")."""
    if "\r" not in text:
        return text
    return text.replace("\r\n", " \n").replace("\r", "\n")


def split_sentences(text: str) -> list[Sentence]:
    """Split a report into sentences; header words ("FINDINGS:") are not part of any sentence.

    A section that says why or how the study was done (SKIPPED_SECTIONS) runs to the end of
    its first line, or when no line break follows, over its first sentence ("Indication:
    cough. Lungs are clear."); what follows has no section. "\\r" ends a line as "\\n" does.
    Sentences longer than MAX_SENTENCE_CHARS are cut into pieces.
    """
    lines = _line_breaks(text)
    sentences: list[Sentence] = []
    for start, end, section in _segments(lines):
        pieces = _split_segment(lines, start, end, section)
        if section in SKIPPED_SECTIONS and pieces:
            limit = _first_line_or_sentence_end(lines[start:end]) + start
            pieces = [p if p.start < limit else Sentence(p.text, p.start, None) for p in pieces]
        for piece in pieces:
            if lines is not text:
                # The offsets hold in the report itself; its text is taken from there.
                stop = piece.start + len(piece.text)
                piece = Sentence(text[piece.start : stop], piece.start, piece.section)
            if len(piece.text) > MAX_SENTENCE_CHARS:
                sentences.extend(_bounded(piece))
            else:
                sentences.append(piece)
    return sentences
