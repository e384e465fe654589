"""Checks on the FHIR R4 resources the service writes, beyond the R4B models' structure checks."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator, Mapping
from typing import Any

import pydantic
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource

from cds_service.errors import CdsServiceError
from cds_service.fhir_out.codes import AIAST, SIMULATED_TAG


class InvalidResource(CdsServiceError):
    """A resource the service built breaks FHIR R4 or this service's rules: a bug, never sent."""

    status = 500
    code = "invalid-resource"


def _codes(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Required bindings in FHIR R4 (4.0.1).
STATUSES: dict[str, frozenset[str]] = {
    "DiagnosticReport": _codes(
        "registered partial preliminary final amended corrected appended cancelled "
        "entered-in-error unknown"
    ),
    "Observation": _codes(
        "registered preliminary final amended corrected cancelled entered-in-error unknown"
    ),
    "Device": _codes("active inactive entered-in-error unknown"),
}
# A verified result: AI output is never that (amended, corrected and appended all follow a final).
VERIFIED_STATUSES = frozenset({"final", "amended", "corrected", "appended"})
DEVICE_NAME_TYPES = _codes(
    "udi-label-name user-friendly-name patient-reported-name manufacturer-name model-name other"
)
PROVENANCE_ENTITY_ROLES = _codes("derivation revision quotation source removal")
BUNDLE_TYPES = _codes(
    "document message transaction transaction-response batch batch-response history searchset "
    "collection"
)
HTTP_VERBS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"})

_SUBJECTS = frozenset({"Patient", "Group", "Device", "Location"})
# Reference targets allowed in what this service writes: R4's lists, narrowed where the service
# means one type (Observation.device, derivedFrom and Provenance agent.who: STANDARDS.md).
REFERENCE_TARGETS: dict[str, dict[str, frozenset[str]]] = {
    "DiagnosticReport": {
        "subject": _SUBJECTS,
        "encounter": frozenset({"Encounter"}),
        "result": frozenset({"Observation"}),
        "imagingStudy": frozenset({"ImagingStudy"}),
    },
    "Observation": {
        "subject": _SUBJECTS,
        "encounter": frozenset({"Encounter"}),
        "device": frozenset({"Device"}),
        "derivedFrom": frozenset({"ImagingStudy"}),
    },
    "Device": {"patient": frozenset({"Patient"}), "owner": frozenset({"Organization"})},
    "Provenance": {"agent.who": frozenset({"Device"})},
}

_ID = r"[A-Za-z0-9\-.]{1,64}"
_RELATIVE_OR_ABSOLUTE = re.compile(
    rf"^(?:https?://[^\s?#]+/)?(?P<type>[A-Z][A-Za-z]+)/{_ID}(?:/_history/{_ID})?$"
)
_OID = re.compile(r"^[0-2](?:\.(?:0|[1-9][0-9]*))+$")
_UUID = re.compile(r"^urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_NORMAL = re.compile(r"\bnormal\b", re.IGNORECASE)
UID_MAX = 64  # DICOM PS3.5 section 9.1: a UID is at most 64 characters


def check_resource(resource: dict[str, Any]) -> None:
    """Raise InvalidResource, naming the element and what is allowed, unless `resource` is a
    valid R4 resource (R4B model) that also passes this service's own rules."""
    _check(resource, {})


def _check(resource: Any, fullurls: Mapping[str, str]) -> None:
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        raise InvalidResource("not a FHIR resource: a JSON object with a resourceType is needed")
    rtype = resource["resourceType"]
    for path, value in _walk(resource, rtype):
        _check_value(path, value)
    _check_model(resource, rtype)
    status = resource.get("status")
    if rtype in STATUSES and status not in STATUSES[rtype]:
        allowed = ", ".join(sorted(STATUSES[rtype]))
        raise InvalidResource(f"{rtype}.status: {status!r} is not an R4 code ({allowed})")
    ai_asserted = rtype in ("DiagnosticReport", "Observation")
    if ai_asserted and not _has_coding(resource, "security", AIAST):
        raise InvalidResource(f"{rtype}.meta.security: the AIAST label (AI asserted) is missing")
    if ai_asserted and status in VERIFIED_STATUSES:
        allowed = ", ".join(sorted(STATUSES[rtype] - VERIFIED_STATUSES))
        raise InvalidResource(
            f"{rtype}.status: {status!r} claims a verified result; AI output is never verified "
            f"(use one of {allowed})"
        )
    for path, targets in REFERENCE_TARGETS.get(rtype, {}).items():
        for where, reference in _references(resource, path.split("."), rtype):
            _check_reference(where, reference, targets, fullurls)
    _check_codes(resource, rtype)
    if _has_coding(resource, "tag", SIMULATED_TAG):
        _check_simulated_texts(resource, rtype)
    if rtype == "DiagnosticReport" and _NORMAL.search(resource.get("conclusion", "")):
        raise InvalidResource("DiagnosticReport.conclusion: AI output never says 'normal'")
    if rtype == "Bundle":
        _check_bundle(resource)


def _walk(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, f"{path}[{index}]")


def _check_value(path: str, value: Any) -> None:
    if value is None:
        raise InvalidResource(f"{path}: null is not allowed in FHIR JSON (omit the element)")
    if isinstance(value, str | list | dict) and not value:
        raise InvalidResource(f"{path}: empty {type(value).__name__} is not allowed (omit it)")
    if isinstance(value, str) and not value.strip():
        raise InvalidResource(f"{path}: a string of only whitespace is not allowed")
    if isinstance(value, str) and value.startswith("urn:oid:"):
        oid = value.removeprefix("urn:oid:")
        if not _OID.match(oid) or len(oid) > UID_MAX:
            raise InvalidResource(
                f"{path}: {value!r} is not a well-formed urn:oid (digits and dots, no leading "
                f"zeros, at most {UID_MAX} characters)"
            )
    if isinstance(value, str) and value.startswith("urn:uuid:") and not _UUID.match(value):
        raise InvalidResource(f"{path}: {value!r} is not a lower-case RFC 4122 urn:uuid")
    dicom_uid = isinstance(value, dict) and value.get("system") == "urn:dicom:uid"
    if dicom_uid and not str(value.get("value", "")).startswith("urn:oid:"):
        raise InvalidResource(f"{path}.value: a urn:dicom:uid identifier needs urn:oid:<uid>")


def _check_model(resource: dict[str, Any], rtype: str) -> None:
    try:
        model = get_fhir_model_class(rtype)
    except ValueError:
        model = None
    if model is None or not issubclass(model, Resource):
        raise InvalidResource(f"resourceType {rtype!r} is not an R4 resource type")
    try:
        model.model_validate(resource)
    except pydantic.ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()[:5]
        )
        raise InvalidResource(f"{rtype} is not valid R4 structure: {problems}") from None


def _has_coding(resource: dict[str, Any], field: str, wanted: dict[str, Any]) -> bool:
    codings = resource.get("meta", {}).get(field, [])
    return any(
        c.get("system") == wanted["system"] and c.get("code") == wanted["code"] for c in codings
    )


def _references(node: Any, keys: list[str], where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The Reference objects at the dotted path `keys`, with the element path of each."""
    if isinstance(node, list):
        for index, item in enumerate(node):
            yield from _references(item, keys, f"{where}[{index}]")
        return
    if not isinstance(node, dict):
        return
    if not keys:
        yield where, node
    elif keys[0] in node:
        yield from _references(node[keys[0]], keys[1:], f"{where}.{keys[0]}")


def _check_reference(
    where: str, reference: dict[str, Any], targets: frozenset[str], fullurls: Mapping[str, str]
) -> None:
    allowed = " | ".join(sorted(targets))
    literal = reference.get("reference")
    if literal is None:
        declared = reference.get("type")
        if declared is not None and declared not in targets:
            raise InvalidResource(f"{where}.type: {declared!r} is not allowed here ({allowed})")
        return
    if literal in fullurls:
        found = fullurls[literal]
    else:
        match = _RELATIVE_OR_ABSOLUTE.match(literal)
        if match is None:
            raise InvalidResource(
                f"{where}.reference: {literal!r} is neither Type/id, an absolute URL to one, "
                "nor the fullUrl of an entry in the same Bundle"
            )
        found = match["type"]
    if found not in targets:
        raise InvalidResource(f"{where}.reference: {literal!r} is a {found}; allowed: {allowed}")
    declared = reference.get("type")
    if declared is not None and declared != found:
        raise InvalidResource(f"{where}.type: {declared!r} but the reference is to a {found}")


def _check_codes(resource: dict[str, Any], rtype: str) -> None:
    if rtype == "Device":
        for index, name in enumerate(resource.get("deviceName", [])):
            if name.get("type") not in DEVICE_NAME_TYPES:
                raise InvalidResource(
                    f"Device.deviceName[{index}].type: {name.get('type')!r} is not an R4 code "
                    f"({', '.join(sorted(DEVICE_NAME_TYPES))})"
                )
    if rtype == "Provenance":
        for index, entity in enumerate(resource.get("entity", [])):
            if entity.get("role") not in PROVENANCE_ENTITY_ROLES:
                raise InvalidResource(
                    f"Provenance.entity[{index}].role: {entity.get('role')!r} is not an R4 code "
                    f"({', '.join(sorted(PROVENANCE_ENTITY_ROLES))})"
                )


def _simulated_texts(resource: dict[str, Any]) -> Iterator[tuple[str, str]]:
    rtype = resource["resourceType"]
    if "conclusion" in resource:
        yield f"{rtype}.conclusion", resource["conclusion"]
    for index, note in enumerate(resource.get("note", [])):
        yield f"{rtype}.note[{index}].text", note.get("text", "")
    for index, form in enumerate(resource.get("presentedForm", [])):
        where = f"{rtype}.presentedForm[{index}]"
        yield f"{where}.title", form.get("title", "")
        if str(form.get("contentType", "")).startswith("text/") and "data" in form:
            try:
                text = base64.b64decode(form["data"], validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise InvalidResource(f"{where}.data: not base64 of UTF-8 text") from None
            yield f"{where}.data", text


def _check_simulated_texts(resource: dict[str, Any], rtype: str) -> None:
    for where, text in _simulated_texts(resource):
        if not text.startswith("SIMULATED"):
            raise InvalidResource(
                f"{where}: {rtype} is tagged SIMULATED, so its text must start with 'SIMULATED'"
            )


def _check_bundle(bundle: dict[str, Any]) -> None:
    kind = bundle.get("type")
    if kind not in BUNDLE_TYPES:
        raise InvalidResource(f"Bundle.type: {kind!r} is not an R4 code")
    entries = bundle.get("entry", [])
    fullurls: dict[str, str] = {}
    for index, entry in enumerate(entries):
        url, resource = entry.get("fullUrl"), entry.get("resource")
        if url is not None and isinstance(resource, dict):
            if url in fullurls:
                raise InvalidResource(f"Bundle.entry[{index}].fullUrl: {url!r} is used twice")
            fullurls[url] = str(resource.get("resourceType"))
    for index, entry in enumerate(entries):
        where = f"Bundle.entry[{index}]"
        if kind in ("transaction", "batch"):
            request = entry.get("request")
            if not isinstance(request, dict):
                raise InvalidResource(f"{where}.request: required in a {kind} Bundle (bdl-3)")
            if request.get("method") not in HTTP_VERBS:
                raise InvalidResource(f"{where}.request.method: {request.get('method')!r}")
        if "resource" in entry:
            try:
                _check(entry["resource"], fullurls)
            except InvalidResource as error:
                raise InvalidResource(f"{where}.resource: {error.description}") from None
