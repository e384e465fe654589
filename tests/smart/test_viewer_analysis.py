"""'Request analysis' from an EHR that only launches the app (issue 12, item 3): the service
holds no Backend Services registration there, so its worker cannot read the EHR's images; the
viewer hands the job the DICOM it read with the clinician's token, and the job completes
instead of waiting for access forever."""

from __future__ import annotations

import base64
import io
import re
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from cds_service.composition import Composition
from cds_service.fhir import imaging_study
from cds_service.jobs.arrivals import enqueue_arrival
from cds_service.jobs.worker import drain
from cds_service.storage.ports import StudyRef
from cds_service.web.demo import register_viewer
from ehr_sandbox.app import Sandbox, SandboxSettings
from ehr_sandbox.app import create_app as create_sandbox_app
from ehr_sandbox.seed import SEED_DIR, imaging_study_resource, seed
from tests.conftest import SandboxHandle, ServerThread, free_port, make_service
from tests.smart.conftest import SmartEnv

PATIENT = "cxr-demo-3"
FRONTAL = "nih-cxr14-00000002_000-no-finding-dx.dcm"
LATERAL = "dog-lateral-thorax-dx.dcm"


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxHandle]:
    """An EHR of this module's own: these tests add studies to the demo patients."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    box = Sandbox.open(
        SandboxSettings(data_dir=tmp_path_factory.mktemp("launch-only-ehr"), base_url=base)
    )
    studies = seed(box.store)
    server = ServerThread(create_sandbox_app(sandbox=box), port)
    yield SandboxHandle(base=base, sandbox=box, studies=studies)
    server.stop()


@pytest.fixture(scope="module")
def launch_only_env(
    tmp_path_factory: pytest.TempPathFactory, launcher: SandboxHandle
) -> Iterator[SmartEnv]:
    """The service as the public SMART launcher meets it: the EHR may launch the app
    (CXR_CDS_APP_FHIR_SERVERS) and is neither a CDS client nor registered for Backend
    Services (no CXR_CDS_EHR_CLIENTS)."""
    sandbox = launcher
    service, server = make_service(
        tmp_path_factory.mktemp("launch-only-service"),
        sandbox,
        trusted_issuers=(),
        app_fhir_servers=(f"{sandbox.base}/",),
    )
    assert service.settings.ehr_clients == ()
    register_viewer(sandbox.sandbox, service.base)
    yield SmartEnv(sandbox=sandbox, service=service)
    server.stop()


def film_study(sandbox: SandboxHandle, study_id: str, film: str) -> dict[str, Any]:
    """A new study of the patient in the EHR, its film (fresh UIDs) a DICOM Binary that a
    Media links to the study, as the EHR keeps its own DICOM attachments."""
    dataset = pydicom.dcmread(SEED_DIR / film)
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    store = sandbox.sandbox.store
    store.update(
        {
            "resourceType": "Binary",
            "id": f"dicom-{study_id}",
            "contentType": "application/dicom",
            "data": base64.b64encode(buffer.getvalue()).decode("ascii"),
        }
    )
    study = imaging_study_resource(dataset, study_id, PATIENT, datetime.now(UTC))
    store.update(study)
    store.update(
        {
            "resourceType": "Media",
            "id": f"media-{study_id}",
            "status": "completed",
            "partOf": [{"reference": f"ImagingStudy/{study_id}"}],
            "subject": {"reference": f"Patient/{PATIENT}"},
            "content": {"contentType": "application/dicom", "url": f"Binary/dicom-{study_id}"},
        }
    )
    return study


def ref_of(env: SmartEnv, study: dict[str, Any]) -> StudyRef:
    uid = imaging_study.study_uid(study)
    assert uid
    return StudyRef(env.sandbox.fhir, uid, PATIENT)


def images_held(env: SmartEnv) -> int:
    with sqlite3.connect(env.service.settings.database) as conn:
        return int(conn.execute("SELECT count(*) FROM job_dicom").fetchone()[0])


def request_analysis(
    env: SmartEnv, study_id: str, status: str = "not analysed yet"
) -> requests.Response:
    """Launch on the study (plain HTTP), check its AI status, and press 'Request analysis'
    with the page's form."""
    view = requests.get(env.ehr_launch_url(study=study_id, patient=PATIENT), timeout=30)
    assert view.status_code == 200 and view.url.endswith(f"/study/{study_id}"), view.url
    assert f'<strong id="ai-status">{status}</strong>' in view.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', view.text)
    assert csrf is not None and "Request analysis" in view.text
    return requests.post(view.url + "/analyse", data={"csrf": csrf.group(1)}, timeout=30)


def test_requested_analysis_completes_without_access_to_the_ehr(
    launch_only_env: SmartEnv, page: Any
) -> None:
    env, store = launch_only_env, launch_only_env.service.store
    study = film_study(env.sandbox, "cxr-launch-only-1", FRONTAL)
    ref = ref_of(env, study)
    page.goto(env.ehr_launch_url(study="cxr-launch-only-1", patient=PATIENT))
    page.wait_for_url("**/study/cxr-launch-only-1")
    assert page.locator("#ai-status").inner_text() == "not analysed yet"
    page.get_by_role("button", name="Request analysis").click()
    page.wait_for_url("**notice=queued")
    assert page.locator("#ai-status").inner_text() == "in progress"
    assert images_held(env) == 1  # the film the viewer read travels with the job
    # The service's own worker, as `cxr-cds worker` builds it from these settings.
    backend = Composition(env.service.settings).backend()
    assert drain(store, backend) == 1
    assert store.jobs.waiting_reason(ref, backend.model) is None
    stored = store.results.get_result(ref, backend.model)
    assert stored is not None and stored.result.status == "completed", stored
    assert stored.result.report_text.startswith("SIMULATED OUTPUT")
    assert images_held(env) == 0  # the database keeps no images of finished jobs
    page.reload()
    assert page.locator("#ai-status").inner_text() == "analysed"


def test_a_job_waiting_for_access_runs_once_the_clinician_requests_it(
    launch_only_env: SmartEnv,
) -> None:
    """Queued without an image (as a hook's first miss queues it), the job waits: no access
    to the EHR. The clinician's request brings the image to that job; no second job."""
    env, store = launch_only_env, launch_only_env.service.store
    study = film_study(env.sandbox, "cxr-launch-only-2", FRONTAL)
    ref = ref_of(env, study)
    backend = Composition(env.service.settings).backend()
    assert enqueue_arrival(store, backend.model, study, env.sandbox.fhir).outcome == "queued"
    assert drain(store, backend) == 1
    reason = store.jobs.waiting_reason(ref, backend.model)
    assert reason is not None and f"no access to {env.sandbox.fhir}" in reason
    job_id = store.jobs.latest_job_id(ref, backend.model)
    answer = request_analysis(env, "cxr-launch-only-2", status="waiting for access to the images")
    assert answer.status_code == 200 and "notice=already-queued" in answer.url
    assert store.jobs.waiting_reason(ref, backend.model) is None
    assert drain(store, backend) == 1
    assert store.jobs.latest_job_id(ref, backend.model) == job_id
    stored = store.results.get_result(ref, backend.model)
    assert stored is not None and stored.result.status == "completed"
    assert images_held(env) == 0


def test_a_study_with_no_analysable_image_is_refused_with_the_reason(
    launch_only_env: SmartEnv,
) -> None:
    env, store = launch_only_env, launch_only_env.service.store
    study = film_study(env.sandbox, "cxr-launch-only-lateral", LATERAL)
    answer = request_analysis(env, "cxr-launch-only-lateral")
    assert answer.status_code == 422
    assert "Cannot analyse" in answer.text and "lateral view" in answer.text
    ref = ref_of(env, study)
    assert store.jobs.latest_job_id(ref, Composition(env.service.settings).backend().model) is None
    assert images_held(env) == 0
