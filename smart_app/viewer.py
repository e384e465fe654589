"""What the viewer shows, gathered with the user's token: the patient, their chest studies
with the service's AI status, one study's image (DICOM through our pixel pipeline), and the
AI report from the service's result store. No Flask here."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from cds_service.config import Settings
from cds_service.fhir import imaging_study
from cds_service.fhir.client import FhirAccessDenied, FhirClient, FhirError
from cds_service.fhir.shapes import as_dict, as_str, dicts
from cds_service.imaging.errors import ImageFetchError, ImagingError, NoAccess, NotAnalysable
from cds_service.imaging.files import decode_image_bytes
from cds_service.imaging.limits import DEFAULT_LIMITS, ImageLimits
from cds_service.imaging.render import png_bytes
from cds_service.imaging.retrieval import ImageFetcher, fetch_binary
from cds_service.imaging.study import EhrAccess, StudyImages
from cds_service.results import ModelInfo
from cds_service.storage.ports import Storage, StoredResult, StudyRef

FILING_TYPES = ("DiagnosticReport", "Observation", "Device", "Provenance")
# What the user reads when an image server failed: never the remote server's answer.
IMAGE_UNREADABLE = "the study's image could not be fetched from the image server; try again later"
# A queued job the worker cannot run without access of its own to the EHR's images; a request
# from the viewer hands it the film the clinician's token reads.
WAITING_FOR_ACCESS = "waiting for access to the images"


class ViewerError(Exception):
    """Something the viewer cannot show; the text is safe for the user to read."""


@dataclass(frozen=True)
class PatientBanner:
    name: str
    gender: str
    birth_date: str
    identifier: str


@dataclass(frozen=True)
class StudyRow:
    id: str
    description: str
    started: str
    modality: str
    status: str  # analysed / in progress / waiting for access... / not analysed: <reason> / ...yet


def patient_banner(patient: dict[str, Any]) -> PatientBanner:
    name = as_dict((patient.get("name") or [{}])[0])
    given = " ".join(str(g) for g in name.get("given") or [])
    identifier = as_dict((patient.get("identifier") or [{}])[0])
    return PatientBanner(
        name=" ".join(p for p in (str(name.get("family") or "").upper(), given) if p)
        or "(no name)",
        gender=as_str(patient.get("gender")) or "unknown",
        birth_date=as_str(patient.get("birthDate")) or "unknown",
        identifier=as_str(identifier.get("value")) or "",
    )


def ai_status(storage: Storage, ref: StudyRef, model: ModelInfo) -> str:
    stored = storage.results.get_result(ref, model)
    if stored is not None and stored.patient_id not in (None, ref.patient_id):
        stored = None  # analysed for another patient under the same Study UID: never shown
    if stored is not None:
        if stored.result.status == "completed":
            return "analysed"
        return f"not analysed: {stored.result.reason or stored.result.status}"
    state = storage.jobs.job_state(ref, model)
    waiting = storage.jobs.waiting_reason(ref, model) if state == "queued" else None
    if waiting and NoAccess.explains(waiting):
        return WAITING_FOR_ACCESS
    if state:
        return "in progress"
    return "not analysed yet"


def study_ref(source: str, study: dict[str, Any]) -> StudyRef | None:
    uid = imaging_study.study_uid(study)
    if uid is None:
        return None
    return StudyRef(source, uid, imaging_study.subject_patient_id(study))


def study_rows(
    fhir: FhirClient, patient: str, source: str, storage: Storage, model: ModelInfo
) -> list[StudyRow]:
    bundle = fhir.get_json("ImagingStudy", [("patient", patient), ("_count", "50")])
    rows = []
    for entry in dicts(bundle.get("entry")):
        study = as_dict(entry.get("resource"))
        study_id = as_str(study.get("id"))
        if study_id is None or not imaging_study.is_radiograph_candidate(study):
            continue
        ref = study_ref(source, study)
        rows.append(
            StudyRow(
                id=study_id,
                description=as_str(study.get("description")) or "Imaging study",
                started=as_str(study.get("started")) or "date unknown",
                modality="/".join(sorted(imaging_study.modalities(study))),
                status=ai_status(storage, ref, model) if ref else "not analysed: no Study UID",
            )
        )
    return sorted(rows, key=lambda r: r.started, reverse=True)


def read_study(fhir: FhirClient, study_id: str, patient: str | None) -> dict[str, Any]:
    try:
        study = fhir.get_json(f"ImagingStudy/{study_id}")
    except FhirAccessDenied:
        raise  # the caller may refresh the token and try again
    except FhirError:
        raise ViewerError("the EHR did not return this imaging study") from None
    if patient is not None and imaging_study.subject_patient_id(study) != patient:
        raise ViewerError("this imaging study belongs to another patient")
    return study


def _dicom_binary_url(fhir: FhirClient, study: dict[str, Any]) -> str | None:
    """The Binary holding the study's DICOM, found through Media.partOf (how the EHR links
    its DICOM attachments to the ImagingStudy)."""
    patient = imaging_study.subject_patient_id(study)
    study_ref_text = f"ImagingStudy/{study.get('id')}"
    if patient is None:
        return None
    bundle = fhir.get_json("Media", [("patient", patient), ("_count", "200")])
    for entry in dicts(bundle.get("entry")):
        media = as_dict(entry.get("resource"))
        part_of = [as_str(as_dict(p).get("reference")) for p in media.get("partOf") or []]
        content = as_dict(media.get("content"))
        url = as_str(content.get("url"))
        if study_ref_text in part_of and url and content.get("contentType") == "application/dicom":
            return url
    return None


def fetch_dicom(fhir: FhirClient, access_token: str, study: dict[str, Any]) -> bytes:
    """The study's DICOM bytes, read with the user's token (Binary, Accept application/dicom)
    through the imaging pipeline's bounded fetcher (size cap, same-host redirects only)."""
    url = _dicom_binary_url(fhir, study)
    if url is None:
        raise ViewerError("the EHR has no DICOM image for this study")
    full = url if "://" in url else f"{fhir.base_url}/{url.lstrip('/')}"
    if not fhir.owns(full):
        raise ViewerError("the study's image lies outside the EHR's FHIR server")
    try:
        return fetch_binary(ImageFetcher(), full, fhir.base_url, access_token)
    except ImageFetchError as exc:
        if "(401)" in str(exc):
            raise FhirAccessDenied("FHIR server answered 401") from None
        raise ViewerError(IMAGE_UNREADABLE) from None
    except ImagingError as exc:
        raise ViewerError(f"the EHR's image could not be read: {exc}") from None


def render_png(dicom: bytes) -> bytes:
    """The DICOM as PNG through the service's own pixel pipeline (no chest check: the
    clinician sees whatever film the EHR holds)."""
    try:
        decoded = decode_image_bytes(dicom, check_frontal_chest=False)
        return png_bytes(decoded.pixels)
    except ImagingError as exc:
        raise ViewerError(f"the image cannot be shown: {exc}") from None


def image_servers_for(settings: Settings, fhir_base: str) -> tuple[str, ...]:
    """The global image servers (CXR_CDS_IMAGE_SERVERS) the viewer may follow for a launch
    from `fhir_base`: all of them for an EHR that is a CDS client (a trusted issuer's FHIR
    server), none for one that only launches the app (CXR_CDS_APP_FHIR_SERVERS, e.g. a public
    launcher anyone can write to, whose Endpoints could otherwise name the internal PACS)."""
    if any(issuer.allows_fhir_server(fhir_base) for issuer in settings.trusted_issuers):
        return settings.image_servers
    return ()


def study_png(
    fhir: FhirClient,
    access_token: str,
    study: dict[str, Any],
    image_servers: Sequence[str] = (),
) -> bytes:
    """The study's film as PNG: the frontal chest image the model would analyse, found as the
    service does (the study's WADO-RS endpoints, else its DICOM Media), with the user's token;
    for a study with no analysable image, its first DICOM Binary as it is. Endpoints are
    followed only under the EHR's FHIR base path (which alone gets the user's token) or under
    `image_servers` (CXR_CDS_IMAGE_SERVERS, which never get the user's token): an EHR anyone
    can write to cannot make us fetch internal addresses."""
    base = fhir.base_url
    images = _user_images(base, access_token, image_servers, DEFAULT_LIMITS)
    try:
        with _viewer_errors("shown"):
            return png_bytes(images.load(study, base).pixels)
    except NotAnalysable:
        return render_png(fetch_dicom(fhir, access_token, study))


def analysable_dicom(
    fhir: FhirClient,
    access_token: str,
    study: dict[str, Any],
    image_servers: Sequence[str] = (),
    limits: ImageLimits = DEFAULT_LIMITS,
) -> bytes:
    """The DICOM bytes of the frontal chest image the model would analyse, found and fetched
    as `study_png` finds it (same addresses followed, the user's token only under the EHR's
    FHIR base), for a job to carry: then the worker needs no access of its own to the EHR.
    NotAnalysable (with the reason) when the study has no such image."""
    base = fhir.base_url
    with _viewer_errors("read"):
        return _user_images(base, access_token, image_servers, limits).best_dicom(study, base)


@contextmanager
def _viewer_errors(verb: str) -> Iterator[None]:
    """Imaging failures as the viewer reports them; NotAnalysable passes through (the
    caller decides: show the first DICOM as it is, or say why nothing can be analysed)."""
    try:
        yield
    except NotAnalysable:
        raise
    except ImageFetchError as exc:
        if "(401)" in str(exc):
            raise FhirAccessDenied("FHIR server answered 401") from None
        raise ViewerError(IMAGE_UNREADABLE) from None
    except ImagingError as exc:
        raise ViewerError(f"the image cannot be {verb}: {exc}") from None


def _user_images(
    base: str, access_token: str, image_servers: Sequence[str], limits: ImageLimits
) -> StudyImages:
    """The service's image loader with the user's token, for the EHR at `base` alone."""
    return StudyImages(
        ImageFetcher(limits=limits),
        lambda server: EhrAccess(base, access_token) if server.rstrip("/") == base else None,
        image_servers=image_servers,
    )


def stored_result(
    storage: Storage, source: str, study: dict[str, Any], model: ModelInfo
) -> StoredResult | None:
    ref = study_ref(source, study)
    stored = storage.results.get_result(ref, model) if ref else None
    if stored is not None and stored.patient_id not in (None, ref.patient_id if ref else None):
        return None  # analysed for another patient under the same Study UID: never shown
    return stored


def scope_allows(scope: str, resource_type: str, letter: str) -> bool:
    """True when a SMART v1/v2 scope string lets the user do `letter` (c/r/u/d/s) on a type."""
    v1 = {"read": "rs", "write": "cud", "*": "cruds"}
    for item in scope.split():
        context, _, rest = item.partition("/")
        rtype, _, permissions = rest.partition(".")
        if context not in ("patient", "user") or rtype not in ("*", resource_type):
            continue
        if letter in v1.get(permissions, permissions):
            return True
    return False


def filing_refusal(scope: str) -> str | None:
    """Why the user's token cannot file the AI report, or None when it can."""
    missing = [t for t in FILING_TYPES if not scope_allows(scope, t, "c")]
    if missing:
        return (
            "Your EHR session does not allow creating "
            + ", ".join(missing)
            + " resources (scopes granted: "
            + (scope or "none")
            + "), so the AI report cannot be filed from here."
        )
    return None
