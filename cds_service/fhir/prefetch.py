"""Resolve the patient's recent chest ImagingStudies from prefetch, or fetch them (CDS Hooks)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cds_service.fhir import imaging_study
from cds_service.fhir.client import FhirClient, FhirError, bundle_resources

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


def _is_operation_outcome(value: Any) -> bool:
    return isinstance(value, dict) and value.get("resourceType") == "OperationOutcome"


def _studies_from_prefetch(
    value: Any, client: FhirClient | None, max_pages: int
) -> list[dict[str, Any]] | None:
    """Studies from a prefetched value; None when it is unusable and we must fetch instead."""
    if value is None:
        return []  # null: the client ran the query and found nothing.
    if not isinstance(value, dict) or _is_operation_outcome(value):
        return None
    if value.get("resourceType") == "ImagingStudy":
        return [value]
    if value.get("resourceType") != "Bundle":
        return None
    studies = bundle_resources(value, "ImagingStudy")
    if client is not None:
        try:
            for page in client.follow_next(value, max_pages - 1):
                studies.extend(bundle_resources(page, "ImagingStudy"))
        except FhirError as exc:
            # Keep what was prefetched; the first page is the most recent studies.
            log.warning("could not follow prefetch paging: %s", exc)
    return studies


def resolve_studies(
    prefetch: Any,
    patient_id: str,
    access: FhirAccess | None,
    client_factory: ClientFactory,
    *,
    max_pages: int,
) -> list[dict[str, Any]]:
    """ImagingStudies for `patient_id` from prefetch, else fetched; raises DataUnavailable."""
    client = client_factory(access) if access is not None else None
    value = prefetch.get(PREFETCH_KEY, ...) if isinstance(prefetch, dict) else ...
    if value is not ...:
        studies = _studies_from_prefetch(value, client, max_pages)
        if studies is not None:
            return studies
        log.info("prefetch %s unusable (OperationOutcome or wrong type); fetching", PREFETCH_KEY)
    if client is None:
        raise DataUnavailable("no usable prefetch and no authorised FHIR access")
    params = (("patient", patient_id), *SEARCH_PARAMS)
    try:
        studies = []
        for page in client.search_pages("ImagingStudy", params, max_pages):
            studies.extend(bundle_resources(page, "ImagingStudy"))
    except FhirError as exc:
        raise DataUnavailable(str(exc)) from exc
    return studies


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
