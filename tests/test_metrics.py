"""GET /metrics as Prometheus scrapes it (issue 12, item 6): job counts by state read from the
store, the worker's batches and latencies, hook latency, error responses; a worker in another
process (multiprocess mode) shows on the web app's /metrics; no PHI in any of it."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from cds_service.fhir import imaging_study
from cds_service.inference.pipeline import ImagePipelineBackend
from cds_service.inference.simulated import SIMULATED_MODEL, SimulatedBackend
from cds_service.jobs.worker import drain
from cds_service.observability.multiproc import MULTIPROC_ENV, use_multiprocess_dir
from cds_service.storage.sqlite import open_sqlite_storage
from tests.conftest import (
    SandboxHandle,
    claims_for,
    make_service,
    patient_view_body,
    sign,
    signed_post,
)
from tests.test_worker_batches import CountingWriter, Images, queue

PATIENT_VIEW = "cxr-ai-patient-view"


def scrape(base: str) -> str:
    response = requests.get(f"{base}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    return response.text


def value(text: str, sample: str, **labels: str) -> float:
    """The sample's value (0 when absent: no observation yet)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def job_states(text: str) -> dict[str, float]:
    return {
        state: value(text, "cxr_cds_jobs", state=state)
        for state in ("queued", "waiting", "running", "done", "failed")
    }


def test_metrics_show_queue_batches_hooks_and_errors(
    tmp_path: Path, sandbox: SandboxHandle
) -> None:
    handle, server = make_service(tmp_path, sandbox)
    try:
        store = handle.store
        queue(store, SIMULATED_MODEL, [f"s{i}" for i in range(7)])
        waiting = store.jobs.claim_batch(SIMULATED_MODEL, 1)[0]
        store.jobs.defer(waiting, "no access to http://ehr/fhir", 300)
        running = store.jobs.claim_batch(SIMULATED_MODEL, 1)[0]
        before = scrape(handle.base)
        assert job_states(before) == {
            "queued": 5,
            "waiting": 1,
            "running": 1,
            "done": 0,
            "failed": 0,
        }
        assert value(before, "cxr_cds_job_store_up") == 1
        assert value(before, "cxr_cds_model_info", model_id=SIMULATED_MODEL.model_id) == 1

        # The worker takes the six claimable jobs as one batch; the waiting one stays.
        store.jobs.put_back(running, "test")
        writer = CountingWriter()
        assert drain(store, ImagePipelineBackend(writer, Images()), batch_size=8) == 6
        assert writer.calls == [6]
        after = scrape(handle.base)
        assert job_states(after) == {
            "queued": 0,
            "waiting": 1,
            "running": 0,
            "done": 6,
            "failed": 0,
        }
        batches = value(after, "cxr_cds_batch_size_count") - value(
            before, "cxr_cds_batch_size_count"
        )
        jobs = value(after, "cxr_cds_batch_size_sum") - value(before, "cxr_cds_batch_size_sum")
        assert batches == 1 and jobs / batches == 6  # the mean batch size
        for name, labels, grew_by in (
            ("cxr_cds_job_latency_seconds_count", {"status": "completed"}, 6),
            ("cxr_cds_job_outcomes_total", {"outcome": "completed"}, 6),
            ("cxr_cds_job_outcomes_total", {"outcome": "put-back"}, 0),
            ("cxr_cds_generated_reports_total", {}, 6),
        ):
            assert value(after, name, **labels) - value(before, name, **labels) == grew_by, name
        assert value(after, "cxr_cds_model_seconds_total") > value(
            before, "cxr_cds_model_seconds_total"
        )

        # A hook call is timed under its service id.
        hooks = "cxr_cds_hook_duration_seconds_count"
        body = patient_view_body(fhirServer=sandbox.fhir, fhirAuthorization=sandbox.authorization())
        answer = signed_post(handle, sandbox, PATIENT_VIEW, body)
        assert answer.status_code == 200
        timed = scrape(handle.base)
        assert (
            value(timed, hooks, service=PATIENT_VIEW)
            == value(after, hooks, service=PATIENT_VIEW) + 1
        )

        # Malformed JSON: a 400, counted by endpoint and code (and still timed).
        url = handle.url(PATIENT_VIEW)
        token = sign(sandbox.sandbox.key.key, claims_for(sandbox.base, url))
        bad = requests.post(
            url,
            data=b'{"hook": "patient-view",',
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            timeout=10,
        )
        assert bad.status_code == 400
        unknown = requests.post(f"{handle.base}/cds-services/no-such-service", json={}, timeout=10)
        assert unknown.status_code == 404
        errors = scrape(handle.base)
        errors_total = "cxr_cds_http_errors_total"
        hook_400 = {"endpoint": "cds_hooks.call_service", "code": "400"}
        assert value(errors, errors_total, **hook_400) == value(timed, errors_total, **hook_400) + 1
        assert (
            value(errors, hooks, service=PATIENT_VIEW)
            == value(timed, hooks, service=PATIENT_VIEW) + 1
        )
        assert value(errors, hooks, service="no-such-service") == 0  # no invented labels

        # No PHI: no patient id, study UID or URL in any label, nor anywhere in the text.
        labels = {
            v
            for f in text_string_to_metric_families(errors)
            for s in f.samples
            for v in s.labels.values()
        }
        assert not any("/" in v or ":" in v for v in labels)
        for uid in [imaging_study.study_uid(s) for s in sandbox.studies] + ["1.2.0"]:
            assert uid and uid not in errors
        assert "cxr-demo-1" not in errors
    finally:
        server.stop()


def test_metrics_can_be_switched_off(tmp_path: Path, sandbox: SandboxHandle) -> None:
    handle, server = make_service(tmp_path, sandbox, metrics_enabled=False)
    try:
        assert requests.get(f"{handle.base}/metrics", timeout=10).status_code == 404
    finally:
        server.stop()


def drain_in_child(database: str, batch_size: int) -> None:
    """A worker process (spawned: a fresh interpreter that sees PROMETHEUS_MULTIPROC_DIR)."""
    drain(open_sqlite_storage(database), SimulatedBackend(), batch_size=batch_size)


def test_a_worker_in_another_process_shows_on_the_web_apps_metrics(
    tmp_path: Path, sandbox: SandboxHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    monkeypatch.setenv(MULTIPROC_ENV, str(directory))
    handle, server = make_service(tmp_path, sandbox)
    try:
        queue(handle.store, SIMULATED_MODEL, ["s0", "s1", "s2"])
        child = multiprocessing.get_context("spawn").Process(
            target=drain_in_child, args=(str(handle.settings.database), 8)
        )
        child.start()
        child.join(60)
        assert child.exitcode == 0
        text = scrape(handle.base)
        assert value(text, "cxr_cds_batch_size_count") == 1
        assert value(text, "cxr_cds_batch_size_sum") == 3
        assert value(text, "cxr_cds_job_outcomes_total", outcome="completed") == 3
        assert job_states(text)["done"] == 3
        assert list(directory.glob("*.db"))  # the child's values, in files
    finally:
        server.stop()


def test_serve_starts_from_a_clean_metrics_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, "")  # unset: the default beside the database is used
    default = tmp_path / "var" / "prometheus"
    default.mkdir(parents=True)
    (default / "counter_123.db").write_bytes(b"left by an earlier run")
    (default / "notes.txt").write_text("not ours")
    assert use_multiprocess_dir(default) == default
    assert not (default / "counter_123.db").exists()
    assert (default / "notes.txt").exists()
    import os

    assert os.environ[MULTIPROC_ENV] == str(default)


def test_the_cli_does_not_import_prometheus_client_before_serve_sets_its_directory() -> None:
    """prometheus_client picks in-memory or multiprocess values when first imported."""
    code = "import sys, cds_service.cli; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
