"""Film arrival: every trigger (FHIR Subscription notification, the polling watcher, the REST
API, the CLI, a hook's first miss, the viewer) ends in `enqueue_arrival`, one idempotent
enqueue keyed by data source + Study UID + model. A study that already has a result or a
live job is not queued again, so a notification that arrives twice, a watcher that overlaps
a Subscription, or a retried API call never analyses a film twice.

`SourceReader` reads studies from a data source with the service's own registered access
(SMART Backend Services), never with a caller's token.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from typing import Any, Literal

from cds_service.config import EhrClient
from cds_service.fhir import imaging_study
from cds_service.fhir.backend_services import BackendServicesClient, BackendServicesClients
from cds_service.fhir.client import FhirClient, bundle_resources, next_link
from cds_service.fhir.shapes import as_dict, as_str
from cds_service.imaging.limits import DEFAULT_MAX_BYTES
from cds_service.results import ModelInfo
from cds_service.security.secret_compare import same_secret
from cds_service.sources import canonical_fhir_base
from cds_service.storage.ports import QueueFull, Storage, StudyRef

log = logging.getLogger(__name__)

Outcome = Literal["queued", "known", "not-a-chest-radiograph", "no-study-uid", "queue-full"]
SEARCH_PAGE_SIZE = 50
# Where EHRs post FHIR Subscription notifications (the web layer serves it).
NOTIFICATIONS_PATH = "/fhir-notifications"


@dataclass(frozen=True)
class Arrival:
    """What became of one arriving study."""

    outcome: Outcome
    ref: StudyRef | None = None

    @property
    def accepted(self) -> bool:
        """Queued now or known already: either way the study is (being) analysed."""
        return self.outcome in ("queued", "known")


def enqueue_arrival(
    storage: Storage,
    model: ModelInfo,
    study: dict[str, Any],
    fhir_server: str | None,
    *,
    source: str | None = None,
    dicom: bytes | None = None,
    max_dicom_bytes: int = DEFAULT_MAX_BYTES,
    again: bool = False,
) -> Arrival:
    """Queue the study for analysis unless it is known already. ``fhir_server`` is where the
    worker reads it (None: nowhere, a caller that named no FHIR server); ``source`` is the
    data source that owns the result (default: that FHIR server). ``dicom``: the study's
    image, which the job carries (the viewer read it with the clinician's token), so the
    worker needs no access to the EHR; a live job without one gets it. ``again``: a
    clinician's request, which analyses again a study whose result is not "completed" (a
    completed one never is: its report may be filed). Raises ImageTooLarge when ``dicom``
    exceeds ``max_dicom_bytes``."""
    uid = imaging_study.study_uid(study)
    if uid is None:
        return Arrival("no-study-uid")
    if not imaging_study.is_radiograph_candidate(study):
        return Arrival("not-a-chest-radiograph")
    owner = source if source is not None else fhir_server
    if owner is None:
        raise ValueError("an arrival needs a FHIR server or a data source")
    ref = StudyRef(owner, uid, imaging_study.subject_patient_id(study))
    stored = storage.results.get_result(ref, model)
    if stored is not None and not (again and stored.result.status != "completed"):
        return Arrival("known", ref)
    server = canonical_fhir_base(fhir_server) if fhir_server else None
    try:
        queued = storage.jobs.enqueue(
            ref, model, study, server, dicom, max_dicom_bytes=max_dicom_bytes
        )
    except QueueFull:
        log.warning("analysis queue full; an arriving study was not queued")
        return Arrival("queue-full", ref)
    return Arrival("queued" if queued else "known", ref)


class NoSourceAccess(Exception):
    """The service has no registered access to this data source."""

    def __init__(self, fhir_base: str) -> None:
        self.fhir_base = fhir_base
        super().__init__(
            f"no access to {fhir_base}: register it in CXR_CDS_EHR_CLIENTS (SMART Backend "
            "Services client) to analyse its studies"
        )


@dataclass(frozen=True)
class Changes:
    """Studies changed since a cursor, and the cursor to use next time."""

    studies: list[dict[str, Any]]
    cursor: str | None
    complete: bool  # False when the page limit stopped the walk (more remain)


class SourceReader:
    """Reads ImagingStudy resources from the data sources this service is registered with."""

    def __init__(self, access: BackendServicesClients) -> None:
        self.access = access

    def registered(self, fhir_base: str) -> bool:
        return self.access.registration(fhir_base) is not None

    def client(self, fhir_base: str) -> FhirClient:
        """A FHIR client with a system token (raises NoSourceAccess, FhirUnavailable)."""
        backend = self.access.client(fhir_base)
        if backend is None:
            raise NoSourceAccess(canonical_fhir_base(fhir_base))
        return FhirClient(backend.ehr.fhir_base, backend.access_token())

    def read_study(self, fhir_base: str, reference: str) -> dict[str, Any]:
        """``ImagingStudy/<id>`` or an absolute URL under the base (never another server)."""
        study_id = study_id_in(fhir_base, reference)
        if study_id is None:
            raise ValueError("not an ImagingStudy of this FHIR server")
        study = self.client(fhir_base).get_json(f"ImagingStudy/{study_id}")
        if study.get("resourceType") != "ImagingStudy":
            raise ValueError("the FHIR server did not answer with an ImagingStudy")
        return study

    def changed_since(self, fhir_base: str, cursor: str | None, max_pages: int) -> Changes:
        """ImagingStudy resources updated at or after ``cursor`` (meta.lastUpdated), oldest
        first, at most ``max_pages`` pages. 'At or after' re-reads the cursor's own instant
        (several studies may share it); the idempotent enqueue makes that harmless."""
        client = self.client(fhir_base)
        params = [("_sort", "_lastUpdated"), ("_count", str(SEARCH_PAGE_SIZE))]
        if cursor:
            params.append(("_lastUpdated", f"ge{cursor}"))
        page: dict[str, Any] | None = client.get_json("ImagingStudy", params)
        studies: list[dict[str, Any]] = []
        newest = cursor
        pages = 0
        while page is not None:
            pages += 1
            for study in bundle_resources(page, "ImagingStudy"):
                studies.append(study)
                updated = as_str(as_dict(study.get("meta")).get("lastUpdated"))
                if updated and (newest is None or updated > newest):
                    newest = updated
            link = next_link(page)
            if link is None:
                return Changes(studies, newest, complete=True)
            if pages >= max_pages or not client.owns(link):
                break
            page = client.get_json(link)
        return Changes(studies, newest, complete=False)


def study_id_in(fhir_base: str, reference: str) -> str | None:
    """The id of an ImagingStudy reference, relative or absolute under ``fhir_base``."""
    text = reference.strip()
    if "://" in text:
        base = canonical_fhir_base(fhir_base)
        head, sep, rest = text.rpartition("/ImagingStudy/")
        if not sep or canonical_fhir_base(head) != base:
            return None
        text = f"ImagingStudy/{rest}"
    kind, sep, rest = text.partition("/")
    study_id = rest.split("/_history/")[0]
    if kind != "ImagingStudy" or not sep or not imaging_study_id_ok(study_id):
        return None
    return study_id


def imaging_study_id_ok(value: str) -> bool:
    """A FHIR logical id: 1-64 of A-Z a-z 0-9 - ."""
    return re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", value) is not None


@dataclass(frozen=True)
class Poll:
    arrivals: list[Arrival]
    complete: bool  # False: the page limit stopped it, more studies remain


class Arrivals:
    """The arrival triggers of one service: studies named by reference (REST API, CLI,
    id-only notifications), and polls of a data source since its cursor (the watcher, empty
    notifications). Every path ends in `enqueue_arrival`."""

    def __init__(
        self,
        storage: Storage,
        model: ModelInfo,
        access: BackendServicesClients,
        *,
        max_pages: int = 5,
    ) -> None:
        self.storage = storage
        self.model = model
        self.ehr_clients = access.ehrs
        self.reader = SourceReader(access)
        self.max_pages = max_pages

    def source_for_token(self, token: str) -> str | None:
        """The data source whose Subscriptions send this bearer token (None: no such EHR)."""
        found = None
        for ehr in self.ehr_clients:
            # Every registration is compared, in constant time, so timing reveals nothing.
            if ehr.notification_token and same_secret(ehr.notification_token, token):
                found = canonical_fhir_base(ehr.fhir_base)
        return found

    def study(self, fhir_base: str, reference: str) -> Arrival:
        """Read one study with the service's access to its EHR and queue it."""
        study = self.reader.read_study(fhir_base, reference)
        return enqueue_arrival(self.storage, self.model, study, canonical_fhir_base(fhir_base))

    def poll(self, fhir_base: str) -> Poll:
        """Queue the studies changed since this source's cursor, then move the cursor."""
        base = canonical_fhir_base(fhir_base)
        changes = self.reader.changed_since(
            base, self.storage.cursors.watch_cursor(base), self.max_pages
        )
        arrivals = [enqueue_arrival(self.storage, self.model, s, base) for s in changes.studies]
        if changes.cursor is not None:
            self.storage.cursors.set_watch_cursor(base, changes.cursor)
        return Poll(arrivals, changes.complete)

    def notification(self, fhir_base: str, body: dict[str, Any] | None) -> list[Arrival]:
        """An R4 rest-hook notification: empty (query the source since its cursor), or a
        Bundle naming the changed resources (id-only or full; each study is read again from
        the EHR, so a notification body is never trusted as the study itself)."""
        if not body:
            return self.poll(fhir_base).arrivals
        if body.get("resourceType") != "Bundle":
            raise ValueError("a notification body must be a FHIR Bundle (or empty)")
        arrivals = []
        for entry in body.get("entry") or []:
            reference = _changed_study(entry)
            if reference is not None:
                arrivals.append(self.study(fhir_base, reference))
        return arrivals


def _changed_study(entry: Any) -> str | None:
    """The ImagingStudy an id-only or full-resource notification entry names, if any."""
    entry = as_dict(entry)
    if as_str(as_dict(entry.get("request")).get("method")) == "DELETE":
        return None
    resource = as_dict(entry.get("resource"))
    if resource.get("resourceType") == "ImagingStudy" and as_str(resource.get("id")):
        return f"ImagingStudy/{resource['id']}"
    full_url = as_str(entry.get("fullUrl"))
    if full_url and "/ImagingStudy/" in full_url:
        return full_url
    return None


# What `subscribe` asks the EHR for (beside reading studies, the registration's own scope).
SUBSCRIPTION_SCOPE = "system/Subscription.crus"  # s: find its own again at start
PAYLOAD_CONTENT = (
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content"
)


def subscription_resource(
    endpoint: str, token: str, criteria: str = "ImagingStudy", payload: str = "id-only"
) -> dict[str, Any]:
    """An R4 rest-hook Subscription whose notifications carry `token` (the receiver knows
    the sender by it). ``payload``: empty, id-only (backport Bundle) or full-resource."""
    channel: dict[str, Any] = {
        "type": "rest-hook",
        "endpoint": endpoint,
        "header": [f"Authorization: Bearer {token}"],
    }
    if payload != "empty":
        channel["payload"] = "application/fhir+json"
        if payload == "id-only":
            channel["_payload"] = {"extension": [{"url": PAYLOAD_CONTENT, "valueCode": payload}]}
    return {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "AI analysis of newly arrived chest radiographs (preliminary, AI-generated)",
        "criteria": criteria,
        "channel": channel,
    }


@dataclass(frozen=True)
class Resumed:
    """What `resume_subscriptions` did for one EHR."""

    resumed: list[str]  # Subscription/<id> asked to resume (they had stopped on errors)
    active: int  # this service's Subscriptions already running
    caught_up: Poll | None  # studies changed since the cursor (None: no cursor yet)


def resume_subscriptions(arrivals: Arrivals, ehr: EhrClient, endpoint: str) -> Resumed:
    """At start: an EHR stops a Subscription whose notifications were refused (status
    "error"; the sandbox after three tries), and nothing restarts it. Each of this service's
    stopped Subscriptions (channel.endpoint ``endpoint``) is asked to resume, with the
    notification token configured now (status "requested"), and the source is polled since
    its cursor, so films that arrived meanwhile are queued too. One switched "off" is left
    alone (an EHR administrator did that). Raises FhirError when the EHR refuses."""
    if not ehr.notification_token:
        raise ValueError(f"{ehr.fhir_base} has no notification_token_file")
    asking = replace(ehr, scope=f"{ehr.scope} {SUBSCRIPTION_SCOPE}")
    client = FhirClient(ehr.fhir_base, BackendServicesClient(asking).access_token())
    found = client.get_json("Subscription", [("url", endpoint)])
    wanted = subscription_resource(endpoint, ehr.notification_token)["channel"]["header"]
    resumed, active = [], 0
    for subscription in bundle_resources(found, "Subscription"):
        channel = as_dict(subscription.get("channel"))
        if channel.get("endpoint") != endpoint or not as_str(subscription.get("id")):
            continue  # a search that ignored the url parameter: only ours are touched
        if subscription.get("status") == "active":
            active += 1
            continue
        if subscription.get("status") != "error":
            continue
        again = {k: v for k, v in subscription.items() if k not in ("error", "meta")}
        again.update(status="requested", channel={**channel, "header": wanted})
        client.put_json(f"Subscription/{subscription['id']}", again)
        resumed.append(f"Subscription/{subscription['id']}")
    base = canonical_fhir_base(ehr.fhir_base)
    caught_up = None
    if arrivals.storage.cursors.watch_cursor(base) is not None:
        caught_up = arrivals.poll(base)
    return Resumed(resumed, active, caught_up)


def subscribe(
    arrivals: Arrivals,
    ehr: EhrClient,
    endpoint: str,
    *,
    criteria: str = "ImagingStudy",
    payload: str = "id-only",
) -> dict[str, Any]:
    """Create the Subscription in the EHR with the service's Backend Services registration
    (asking for Subscription rights besides its own scope), and start the source's cursor at
    the Subscription's creation: an empty notification then means 'changed since then', not
    the whole history. Raises FhirError when the EHR refuses."""
    if not ehr.notification_token:
        raise ValueError(f"{ehr.fhir_base} has no notification_token_file")
    asking = replace(ehr, scope=f"{ehr.scope} {SUBSCRIPTION_SCOPE}")
    client = FhirClient(ehr.fhir_base, BackendServicesClient(asking).access_token())
    resource = subscription_resource(endpoint, ehr.notification_token, criteria, payload)
    created = client.post_json("Subscription", resource)
    since = as_str(as_dict(created.get("meta")).get("lastUpdated"))
    base = canonical_fhir_base(ehr.fhir_base)
    if since and arrivals.storage.cursors.watch_cursor(base) is None:
        arrivals.storage.cursors.set_watch_cursor(base, since)
    return created
