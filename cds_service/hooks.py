"""The CDS services: discovery entries and the hook handler (no Flask; called by web/)."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cds_service.config import ConfigurationError, Settings, TrustedIssuer
from cds_service.errors import BadRequest, CdsServiceError, NotFound, PreconditionFailed
from cds_service.fhir import imaging_study
from cds_service.fhir.backend_services import BackendServicesClients
from cds_service.fhir.client import FhirClient, FhirError, new_session
from cds_service.fhir.prefetch import (
    PREFETCH_KEY,
    PREFETCH_QUERY,
    DataUnavailable,
    FhirAccess,
    recent_chest_studies,
    resolve_studies,
)
from cds_service.fhir.shapes import as_list, as_str
from cds_service.fhir_out.cards import (
    CardContext,
    StudyStatus,
    build_cards,
    filing_suggestion_uuid,
    incomplete_list_card,
    utcnow,
)
from cds_service.fhir_out.resources import DeviceInfo, build_ai_report, report_identifier
from cds_service.imaging.errors import NoAccess
from cds_service.inference.registry import device_info
from cds_service.jobs.arrivals import enqueue_arrival
from cds_service.jobs.filing import analysis_time
from cds_service.orders import chest_orders
from cds_service.results import AnalysisResult, ModelInfo
from cds_service.sources import canonical_fhir_base, data_source, same_fhir_base
from cds_service.storage.ports import Storage, StudyRef

log = logging.getLogger(__name__)
REPORT_CACHE_SIZE = 1024
# The caller when authentication is off (development only): there is no issuer.
DEVELOPMENT_CALLER = "development"


def _caller(issuer: TrustedIssuer | None) -> str:
    return issuer.iss if issuer is not None else DEVELOPMENT_CALLER


@dataclass(frozen=True)
class CdsServiceDefinition:
    id: str
    hook: str
    title: str
    description: str

    def discovery(self) -> dict[str, Any]:
        return {
            "hook": self.hook,
            "id": self.id,
            "title": self.title,
            "description": self.description,
            "prefetch": {PREFETCH_KEY: PREFETCH_QUERY},
            "usageRequirements": (
                "Send fhirAuthorization with patient/ImagingStudy.rs (or .read) access, or the "
                f"'{PREFETCH_KEY}' prefetch. AI output is preliminary and needs review."
            ),
        }


SERVICES: dict[str, CdsServiceDefinition] = {
    s.id: s
    for s in (
        CdsServiceDefinition(
            id="cxr-ai-patient-view",
            hook="patient-view",
            title="AI findings on recent chest radiographs",
            description=(
                "Flags major findings (pneumothorax, effusion, consolidation, ...) that an AI "
                "model reported on the patient's recent chest radiographs. Preliminary, "
                "AI-generated, not reviewed by a radiologist."
            ),
        ),
        CdsServiceDefinition(
            id="cxr-ai-order-select",
            hook="order-select",
            title="AI findings on prior chest radiographs when a chest X-ray is ordered",
            description=(
                "When a chest radiograph order is selected, shows AI-flagged findings on the "
                "patient's recent prior chest radiographs. Preliminary, AI-generated."
            ),
        ),
        CdsServiceDefinition(
            id="cxr-ai-order-sign",
            hook="order-sign",
            title="AI findings on prior chest radiographs when a chest X-ray order is signed",
            description=(
                "When a chest radiograph order is signed, shows AI-flagged findings on the "
                "patient's recent prior chest radiographs. Preliminary, AI-generated."
            ),
        ),
    )
}


def discovery_document() -> dict[str, Any]:
    return {"services": [service.discovery() for service in SERVICES.values()]}


def _require_str(obj: dict[str, Any], name: str, where: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{where}.{name} must be a non-empty string")
    return value


class HookHandler:
    """Turns one verified hook request into a CDS Hooks response."""

    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        model: ModelInfo,
        client_factory: Callable[[FhirAccess], FhirClient] | None = None,
        device: DeviceInfo | None = None,
        access: BackendServicesClients | None = None,
    ) -> None:
        self.settings = settings
        # The service's own registrations (shared with the process's other parts).
        self.access = access or BackendServicesClients(settings.ehr_clients)
        self.storage = storage
        self.model = model
        self.device = device or device_info(settings, model)
        self._reports: OrderedDict[tuple[str, str, str], dict[str, Any] | None] = OrderedDict()
        self._reports_lock = threading.Lock()
        self._client_factory = client_factory or self._default_client
        self._sessions = threading.local()

    def _default_client(self, access: FhirAccess) -> FhirClient:
        # One keep-alive session per thread: no new TCP connection per hook call.
        session = getattr(self._sessions, "session", None)
        if session is None:
            session = self._sessions.session = new_session()
        return FhirClient(
            access.fhir_server,
            access.access_token,
            timeout=(self.settings.fhir_connect_timeout_s, self.settings.fhir_read_timeout_s),
            session=session,
        )

    def handle(self, service_id: str, body: Any, issuer: TrustedIssuer | None) -> dict[str, Any]:
        service = SERVICES.get(service_id)
        if service is None:
            raise NotFound(f"no CDS service with id {service_id!r}")
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        hook = _require_str(body, "hook", "request")
        if hook != service.hook:
            raise BadRequest(f"service {service.id} answers the {service.hook} hook, not {hook}")
        _require_str(body, "hookInstance", "request")
        context = body.get("context")
        if not isinstance(context, dict):
            raise BadRequest("request.context must be an object")
        patient_id = _require_str(context, "patientId", "context")
        _require_str(context, "userId", "context")
        prefix = ""
        if service.hook in ("order-select", "order-sign"):
            if not chest_orders(context):
                return {"cards": []}  # not a chest radiograph order: no guidance
            prefix = "Prior "
        # The hook's fhirServer, when this caller may name it: the service queries it only
        # with the hook's fhirAuthorization, and a job keeps it even without one (the worker
        # reads it with that EHR's registered access).
        server = self._vetted_fhir_server(body, issuer)
        access = self._fhir_access(body, server)
        try:
            found = resolve_studies(
                body.get("prefetch"),
                patient_id,
                access,
                self._client_factory,
                max_pages=self.settings.max_prefetch_pages,
                lookback_days=self.settings.lookback_days,
            )
        except DataUnavailable as exc:
            log.info("hook %s: studies unavailable: %s", service.id, exc)
            if self.settings.on_missing_data == "no-card":
                return {"cards": []}
            raise PreconditionFailed(
                f"could not obtain the '{PREFETCH_KEY}' prefetch: send it, or send fhirServer "
                "with fhirAuthorization for a FHIR server this service is allowed to query"
            ) from exc
        recent = recent_chest_studies(
            found.studies,
            patient_id,
            lookback_days=self.settings.lookback_days,
            limit=self.settings.max_studies,
        )
        # Results belong to the data source: the vetted FHIR server, else the caller itself.
        source = data_source(server, _caller(issuer))
        # Where this service files reports itself, a card must not offer a second copy.
        offer_filing = not self._files_to(server)
        statuses = self._statuses(recent, source, patient_id, server, offer_filing)
        ctx = CardContext(
            model=self.model,
            smart_launch_url=self.settings.smart_launch_url(),
            now=utcnow(),
            summary_prefix=prefix,
            source=source,
        )
        cards, records = build_cards(statuses, ctx)
        if records:
            self.storage.cards.record_cards(records)
        if not found.complete:
            cards.append(incomplete_list_card(ctx))
        return {"cards": cards}

    def feedback(
        self, service_id: str, items: list[dict[str, Any]], issuer: TrustedIssuer | None
    ) -> int:
        """Store feedback (idempotent); returns how many items were new. An accepted 'File AI
        report to chart' suggestion counts as filed (offered no more) only once the report is
        found in the EHR, read back by its identifier: an EHR may accept a suggestion without
        running its actions (the CDS Hooks sandbox does)."""
        stored = 0
        for item in items:
            stored += self.storage.feedback.store_feedback(service_id, item)
            card = str(item["card"])
            accepted = {
                str(s.get("id"))
                for s in as_list(item.get("acceptedSuggestions"))
                if isinstance(s, dict)
            }
            if item.get("outcome") != "accepted" or filing_suggestion_uuid(card) not in accepted:
                continue
            record = self.storage.cards.card_record(card)
            # Only a caller that may read the card's data source can say its report was filed.
            if (
                record is not None
                and self._may_read(issuer, record.source)
                and (record.model_id, record.model_version)
                == (self.model.model_id, self.model.version)
            ):
                location = self._report_in_ehr(issuer, record.source, record.study_uid)
                if location is None:
                    log.info(
                        "accepted filing suggestion: report not found in the EHR, still offered"
                    )
                    continue
                self.storage.results.mark_filed(
                    record.source, record.study_uid, self.model, location
                )
        return stored

    def _report_in_ehr(
        self, issuer: TrustedIssuer | None, source: str, study_uid: str
    ) -> str | None:
        """Where the EHR at `source` holds this analysis' report (``DiagnosticReport/<id>``),
        searched by the report's identifier with the service's registered access to that EHR,
        else without a token (open EHRs); None when not found or not readable. Only a FHIR
        server the caller may name is asked (a source that is the caller's issuer is not)."""
        if issuer is None and self.settings.mode != "development":
            return None
        if issuer is not None and not issuer.allows_fhir_server(source):
            return None
        if not source.startswith(("http://", "https://")):
            return None
        identifier = report_identifier(study_uid, self.device.model_id, self.device.version)
        try:
            registered = self.access.client(source)
            token = registered.access_token() if registered is not None else ""
            client = self._client_factory(FhirAccess(fhir_server=source, access_token=token))
            bundle = client.get_json(
                "DiagnosticReport",
                [("identifier", f"{identifier['system']}|{identifier['value']}")],
            )
        except (FhirError, ConfigurationError) as exc:
            log.info("filed report not read back: %s", type(exc).__name__)
            return None
        for entry in as_list(bundle.get("entry")):
            report = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(report, dict) or report.get("resourceType") != "DiagnosticReport":
                continue
            if identifier in as_list(report.get("identifier")) and as_str(report.get("id")):
                return f"DiagnosticReport/{report['id']}"
        return None

    def _suggested_report(
        self, ref: StudyRef, study: dict[str, Any], result: AnalysisResult
    ) -> dict[str, Any] | None:
        """The DiagnosticReport a clinician may file from the card: the same report the
        write-back would create, without Observation links (they do not exist in the EHR).
        Built once per study and kept (building and validating costs a few milliseconds)."""
        study_id = as_str(study.get("id"))
        if study_id is None:
            return None
        key = (ref.source, ref.study_uid, study_id)
        with self._reports_lock:
            if key in self._reports:
                self._reports.move_to_end(key)
                return self._reports[key]
        try:
            resources = build_ai_report(
                result,
                study,
                self.device,
                fhir_study_reference=f"ImagingStudy/{study_id}",
                issued=analysis_time(result),
            )
            report: dict[str, Any] | None = {
                k: v for k, v in resources.diagnostic_report.items() if k not in ("id", "result")
            }
        except (ValueError, CdsServiceError) as exc:
            # One unusable study (e.g. an impossible date) loses only its filing offer.
            log.info("no filing suggestion: %s", type(exc).__name__)
            report = None
        with self._reports_lock:
            self._reports[key] = report
            if len(self._reports) > REPORT_CACHE_SIZE:
                self._reports.popitem(last=False)
        return report

    def _may_read(self, issuer: TrustedIssuer | None, source: str) -> bool:
        """A caller reads the results of the FHIR bases its configuration lists, and of its
        own issuer (its data source when it names no FHIR server)."""
        if issuer is None:
            return self.settings.mode == "development"
        return source == data_source(None, issuer.iss) or issuer.allows_fhir_server(source)

    def _vetted_fhir_server(self, body: dict[str, Any], issuer: TrustedIssuer | None) -> str | None:
        """The hook's fhirServer when this caller may name it (None otherwise)."""
        server = body.get("fhirServer")
        if not isinstance(server, str) or not server:
            return None
        if issuer is None:
            # Only reachable with authentication off, which only development mode allows.
            return server if self.settings.mode == "development" else None
        if not issuer.allows_fhir_server(server):
            # A disallowed fhirServer causes no outbound request at all (SSRF guard).
            log.warning("fhirServer not allowed for issuer %s; not contacting it", issuer.iss)
            return None
        return server

    @staticmethod
    def _fhir_access(body: dict[str, Any], server: str | None) -> FhirAccess | None:
        """The hook's fhirAuthorization for its vetted fhirServer (None when either is missing)."""
        auth = body.get("fhirAuthorization")
        if server is None or not isinstance(auth, dict):
            return None
        token = auth.get("access_token")
        if not isinstance(token, str) or not token:
            return None
        if str(auth.get("token_type", "Bearer")).lower() != "bearer":
            return None
        return FhirAccess(fhir_server=server, access_token=token)

    def _no_access(self, fhir_server: str | None) -> str:
        """Why a job for this FHIR server will wait for access ("" when it will not)."""
        if self.settings.image_servers or self._files_to(fhir_server):
            return ""
        return NoAccess(canonical_fhir_base(fhir_server) if fhir_server else None).description

    def _files_to(self, fhir_server: str | None) -> bool:
        """Whether this service files reports itself to the (vetted) FHIR server."""
        if fhir_server is None:
            return False
        return any(same_fhir_base(ehr.fhir_base, fhir_server) for ehr in self.settings.ehr_clients)

    def _statuses(
        self,
        studies: list[dict[str, Any]],
        source: str,
        patient_id: str,
        server: str | None,
        offer_filing: bool = True,
    ) -> list[StudyStatus]:
        refs = [
            StudyRef(source, uid, patient_id) if (uid := imaging_study.study_uid(s)) else None
            for s in studies
        ]
        statuses = [
            self._status(s, ref, server, offer_filing=offer_filing)
            for s, ref in zip(studies, refs, strict=True)
        ]
        budget = self.settings.hook_wait_ms / 1000.0
        if budget > 0 and any(s.state == "in-progress" for s in statuses):
            deadline = time.monotonic() + budget
            while time.monotonic() < deadline and any(s.state == "in-progress" for s in statuses):
                time.sleep(0.02)
                statuses = [
                    self._status(s.study, ref, server, enqueue=False, offer_filing=offer_filing)
                    if s.state == "in-progress"
                    else s
                    for s, ref in zip(statuses, refs, strict=True)
                ]
        return statuses

    def _status(
        self,
        study: dict[str, Any],
        ref: StudyRef | None,
        server: str | None,
        enqueue: bool = True,
        offer_filing: bool = True,
    ) -> StudyStatus:
        if ref is None:
            return StudyStatus(
                study=study, state="not-analysed", reason="no DICOM Study Instance UID in the study"
            )
        stored = self.storage.results.get_result(ref, self.model)
        if stored is not None:
            if stored.patient_id != ref.patient_id:
                # Never show a result computed for another patient record.
                log.warning("a stored result's patient differs from the hook's patient")
                return StudyStatus(
                    study=study,
                    state="not-analysed",
                    reason="study UID conflicts with another patient record",
                )
            if stored.result.status == "completed":
                unfiled = None
                if stored.filed_location is None and offer_filing:
                    unfiled = self._suggested_report(ref, study, stored.result)
                return StudyStatus(
                    study=study, state="completed", result=stored.result, unfiled_report=unfiled
                )
            return StudyStatus(study=study, state="not-analysed", result=stored.result)
        if self.storage.jobs.job_state(ref, self.model) is not None:
            waiting = self.storage.jobs.waiting_reason(ref, self.model) or ""
            return StudyStatus(study=study, state="in-progress", reason=waiting)
        if enqueue and self.settings.enqueue_on_miss:
            arrival = enqueue_arrival(self.storage, self.model, study, server, source=ref.source)
            if arrival.outcome == "queue-full":
                return StudyStatus(
                    study=study, state="not-analysed", reason="analysis queue full, try later"
                )
            if arrival.accepted:
                # Say at once what the worker will find: without access to the study's EHR
                # (and no image server to look in) the job waits for a setting, not a model.
                return StudyStatus(study=study, state="in-progress", reason=self._no_access(server))
        return StudyStatus(study=study, state="not-analysed", reason="not yet analysed")
