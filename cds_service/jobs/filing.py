"""File a completed analysis into the EHR it came from (SMART Backend Services write-back)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from cds_service.fhir import imaging_study
from cds_service.fhir.backend_services import BackendServicesClients
from cds_service.fhir.client import FhirClient
from cds_service.fhir.shapes import as_str
from cds_service.fhir.writeback import WriteResult, write_transaction
from cds_service.fhir_out.bundle import transaction_bundle
from cds_service.fhir_out.resources import DeviceInfo, build_ai_report
from cds_service.results import AnalysisResult
from cds_service.storage.ports import Job

log = logging.getLogger(__name__)


def analysis_time(result: AnalysisResult) -> datetime:
    """When the report was made: the same `issued` wherever the report is built."""
    if result.analysed_at:
        parsed = datetime.fromisoformat(result.analysed_at)
        if parsed.tzinfo is not None:
            return parsed
    return datetime.now(UTC)


class ReportFiler:
    """Writes reports to the EHRs that registered this service as a backend client."""

    def __init__(self, access: BackendServicesClients, device: DeviceInfo) -> None:
        self.device = device
        self.access = access

    def file(self, job: Job, result: AnalysisResult) -> WriteResult | None:
        """Write the report as one transaction of conditional creates; None when this job's
        EHR has no write-back registration. Raises FhirError / ValueError on failure."""
        client = self.access.client(job.fhir_server)
        study_id = as_str(job.study_resource.get("id"))
        if client is None or result.status != "completed" or study_id is None:
            return None
        # The job's study came from the caller (prefetch). Write only what the EHR itself says
        # about the study: same Study UID, same patient, or nothing is filed.
        ehr = FhirClient(client.ehr.fhir_base, client.access_token())
        study = ehr.get_json(f"ImagingStudy/{study_id}")
        if imaging_study.study_uid(study) != job.ref.study_uid or (
            imaging_study.subject_patient_id(study) != job.ref.patient_id
        ):
            raise ValueError("the EHR's ImagingStudy does not match the analysed study")
        resources = build_ai_report(
            result,
            study,
            self.device,
            fhir_study_reference=f"ImagingStudy/{study_id}",
            issued=analysis_time(result),
        )
        written = write_transaction(client, transaction_bundle(resources))
        log.info("job %s: report filed (%s)", job.id, "created" if written.created else "exists")
        return written
