"""Resolve the patient's recent chest ImagingStudies from prefetch, or fetch them (CDS Hooks)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cds_service.fhir import imaging_study
from cds_service.fhir.client import (
    FhirClient,
    FhirError,
    FhirRejected,
    bundle_resources,
    next_link,
)

log = logging.getLogger(__name__)

PREFETCH_KEY = "chestStudies"
# 2.0 token syntax: only root-level primitive context fields may be tokens.
PREFETCH_QUERY = (
    "ImagingStudy?patient={{context.patientId}}&modality=CR,DX&_sort=-started&_count=10"
)
SEARCH_PARAMS = (("modality", "CR,DX"), ("_sort", "-started"), ("_count", "10"))


class DataUnavailable(Exception):
    """Neither prefetch nor an authorised fetch gave us the studies (the 412 case)."""


@dataclass(frozen=True)
class FhirAccess:
    """How the service may reach the caller's FHIR server, if at all."""

    fhir_server: str
    access_token: str


ClientFactory = Callable[[FhirAccess], FhirClient]


@dataclass(frozen=True)
class StudyList:
    """The studies found, and whether the list is known to be complete (all pages read)."""

    studies: list[dict[str, Any]]
    complete: bool = True


def _is_operation_outcome(value: Any) -> bool:
    return isinstance(value, dict) and value.get("resourceType") == "OperationOutcome"


def _collect(first: dict[str, Any], client: FhirClient | None, max_pages: int) -> StudyList:
    """Studies of a searchset Bundle and of its next pages, within the same FHIR base."""
    studies = bundle_resources(first, "ImagingStudy")
    page = first
    for _ in range(max_pages - 1):
        url = next_link(page)
        if url is None:
            return StudyList(studies)
        if client is None or not client.owns(url):
            log.warning("a next link cannot be followed (no access, or outside the FHIR base)")
            return StudyList(studies, complete=False)
        try:
            page = client.get_json(url)
        except FhirError as exc:
            log.warning("could not follow search paging: %s", exc)
            return StudyList(studies, complete=False)
        studies.extend(bundle_resources(page, "ImagingStudy"))
    return StudyList(studies, complete=next_link(page) is None)


def _from_prefetch(value: Any, client: FhirClient | None, max_pages: int) -> StudyList | None:
    """Studies from a prefetched value; None when it is unusable and we must fetch instead."""
    if value is None:
        return StudyList([])  # null: the client ran the query and found nothing.
    if not isinstance(value, dict) or _is_operation_outcome(value):
        return None
    if value.get("resourceType") == "ImagingStudy":
        return StudyList([value])
    if value.get("resourceType") != "Bundle":
        return None
    return _collect(value, client, max_pages)


def _search(client: FhirClient, patient_id: str, lookback_days: int, max_pages: int) -> StudyList:
    since = (datetime.now(UTC) - timedelta(days=lookback_days)).date().isoformat()
    params = [("patient", patient_id), *SEARCH_PARAMS, ("started", f"ge{since}")]
    try:
        first = client.get_json("ImagingStudy", params)
    except FhirRejected:
        # A server that refuses _sort, modality or started: ask for the patient's studies only
        # and filter them here (recent_chest_studies does).
        log.info("FHIR server refused the study search parameters; retrying with patient only")
        first = client.get_json("ImagingStudy", [("patient", patient_id), ("_count", "50")])
    return _collect(first, client, max_pages)


def resolve_studies(
    prefetch: Any,
    patient_id: str,
    access: FhirAccess | None,
    client_factory: ClientFactory,
    *,
    max_pages: int,
    lookback_days: int,
) -> StudyList:
    """ImagingStudies for `patient_id` from prefetch, else fetched; raises DataUnavailable."""
    client = client_factory(access) if access is not None else None
    value = prefetch.get(PREFETCH_KEY, ...) if isinstance(prefetch, dict) else ...
    if value is not ...:
        found = _from_prefetch(value, client, max_pages)
        if found is not None:
            return found
        log.info("prefetch %s unusable (OperationOutcome or wrong type); fetching", PREFETCH_KEY)
    if client is None:
        raise DataUnavailable("no usable prefetch and no authorised FHIR access")
    try:
        return _search(client, patient_id, lookback_days, max_pages)
    except FhirError as exc:
        raise DataUnavailable(str(exc)) from exc


def recent_chest_studies(
    studies: list[dict[str, Any]],
    patient_id: str,
    *,
    lookback_days: int,
    limit: int,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """The patient's own radiograph studies within the look-back window, newest first."""
    now = now or datetime.now(UTC)
    oldest = now - timedelta(days=lookback_days)
    seen: set[str] = set()
    kept = []
    for study in studies:
        # A loose client may prefetch studies of another patient: never show those.
        if imaging_study.subject_patient_id(study) != patient_id:
            continue
        if not imaging_study.is_radiograph_candidate(study):
            continue
        when = imaging_study.started(study)
        if when is not None and when < oldest:
            continue
        key = imaging_study.study_uid(study) or str(study.get("id"))
        if key in seen:
            continue
        seen.add(key)
        kept.append(study)
    epoch = datetime.min.replace(tzinfo=UTC)
    kept.sort(key=lambda s: imaging_study.started(s) or epoch, reverse=True)
    return kept[:limit]
