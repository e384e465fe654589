"""Load the frontal chest image of an ImagingStudy through its DICOMweb Endpoints.

The ImagingStudy is re-read from the FHIR server the job came from (when the service holds a
Backend Services registration there); series endpoints override the study's. An Endpoint
address (or a Media attachment's url) is followed only when it lies under that EHR's FHIR base
path, under an image server listed for that EHR, or under a globally configured image server
(CXR_CDS_IMAGE_SERVERS); anything else is refused without a request, so a writable FHIR server
cannot make us fetch internal addresses. The EHR's token goes only under its own FHIR base path
(not the whole origin, which may host other tenants) and to its own image servers. Each
candidate instance's header is checked (selection.py), read alone through WADO-RS metadata
where the server offers it, so only the best instance is downloaded and decoded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from pydicom.dataset import Dataset

from cds_service.fhir import imaging_study
from cds_service.fhir.backend_services import BackendServicesClients
from cds_service.fhir.client import FhirClient, FhirError, bundle_resources
from cds_service.fhir.shapes import as_dict, as_str, codings, dicts
from cds_service.imaging import decode, selection
from cds_service.imaging.errors import (
    ImageFetchError,
    ImagingError,
    NoAccess,
    NotAnalysable,
    UnsupportedImage,
)
from cds_service.imaging.files import DecodedImage, decode_dicom_bytes
from cds_service.imaging.limits import DEFAULT_LIMITS, ImageLimits
from cds_service.imaging.retrieval import (
    ImageFetcher,
    attachment_bytes,
    attachment_url,
    fetch_wado_instance,
    fetch_wado_metadata,
    url_under,
)

log = logging.getLogger(__name__)

WADO_RS = "dicom-wado-rs"
MAX_INSTANCES = 16
REFUSED_ENDPOINT = (
    "the study's DICOMweb endpoint is neither on the EHR nor a configured image server"
)
REFUSED_ATTACHMENT = (
    "the study's DICOM attachment is neither on the EHR nor a configured image server"
)


@dataclass(frozen=True)
class EhrAccess:
    """Read access to one EHR's FHIR server (a Backend Services token, or none), and the
    image servers listed for that EHR (followed, and sent its token)."""

    fhir_base: str
    token: str | None
    timeout: tuple[float, float] = (2.0, 10.0)
    image_servers: tuple[str, ...] = ()

    def client(self) -> FhirClient:
        return FhirClient(self.fhir_base, self.token, timeout=self.timeout)

    def image_bases(self) -> tuple[str, ...]:
        """Where this EHR's image addresses may point and its token may go: under its FHIR
        base path (another path on the same origin may be another tenant) and its image
        servers."""
        return (self.fhir_base, *self.image_servers)


# The EHRs we hold credentials for, by FHIR base; None when we hold none for that server.
FhirAccess = Callable[[str], EhrAccess | None]


@dataclass(frozen=True)
class Source:
    """One instance: how to download it, and (WADO-RS) how to read its header alone."""

    data: Callable[[], bytes]
    header: Callable[[], Dataset] | None = None


@dataclass(frozen=True)
class Candidate:
    address: str
    series_uid: str
    instance_uid: str


def _reference_id(reference: str, resource_type: str) -> str | None:
    if reference.startswith("#"):
        return reference
    if f"{resource_type}/" not in reference:
        return None
    return reference.rsplit(f"{resource_type}/", 1)[1].split("/", 1)[0] or None


def endpoint_address(endpoint: dict[str, Any]) -> str | None:
    """The WADO-RS base of an active `dicom-wado-rs` Endpoint (None for any other)."""
    if endpoint.get("resourceType") != "Endpoint" or endpoint.get("status", "active") != "active":
        return None
    kinds = {c.get("code") for c in codings(endpoint.get("connectionType"))}
    if isinstance(endpoint.get("connectionType"), dict):
        kinds.add(endpoint["connectionType"].get("code"))
    address = as_str(endpoint.get("address"))
    return address.rstrip("/") if WADO_RS in kinds and address else None


class StudyImages:
    """Finds, fetches and decodes the frontal chest radiograph of one ImagingStudy."""

    def __init__(
        self,
        fetcher: ImageFetcher,
        fhir_access: FhirAccess,
        *,
        image_servers: Sequence[str] = (),
    ) -> None:
        self.fetcher = fetcher
        self._fhir_access = fhir_access
        self._image_servers = tuple(image_servers)  # any EHR's studies may point here

    def _followed(self, access: EhrAccess | None) -> tuple[str, ...]:
        """The bases an image address must lie under to be fetched at all."""
        own = access.image_bases() if access is not None else ()
        return (*self._image_servers, *own)

    def load(self, study: dict[str, Any], fhir_server: str | None) -> DecodedImage:
        """The best frontal chest image. NotAnalysable / UnsupportedImage say why there is
        none; ImageFetchError means "try again later"."""
        return decode_dicom_bytes(self.best_dicom(study, fhir_server), limits=self.fetcher.limits)

    def best_dicom(self, study: dict[str, Any], fhir_server: str | None) -> bytes:
        """The DICOM bytes of the best frontal chest instance, as `load` chooses it (same
        errors), not decoded: what the viewer hands to a job it queues."""
        access = self._fhir_access(fhir_server) if fhir_server else None
        client = access.client() if access is not None else None
        vetted = self._vetted_study(study, client)
        token = access.token if access is not None else None
        token_bases = access.image_bases() if access is not None else ()
        # Only a study re-read from the EHR itself may send us to that EHR's own servers.
        followed = self._followed(access if vetted is not study else None)
        candidates, reasons = self._candidates(vetted, client, followed)
        uid = imaging_study.study_uid(vetted) or ""
        sources = [
            Source(
                partial(fetch_wado_instance, self.fetcher, *where, token, token_bases),
                partial(fetch_wado_metadata, self.fetcher, *where, token, token_bases),
            )
            for where in ((c.address, uid, c.series_uid, c.instance_uid) for c in candidates)
        ]
        if not sources and access is not None and client is not None:
            sources = self._media_sources(vetted, client, access, reasons)
        if not sources:
            if access is None and not reasons:
                # Nothing was looked at: without access to the EHR its Endpoints and Media
                # are out of reach, which says nothing about the study.
                raise NoAccess(fhir_server)
            raise NotAnalysable(
                "; ".join(reasons) or "no image found (no DICOMweb endpoint or DICOM Media)"
            )
        return self._best_bytes(sources[:MAX_INSTANCES], reasons)

    def _best_bytes(self, sources: Sequence[Source], reasons: list[str]) -> bytes:
        """The bytes of the best analysable instance. Headers read alone (WADO-RS metadata)
        decide which instances to download, best first; instances without one are
        downloaded to be judged."""
        ranked, unjudged = self._screen_headers(sources, reasons)
        transient: list[ImageFetchError] = []
        best: tuple[selection.Selection, bytes] | None = None
        for source in ranked:  # the first one whose own header agrees wins
            best = self._download(source, reasons, transient)
            if best is not None:
                break
        for source in unjudged:
            got = self._download(source, reasons, transient)
            if got is not None and (best is None or got[0].rank > best[0].rank):
                best = got
        if best is None:
            if transient:  # the unreached instance may be the frontal one: try again later
                raise transient[0]
            raise NotAnalysable("; ".join(dict.fromkeys(reasons)))
        return best[1]

    @staticmethod
    def _screen_headers(
        sources: Sequence[Source], reasons: list[str]
    ) -> tuple[list[Source], list[Source]]:
        """(analysable by their header alone, best first; those with no readable header)."""
        judged: list[tuple[selection.Selection, Source]] = []
        unjudged: list[Source] = []
        for source in sources:
            try:
                chosen = selection.select_dataset(source.header()) if source.header else None
            except ImagingError:  # no metadata service, or a bad answer: download to judge
                chosen = None
            if chosen is None:
                unjudged.append(source)
            elif chosen.analysable:
                judged.append((chosen, source))
            else:
                reasons.append(chosen.reason)
        judged.sort(key=lambda item: item[0].rank, reverse=True)
        return [source for _, source in judged], unjudged

    def _download(
        self, source: Source, reasons: list[str], transient: list[ImageFetchError]
    ) -> tuple[selection.Selection, bytes] | None:
        """The instance and its selection when it is analysable; else the reason is noted."""
        try:
            data = source.data()
            chosen = selection.select_dataset(decode.read_dataset(data, self.fetcher.limits))
        except UnsupportedImage as exc:
            reasons.append(unreadable_reason(exc))
            return None
        except NotAnalysable as exc:  # e.g. this instance is gone (404 / 410)
            reasons.append(exc.reason)
            return None
        except ImageFetchError as exc:  # another instance may still be readable
            transient.append(exc)
            return None
        if not chosen.analysable:
            reasons.append(chosen.reason)
            return None
        return chosen, data

    def _media_sources(
        self, study: dict[str, Any], client: FhirClient, access: EhrAccess, reasons: list[str]
    ) -> list[Source]:
        """DICOM attachments of the EHR's Media that are `partOf` this ImagingStudy (those
        whose url lies elsewhere are refused, with a reason)."""
        study_id = as_str(study.get("id"))
        patient = imaging_study.subject_patient_id(study)
        if study_id is None or patient is None:
            return []
        try:
            bundle = client.get_json("Media", params=[("subject", f"Patient/{patient}")])
        except FhirError as exc:
            raise ImageFetchError(
                f"cannot search the study's Media ({type(exc).__name__})"
            ) from exc
        sources: list[Source] = []
        for media in bundle_resources(bundle, "Media"):
            parts = {as_str(r.get("reference")) for r in dicts(media.get("partOf"))}
            content = as_dict(media.get("content"))
            if f"ImagingStudy/{study_id}" not in parts or not content:
                continue
            url = as_str(content.get("url"))
            if (
                not content.get("data")
                and url
                and not self._under_any(
                    attachment_url(url, access.fhir_base), self._followed(access)
                )
            ):
                reasons.append(REFUSED_ATTACHMENT)
            else:
                sources.append(
                    Source(
                        partial(
                            attachment_bytes, self.fetcher, content, access.fhir_base, access.token
                        )
                    )
                )
        return sources

    def _vetted_study(self, study: dict[str, Any], client: FhirClient | None) -> dict[str, Any]:
        """The EHR's own copy of the study when we can read it; the Study UID must match."""
        study_id = as_str(study.get("id"))
        if client is None or study_id is None:
            return study
        try:
            fresh = client.get_json(f"ImagingStudy/{study_id}")
        except FhirError as exc:
            raise ImageFetchError(
                f"cannot re-read the ImagingStudy ({type(exc).__name__})"
            ) from exc
        if imaging_study.study_uid(fresh) != imaging_study.study_uid(study):
            raise NotAnalysable("the EHR's ImagingStudy does not match the queued study")
        return fresh

    def _endpoint(
        self, reference: dict[str, Any], study: dict[str, Any], client: FhirClient | None
    ) -> str | None:
        ref = as_str(reference.get("reference")) or ""
        ident = _reference_id(ref, "Endpoint")
        if ident is None:
            return None
        if ident.startswith("#"):
            contained = [r for r in dicts(study.get("contained")) if r.get("id") == ident[1:]]
            return endpoint_address(contained[0]) if contained else None
        if client is None:
            return None
        try:
            return endpoint_address(client.get_json(f"Endpoint/{ident}"))
        except FhirError as exc:
            raise ImageFetchError(
                f"cannot read the study's Endpoint ({type(exc).__name__})"
            ) from exc

    @staticmethod
    def _under_any(address: str, bases: Sequence[str]) -> bool:
        return any(url_under(address, base) for base in bases)

    def _candidates(
        self, study: dict[str, Any], client: FhirClient | None, followed: Sequence[str]
    ) -> tuple[list[Candidate], list[str]]:
        study_endpoints = [
            a for a in (self._endpoint(r, study, client) for r in dicts(study.get("endpoint"))) if a
        ]
        candidates: list[Candidate] = []
        reasons: list[str] = []
        for series in dicts(study.get("series")):
            modality = (as_str(as_dict(series.get("modality")).get("code")) or "").upper()
            if modality and modality not in selection.RADIOGRAPH_MODALITIES:
                reasons.append(f"modality {modality}")
                continue
            own = [
                a
                for a in (self._endpoint(r, study, client) for r in dicts(series.get("endpoint")))
                if a
            ]
            stated = own or study_endpoints
            addresses = [a for a in stated if self._under_any(a, followed)]
            if stated and not addresses:
                reasons.append(REFUSED_ENDPOINT)
            series_uid = as_str(series.get("uid"))
            if not addresses or not series_uid:
                continue
            for instance in dicts(series.get("instance")):
                instance_uid = as_str(instance.get("uid"))
                if instance_uid:
                    candidates.append(Candidate(addresses[0], series_uid, instance_uid))
        return candidates, reasons


def unreadable_reason(exc: UnsupportedImage) -> str:
    return f"image cannot be read: {exc.description}"


def backend_services_access(clients: BackendServicesClients) -> FhirAccess:
    """FhirAccess through SMART Backend Services for the EHRs the service is registered with."""

    def access(fhir_server: str) -> EhrAccess | None:
        client = clients.client(fhir_server)
        if client is None:
            return None
        try:
            token = client.access_token()
        except FhirError as exc:
            raise ImageFetchError(f"no access token from the EHR ({type(exc).__name__})") from exc
        return EhrAccess(client.ehr.fhir_base, token, image_servers=client.ehr.image_servers)

    return access


def study_images_for(
    access: BackendServicesClients,
    image_servers: Sequence[str] = (),
    limits: ImageLimits = DEFAULT_LIMITS,
) -> StudyImages:
    """The loader the service uses: its EHR registrations (from settings.ehr_clients, each
    with the image servers that may receive its token), the image servers any study may point to
    without a token (CXR_CDS_IMAGE_SERVERS) and the image limits."""
    fetcher = ImageFetcher(limits=limits)
    return StudyImages(fetcher, backend_services_access(access), image_servers=tuple(image_servers))
