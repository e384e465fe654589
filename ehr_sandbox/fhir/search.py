"""FHIR R4 search over parsed resources: parameter registry, query parsing, matching, sorting."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from functools import lru_cache
from typing import Any, Literal
from urllib.parse import parse_qsl

JsonDict = dict[str, Any]
ParamType = Literal["token", "reference", "string", "date", "uri"]

DEFAULT_COUNT = 50
MAX_COUNT = 200

RESOURCE_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]+$")
SUBSETTED_TAG: JsonDict = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "SUBSETTED",
    "display": "subsetted",
}
SUMMARY_MODES = ("true", "false", "count", "text", "data")
DATE_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")

# Parameters that only shape the response (handled by the web layer) and are never echoed.
_FORMAT_PARAMS = frozenset({"_format", "_pretty", "_total"})

_MIN_DT = datetime(1, 1, 1, tzinfo=UTC)
_MAX_DT = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
_DATE_RE = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})"
    r"(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?(Z|[+-]\d{2}:\d{2})?)?)?)?"
)
_HISTORY_SUFFIX_RE = re.compile(r"/_history/[^/]+$")
_UNESCAPE_RE = re.compile(r"\\(.)")


class SearchParameterError(ValueError):
    """A search parameter whose value cannot be interpreted (maps to HTTP 400)."""


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class SearchParamDef:
    """One supported search parameter: its FHIR type and the element paths it reads."""

    name: str
    type: ParamType
    paths: tuple[str, ...]
    target: str | None = None  # reference: the only resource type it may point to
    contains: bool = False  # string: default match is substring instead of starts-with
    documentation: str = ""

    def extract(self, resource: Mapping[str, Any]) -> list[Any]:
        """Return the (flattened) element values found at this parameter's paths."""
        out: list[Any] = []
        for path in self.paths:
            _collect(resource, path.split("."), 0, out)
        return out


def _collect(node: Any, segments: list[str], index: int, out: list[Any]) -> None:
    if isinstance(node, list):
        for item in node:
            _collect(item, segments, index, out)
        return
    if index == len(segments):
        if node is not None and node != "":
            out.append(node)
        return
    if isinstance(node, dict):
        child = node.get(segments[index])
        if child is not None:
            _collect(child, segments, index + 1, out)


def _tok(name: str, *paths: str, doc: str = "") -> SearchParamDef:
    return SearchParamDef(name, "token", paths, documentation=doc)


def _ref(name: str, *paths: str, target: str | None = None, doc: str = "") -> SearchParamDef:
    return SearchParamDef(name, "reference", paths, target=target, documentation=doc)


def _str(name: str, *paths: str, contains: bool = False, doc: str = "") -> SearchParamDef:
    return SearchParamDef(name, "string", paths, contains=contains, documentation=doc)


def _date(name: str, *paths: str, doc: str = "") -> SearchParamDef:
    return SearchParamDef(name, "date", paths, documentation=doc)


def _subject(path: str = "subject") -> tuple[SearchParamDef, SearchParamDef]:
    return (
        _ref("patient", path, target="Patient", doc=f"Patient referenced by {path}"),
        _ref("subject", path, doc=f"Any resource referenced by {path}"),
    )


def _identifier() -> SearchParamDef:
    return _tok("identifier", "identifier", doc="Business identifier (system|value)")


def _status() -> SearchParamDef:
    return _tok("status", "status", doc="Status code")


COMMON_PARAMS: tuple[SearchParamDef, ...] = (
    _tok("_id", "id", doc="Logical id of the resource"),
    _date("_lastUpdated", "meta.lastUpdated", doc="When the resource version was stored"),
    _tok("_tag", "meta.tag", doc="Tags in meta.tag"),
    _tok("_security", "meta.security", doc="Security labels in meta.security"),
    SearchParamDef("_profile", "uri", ("meta.profile",), documentation="Profiles in meta.profile"),
)

_NAME_PATHS = ("name.text", "name.family", "name.given", "name.prefix", "name.suffix")

_TYPE_PARAMS: dict[str, tuple[SearchParamDef, ...]] = {
    "Patient": (
        _identifier(),
        _str("name", *_NAME_PATHS, contains=True, doc="Substring of any part of any name"),
        _str("family", "name.family", doc="Family name (starts with)"),
        _str("given", "name.given", doc="Given name (starts with)"),
        _date("birthdate", "birthDate", doc="Date of birth"),
        _tok("gender", "gender", doc="Administrative gender"),
        _tok("active", "active", doc="Whether the record is active"),
        _ref("general-practitioner", "generalPractitioner", doc="Nominated care provider"),
        _ref("organization", "managingOrganization", doc="Managing organization"),
    ),
    "ImagingStudy": (
        *_subject(),
        _identifier(),
        _status(),
        _date("started", "started", doc="When the study was started"),
        _tok("modality", "modality", "series.modality", doc="Modality of any series"),
        _tok("series", "series.uid", doc="DICOM series instance UID"),
        _tok("bodysite", "series.bodySite", doc="Body site of any series"),
        _ref("basedon", "basedOn", doc="Request fulfilled by the study"),
        _ref("encounter", "encounter", doc="Encounter of the study"),
        _ref("endpoint", "endpoint", "series.endpoint", doc="Study or series endpoint"),
        _ref("referrer", "referrer", doc="Referring physician"),
    ),
    "DiagnosticReport": (
        *_subject(),
        _identifier(),
        _status(),
        _tok("code", "code", doc="Report code"),
        _tok("category", "category", doc="Report category"),
        _ref("based-on", "basedOn", doc="Request the report fulfils"),
        _date("issued", "issued", doc="When the report was issued"),
        _date("date", "effectiveDateTime", "effectivePeriod", doc="Clinically relevant time"),
        _ref("encounter", "encounter", doc="Encounter of the report"),
        _ref("result", "result", doc="Observations in the report"),
        _ref("performer", "performer", doc="Responsible party"),
        _ref("results-interpreter", "resultsInterpreter", doc="Interpreter of results"),
        _ref("media", "media.link", doc="Key images"),
        _tok("conclusion", "conclusionCode", doc="Coded conclusion"),
    ),
    "ServiceRequest": (
        *_subject(),
        _identifier(),
        _status(),
        _tok("intent", "intent", doc="Request intent"),
        _tok("code", "code", doc="What is requested"),
        _tok("category", "category", doc="Request category"),
        _tok("priority", "priority", doc="Request priority"),
        _date("authored", "authoredOn", doc="When the request was authored"),
        _date("occurrence", "occurrenceDateTime", "occurrencePeriod", doc="When to perform"),
        _ref("encounter", "encounter", doc="Encounter of the request"),
        _ref("requester", "requester", doc="Who requested"),
        _ref("performer", "performer", doc="Requested performer"),
        _ref("based-on", "basedOn", doc="What the request fulfils"),
    ),
    "Observation": (
        *_subject(),
        _identifier(),
        _status(),
        _tok("code", "code", doc="Observation code"),
        _tok("category", "category", doc="Observation category"),
        _tok("value-concept", "valueCodeableConcept", doc="Coded value"),
        _ref("derived-from", "derivedFrom", doc="Source of the observation"),
        _ref("based-on", "basedOn", doc="Request fulfilled"),
        _ref("encounter", "encounter", doc="Encounter of the observation"),
        _ref("focus", "focus", doc="Focus of the observation"),
        _ref("has-member", "hasMember", doc="Member observations"),
        _date(
            "date",
            "effectiveDateTime",
            "effectivePeriod",
            "effectiveInstant",
            doc="Clinically relevant time",
        ),
    ),
    "Condition": (
        *_subject(),
        _identifier(),
        _tok("code", "code", doc="Condition code"),
        _tok("category", "category", doc="Condition category"),
        _tok("clinical-status", "clinicalStatus", doc="Clinical status"),
        _tok("verification-status", "verificationStatus", doc="Verification status"),
        _ref("encounter", "encounter", doc="Encounter of the condition"),
        _date("onset-date", "onsetDateTime", "onsetPeriod", doc="Onset"),
        _date("recorded-date", "recordedDate", doc="When recorded"),
    ),
    "Endpoint": (
        _identifier(),
        _status(),
        _tok("connection-type", "connectionType", doc="Endpoint protocol"),
        _str("name", "name", contains=True, doc="Endpoint name (substring)"),
        _ref("organization", "managingOrganization", doc="Managing organization"),
    ),
    "Device": (
        _identifier(),
        _status(),
        _ref("patient", "patient", target="Patient", doc="Patient the device is attached to"),
        _tok("type", "type", doc="Device type"),
        _ref("organization", "owner", doc="Owning organization"),
    ),
    "Provenance": (
        _identifier(),
        _ref("patient", "target", target="Patient", doc="Target patient"),
        _ref("target", "target", doc="Resources the provenance is about"),
        _ref("agent", "agent.who", doc="Who participated"),
        _ref("entity", "entity.what", doc="Entities used"),
        _date("recorded", "recorded", doc="When recorded"),
    ),
    "Media": (
        *_subject(),
        _identifier(),
        _status(),
        _tok("modality", "modality", doc="Acquisition modality"),
        _tok("type", "type", doc="Media type"),
        _tok("view", "view", doc="Imaging view"),
        _date("created", "createdDateTime", "createdPeriod", doc="When created"),
        _ref("based-on", "basedOn", doc="Request fulfilled"),
        _ref("encounter", "encounter", doc="Encounter"),
        _ref("operator", "operator", doc="Operator"),
        _ref("device", "device", doc="Acquisition device"),
    ),
    "Practitioner": (
        _identifier(),
        _str("name", *_NAME_PATHS, contains=True, doc="Substring of any part of any name"),
        _str("family", "name.family", doc="Family name (starts with)"),
        _str("given", "name.given", doc="Given name (starts with)"),
        _tok("active", "active", doc="Whether the record is active"),
    ),
    "Organization": (
        _identifier(),
        _str("name", "name", "alias", contains=True, doc="Substring of name or alias"),
        _tok("type", "type", doc="Organization type"),
        _tok("active", "active", doc="Whether the record is active"),
    ),
    "Encounter": (
        *_subject(),
        _identifier(),
        _status(),
        _tok("class", "class", doc="Encounter class"),
        _tok("type", "type", doc="Encounter type"),
        _date("date", "period", doc="Encounter period"),
    ),
    "Subscription": (
        _status(),
        _str("criteria", "criteria", doc="Search the subscription watches (starts with)"),
        _tok("type", "channel.type", doc="Channel type (rest-hook)"),
        SearchParamDef(
            "url", "uri", ("channel.endpoint",), documentation="Where notifications are sent"
        ),
        _tok("payload", "channel.payload", doc="Payload mime type"),
        _tok("contact", "contact", doc="Contact for the subscription"),
    ),
    "DocumentReference": (
        *_subject(),
        _identifier(),
        _status(),
        _tok("type", "type", doc="Document type"),
        _tok("category", "category", doc="Document category"),
        _date("date", "date", doc="When the reference was created"),
    ),
}

# Types without their own registry entry still get these (when the element exists).
_FALLBACK_PARAMS: tuple[SearchParamDef, ...] = (
    _identifier(),
    _status(),
    *_subject(),
)


def _merge(params: Iterable[SearchParamDef]) -> dict[str, SearchParamDef]:
    merged = {p.name: p for p in COMMON_PARAMS}
    merged.update({p.name: p for p in params})
    return merged


_REGISTRY: dict[str, dict[str, SearchParamDef]] = {
    rtype: _merge(params) for rtype, params in _TYPE_PARAMS.items()
}
_REGISTRY["Binary"] = _merge(())
_FALLBACK_REGISTRY = _merge(_FALLBACK_PARAMS)


def search_params_for(resource_type: str) -> dict[str, SearchParamDef]:
    """Return the search parameters supported for ``resource_type``, keyed by name."""
    return _REGISTRY.get(resource_type, _FALLBACK_REGISTRY)


def registered_resource_types() -> list[str]:
    """Resource types with a dedicated set of search parameters (sorted)."""
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------- value helpers


@lru_cache(maxsize=8192)
def normalize_string(value: str) -> str:
    """Case- and accent-insensitive form of a string, as FHIR string search compares them."""
    decomposed = unicodedata.normalize("NFKD", value)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


def _split_escaped(value: str, sep: str) -> list[str]:
    """Split on ``sep`` unless backslash-escaped; escapes are kept for a later split."""
    parts: list[str] = []
    buf: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            buf.append(value[i : i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
        i += 1
    parts.append("".join(buf))
    return parts


def _unescape(value: str) -> str:
    return _UNESCAPE_RE.sub(r"\1", value)


def _or_values(value: str) -> list[str]:
    values = [v for v in _split_escaped(value, ",") if v != ""]
    if not values:
        raise SearchParameterError(f"Empty search value {value!r}")
    return values


@lru_cache(maxsize=8192)
def parse_date_range(value: str) -> tuple[datetime, datetime]:
    """Parse a FHIR date/dateTime/instant into a half-open UTC range ``[start, end)``.

    The range covers the value's precision: ``2024`` is the whole year, ``2024-05-03`` the
    whole day, a time with seconds one second. Values without a time zone are taken as UTC.
    Raises ``ValueError`` for malformed values.
    """
    text = value.strip().replace(" ", "+")  # an unencoded "+" in a query arrives as a space
    m = _DATE_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"Not a FHIR date/dateTime: {value!r}")
    year_s, month_s, day_s, hour_s, minute_s, second_s, frac_s, tz_s = m.groups()
    year, month, day = int(year_s), int(month_s or 1), int(day_s or 1)
    if hour_s is None:
        start = datetime(year, month, day, tzinfo=UTC)
        try:
            if month_s is None:
                end = start.replace(year=year + 1)
            elif day_s is None:
                end = (
                    start.replace(year=year + 1, month=1)
                    if month == 12
                    else start.replace(month=month + 1)
                )
            else:
                end = start + timedelta(days=1)
        except (ValueError, OverflowError):
            end = _MAX_DT
        return start, end
    tz = UTC
    if tz_s and tz_s != "Z":
        sign = -1 if tz_s[0] == "-" else 1
        offset = timedelta(hours=int(tz_s[1:3]), minutes=int(tz_s[4:6]))
        tz = timezone(sign * offset)
    micro = int((frac_s + "000000")[:6]) if frac_s else 0
    local = datetime(year, month, day, int(hour_s), int(minute_s), int(second_s or 0), micro, tz)
    start = local.astimezone(UTC)
    if second_s is None:
        step = timedelta(minutes=1)
    elif frac_s:
        step = timedelta(microseconds=10 ** (6 - min(len(frac_s), 6)))
    else:
        step = timedelta(seconds=1)
    try:
        end = start + step
    except OverflowError:
        end = _MAX_DT
    return start, end


def _element_range(element: Any) -> tuple[datetime, datetime] | None:
    try:
        if isinstance(element, str):
            return parse_date_range(element)
        if isinstance(element, dict) and ("start" in element or "end" in element):
            start = element.get("start")
            end = element.get("end")
            low = parse_date_range(start)[0] if isinstance(start, str) else _MIN_DT
            high = parse_date_range(end)[1] if isinstance(end, str) else _MAX_DT
            return low, high
    except ValueError:
        return None
    return None


@dataclass(frozen=True, slots=True)
class _Token:
    system: str | None
    code: str | None
    text: str  # normalized display/text, for :text


def _coding_token(coding: Mapping[str, Any], extra_text: str = "") -> _Token:
    texts = [t for t in (coding.get("display"), extra_text) if isinstance(t, str) and t]
    code = coding.get("code")
    system = coding.get("system")
    return _Token(
        system if isinstance(system, str) else None,
        str(code) if code is not None else None,
        normalize_string(" ".join(texts)),
    )


def _tokens(elements: Iterable[Any]) -> list[_Token]:
    out: list[_Token] = []
    for el in elements:
        if isinstance(el, bool):
            out.append(_Token(None, "true" if el else "false", ""))
        elif isinstance(el, str | int | float):
            out.append(_Token(None, str(el), ""))
        elif isinstance(el, dict):
            if "coding" in el or ("text" in el and "code" not in el and "value" not in el):
                raw_text = el.get("text")
                text = raw_text if isinstance(raw_text, str) else ""
                codings = [c for c in el.get("coding") or [] if isinstance(c, dict)]
                out.extend(_coding_token(c, text) for c in codings)
                if not codings:
                    out.append(_Token(None, None, normalize_string(text)))
            elif "code" in el:
                out.append(_coding_token(el))
            elif "value" in el:  # Identifier (or ContactPoint)
                system = el.get("system")
                id_type = el.get("type")
                type_text = id_type.get("text") if isinstance(id_type, dict) else None
                out.append(
                    _Token(
                        system if isinstance(system, str) else None,
                        str(el["value"]),
                        normalize_string(type_text) if isinstance(type_text, str) else "",
                    )
                )
    return out


@dataclass(frozen=True, slots=True)
class _TokenQuery:
    system: str | None  # None: any system; "": no system
    code: str | None  # None: any code


def _parse_token(value: str) -> _TokenQuery:
    parts = _split_escaped(value, "|")
    if len(parts) == 1:
        return _TokenQuery(None, _unescape(parts[0]))
    if len(parts) == 2:
        system, code = _unescape(parts[0]), _unescape(parts[1])
        if not system and not code:
            raise SearchParameterError(f"Invalid token {value!r}")
        return _TokenQuery(system, code or None)
    raise SearchParameterError(f"Invalid token {value!r} (more than one '|')")


def _token_matches(token: _Token, query: _TokenQuery) -> bool:
    if query.system is not None:
        if query.system == "":
            if token.system:
                return False
        elif token.system != query.system:
            return False
    return query.code is None or token.code == query.code


@dataclass(frozen=True, slots=True)
class _RefParts:
    raw: str
    type: str | None
    id: str | None


def _parse_reference(reference: str) -> _RefParts:
    raw = reference.strip()
    text = _HISTORY_SUFFIX_RE.sub("", raw)
    if text.startswith("#") or text.startswith("urn:"):
        return _RefParts(raw, None, None)
    segments = text.rstrip("/").split("/")
    if len(segments) >= 2 and RESOURCE_TYPE_RE.match(segments[-2]) and segments[-1]:
        return _RefParts(raw, segments[-2], segments[-1])
    if len(segments) == 1 and segments[0]:
        return _RefParts(raw, None, segments[0])
    return _RefParts(raw, None, None)


def _reference_strings(elements: Iterable[Any]) -> list[str]:
    out: list[str] = []
    for el in elements:
        if isinstance(el, dict):
            ref = el.get("reference")
            if isinstance(ref, str) and ref:
                out.append(ref)
        elif isinstance(el, str) and el:
            out.append(el)
    return out


def _strings(elements: Iterable[Any]) -> list[str]:
    return [el for el in elements if isinstance(el, str) and el]


# --------------------------------------------------------------------------- predicates

Predicate = Callable[[list[Any]], bool]


def _token_predicate(modifier: str | None, value: str) -> Predicate:
    if modifier == "text":
        needles = [normalize_string(_unescape(v)) for v in _or_values(value)]
        return lambda els: any(n in t.text for t in _tokens(els) for n in needles)
    queries = [_parse_token(v) for v in _or_values(value)]

    def match(els: list[Any]) -> bool:
        return any(_token_matches(t, q) for t in _tokens(els) for q in queries)

    if modifier == "not":
        return lambda els: not match(els)
    return match


def _string_predicate(param: SearchParamDef, modifier: str | None, value: str) -> Predicate:
    raw_values = [_unescape(v) for v in _or_values(value)]
    if modifier == "exact":
        return lambda els: any(s == v for s in _strings(els) for v in raw_values)
    needles = [normalize_string(v) for v in raw_values]
    if modifier == "contains" or param.contains:
        return lambda els: any(n in normalize_string(s) for s in _strings(els) for n in needles)
    return lambda els: any(
        normalize_string(s).startswith(n) for s in _strings(els) for n in needles
    )


def _uri_predicate(modifier: str | None, value: str) -> Predicate:
    uris = [_unescape(v) for v in _or_values(value)]
    if modifier == "below":
        return lambda els: any(s.startswith(u) for s in _strings(els) for u in uris)
    if modifier == "above":
        return lambda els: any(u.startswith(s) for s in _strings(els) for u in uris)
    return lambda els: any(s == u for s in _strings(els) for u in uris)


def _reference_predicate(param: SearchParamDef, modifier: str | None, value: str) -> Predicate:
    if modifier == "identifier":
        queries = [_parse_token(v) for v in _or_values(value)]

        def match_identifier(els: list[Any]) -> bool:
            idents = [el["identifier"] for el in els if isinstance(el, dict) and "identifier" in el]
            return any(_token_matches(t, q) for t in _tokens(idents) for q in queries)

        return match_identifier
    required_type = modifier or param.target
    wanted = [_parse_reference(_unescape(v)) for v in _or_values(value)]

    def match(els: list[Any]) -> bool:
        for ref in _reference_strings(els):
            parts = _parse_reference(ref)
            for q in wanted:
                if parts.raw == q.raw and parts.type in (None, required_type or parts.type):
                    return True
                if q.id is None or parts.id != q.id:
                    continue
                expected = q.type or required_type
                if required_type and q.type and q.type != required_type:
                    continue
                if expected is None or parts.type == expected:
                    return True
        return False

    return match


def _date_matches(
    prefix: str, low: datetime, high: datetime, rlow: datetime, rhigh: datetime
) -> bool:
    contained = rlow >= low and rhigh <= high
    if prefix == "eq":
        return contained
    if prefix == "ne":
        return not contained
    if prefix == "gt":
        return rhigh > high
    if prefix == "lt":
        return rlow < low
    if prefix == "ge":
        return rhigh > high or contained
    if prefix == "le":
        return rlow < low or contained
    if prefix == "sa":
        return rlow >= high
    if prefix == "eb":
        return rhigh <= low
    # ap: overlap with the value widened by 10% of its distance from now
    slack = abs(datetime.now(UTC) - low) / 10
    return rlow < high + slack and rhigh > low - slack


def _date_predicate(value: str) -> Predicate:
    queries: list[tuple[str, datetime, datetime]] = []
    for item in _or_values(value):
        prefix = "eq"
        if item[:2] in DATE_PREFIXES:
            prefix, item = item[:2], item[2:]
        try:
            low, high = parse_date_range(item)
        except ValueError as exc:
            raise SearchParameterError(f"Invalid date search value {value!r}") from exc
        queries.append((prefix, low, high))

    def match(els: list[Any]) -> bool:
        for el in els:
            rng = _element_range(el)
            if rng is None:
                continue
            if any(_date_matches(p, lo, hi, rng[0], rng[1]) for p, lo, hi in queries):
                return True
        return False

    return match


def _missing_predicate(value: str) -> Predicate:
    if value == "true":
        return lambda els: not els
    if value == "false":
        return lambda els: bool(els)
    raise SearchParameterError(f":missing takes true or false, not {value!r}")


_MODIFIERS: dict[str, frozenset[str]] = {
    "token": frozenset({"not", "text", "missing"}),
    "string": frozenset({"exact", "contains", "missing"}),
    "uri": frozenset({"below", "above", "missing"}),
    "date": frozenset({"missing"}),
    "reference": frozenset({"identifier", "missing"}),
}


def _supports_modifier(param: SearchParamDef, modifier: str | None) -> bool:
    if modifier is None or modifier in _MODIFIERS[param.type]:
        return True
    # reference type modifier, e.g. subject:Patient (must agree with a fixed target)
    return (
        param.type == "reference"
        and RESOURCE_TYPE_RE.match(modifier) is not None
        and (param.target is None or param.target == modifier)
    )


def _build_predicate(param: SearchParamDef, modifier: str | None, value: str) -> Predicate:
    if modifier == "missing":
        return _missing_predicate(value)
    if param.type == "token":
        return _token_predicate(modifier, value)
    if param.type == "string":
        return _string_predicate(param, modifier, value)
    if param.type == "uri":
        return _uri_predicate(modifier, value)
    if param.type == "date":
        return _date_predicate(value)
    return _reference_predicate(param, modifier, value)


# --------------------------------------------------------------------------- parsed query


@dataclass(frozen=True)
class SearchFilter:
    """One applied search parameter occurrence (values within it are OR-ed)."""

    param: SearchParamDef
    modifier: str | None
    name: str  # as given, including any modifier
    value: str
    predicate: Predicate

    def matches(self, resource: Mapping[str, Any]) -> bool:
        return self.predicate(self.param.extract(resource))


@dataclass(frozen=True)
class SortKey:
    """One ``_sort`` component."""

    param: SearchParamDef
    descending: bool


@dataclass
class ParsedSearch:
    """A search request split into filters, sort order, paging and response shaping."""

    resource_type: str
    filters: list[SearchFilter]
    sort: list[SortKey]
    count: int
    offset: int
    summary: str | None
    elements: list[str] | None
    applied: list[tuple[str, str]]  # parameters actually used, for the self link (no paging)
    unknown: list[str]  # parameters (or parts) that were ignored

    def matches(self, resource: Mapping[str, Any]) -> bool:
        """True when the resource satisfies every filter (AND across parameters)."""
        return all(f.matches(resource) for f in self.filters)


def _parse_int(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError as exc:
        raise SearchParameterError(f"{name} must be a non-negative integer, not {value!r}") from exc
    if number < 0:
        raise SearchParameterError(f"{name} must be a non-negative integer, not {value!r}")
    return number


def parse_search(
    resource_type: str,
    params: Sequence[tuple[str, str]],
    *,
    default_count: int = DEFAULT_COUNT,
    max_count: int = MAX_COUNT,
) -> ParsedSearch:
    """Interpret search parameters for ``resource_type``.

    Repeated parameters are AND-ed, comma-separated values OR-ed. Parameters that are not
    supported (or use unsupported modifiers) are listed in ``unknown`` and otherwise ignored;
    empty values are ignored. Raises ``SearchParameterError`` for malformed values.
    """
    defs = search_params_for(resource_type)
    filters: list[SearchFilter] = []
    sort: list[SortKey] = []
    applied: list[tuple[str, str]] = []
    unknown: list[str] = []
    count = default_count
    offset = 0
    summary: str | None = None
    elements: list[str] | None = None

    for name, value in params:
        value = value.strip()
        if value == "":
            continue
        base, _, mod = name.partition(":")
        modifier = mod or None
        if base in _FORMAT_PARAMS:
            continue
        if base == "_count" and modifier is None:
            count = min(_parse_int("_count", value), max_count)
        elif base == "_offset" and modifier is None:
            offset = _parse_int("_offset", value)
        elif base == "_sort" and modifier in (None, "asc", "desc"):
            items: list[str] = []
            for item in (i.strip() for i in value.split(",")):
                descending = modifier == "desc"
                key = item
                if key.startswith("-"):
                    descending, key = True, key[1:]
                if key not in defs:
                    if key:
                        unknown.append(f"_sort={item}")
                    continue
                sort.append(SortKey(defs[key], descending))
                items.append(("-" if descending else "") + key)
            if items:
                applied.append(("_sort", ",".join(items)))
        elif base == "_summary" and modifier is None:
            if value not in SUMMARY_MODES:
                raise SearchParameterError(f"_summary must be one of {', '.join(SUMMARY_MODES)}")
            summary = None if value == "false" else value
            applied.append(("_summary", value))
        elif base == "_elements" and modifier is None:
            names = [e.strip() for e in value.split(",") if e.strip()]
            if names:
                elements = (elements or []) + names
                applied.append(("_elements", ",".join(names)))
        elif base in defs and _supports_modifier(defs[base], modifier):
            param = defs[base]
            filters.append(
                SearchFilter(param, modifier, name, value, _build_predicate(param, modifier, value))
            )
            applied.append((name, value))
        else:
            unknown.append(name)

    return ParsedSearch(
        resource_type=resource_type,
        filters=filters,
        sort=sort,
        count=count,
        offset=offset,
        summary=summary,
        elements=elements,
        applied=applied,
        unknown=unknown,
    )


def request_search_pairs(query_string: bytes, form_body: bytes | None) -> list[tuple[str, str]]:
    """A search request's parameters as the FHIR API applies them: the query string's,
    then those of a POSTed form body (an access check must read them the same way)."""
    pairs = parse_qsl(query_string.decode("utf-8", "replace"), keep_blank_values=True)
    if form_body:
        pairs += parse_qsl(form_body.decode("utf-8", "replace"), keep_blank_values=True)
    return pairs


def parse_query_string(query: str) -> list[tuple[str, str]]:
    """Parse ``a=1&b=2`` (optionally prefixed by ``?`` or ``Type?``) into ordered pairs."""
    text = query.strip()
    if "?" in text:
        text = text.split("?", 1)[1]
    return parse_qsl(text, keep_blank_values=True)


# --------------------------------------------------------------------------- sorting


def _sort_value(key: SortKey, resource: Mapping[str, Any]) -> Any:
    els = key.param.extract(resource)
    values: list[Any]
    if key.param.type == "date":
        ranges = [r for r in (_element_range(e) for e in els) if r is not None]
        values = [r[0] for r in ranges]
    elif key.param.type == "string":
        values = [normalize_string(s) for s in _strings(els)]
    elif key.param.type == "token":
        values = [t.code for t in _tokens(els) if t.code is not None]
    elif key.param.type == "reference":
        values = _reference_strings(els)
    else:
        values = _strings(els)
    if not values:
        return None
    return max(values) if key.descending else min(values)


def sort_resources(resources: Sequence[JsonDict], keys: Sequence[SortKey]) -> list[JsonDict]:
    """Stable multi-key sort; resources lacking a key's value go last in either direction."""
    result = list(resources)
    for key in reversed(keys):
        decorated = [(_sort_value(key, r), r) for r in result]
        present = [d for d in decorated if d[0] is not None]
        missing = [r for v, r in decorated if v is None]
        present.sort(key=lambda d: d[0], reverse=key.descending)
        result = [r for _, r in present] + missing
    return result


# --------------------------------------------------------------------------- response shaping


def _with_subsetted_tag(resource: JsonDict) -> JsonDict:
    meta = dict(resource.get("meta") or {})
    tags = [
        t
        for t in meta.get("tag") or []
        if not (isinstance(t, dict) and t.get("code") == "SUBSETTED")
    ]
    meta["tag"] = [*tags, dict(SUBSETTED_TAG)]
    resource["meta"] = meta
    return resource


def shape_resource(
    resource: JsonDict, summary: str | None, elements: Sequence[str] | None
) -> JsonDict:
    """Apply ``_summary`` (true/text/data) and ``_elements`` to a resource (returns a copy)."""
    if summary in (None, "false", "count") and not elements:
        return resource
    keep_always = ("resourceType", "id", "meta")
    if summary == "text":
        shaped = {k: v for k, v in resource.items() if k in (*keep_always, "text")}
    elif summary == "data":
        shaped = {k: v for k, v in resource.items() if k != "text"}
    elif summary == "true":
        dropped = {"text", "contained"}
        if resource.get("resourceType") == "Binary":
            dropped.add("data")
        shaped = {k: v for k, v in resource.items() if k not in dropped}
    else:
        shaped = dict(resource)
    if elements:
        wanted = set(elements) | set(keep_always)
        shaped = {k: v for k, v in shaped.items() if k in wanted}
    return _with_subsetted_tag(shaped)


def capability_search_params(resource_type: str) -> list[JsonDict]:
    """``CapabilityStatement.rest.resource.searchParam`` entries for a resource type."""
    return [
        {"name": p.name, "type": p.type, "documentation": p.documentation}
        if p.documentation
        else {"name": p.name, "type": p.type}
        for p in search_params_for(resource_type).values()
    ]
