"""CXR_CDS_LOG_FORMAT=json (issue 12, item 6): one JSON object a line, from the service, the
worker and `cxr-cds worker` alike, and no patient id or study UID in any of them."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from cds_service.config import Settings
from cds_service.errors import ConfigurationError
from cds_service.fhir import imaging_study
from cds_service.inference.simulated import SimulatedBackend
from cds_service.jobs.worker import drain
from cds_service.observability.logs import HANDLER_NAME, JsonFormatter, configure_logging
from tests.conftest import SandboxHandle, free_port, make_service, patient_view_body, signed_post

FIELDS = {"time", "level", "logger", "message", "process"}


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The root logger writing JSON at INFO to a buffer; put back as it was afterwards."""
    root = logging.getLogger()
    level = root.level
    werkzeug = logging.getLogger("werkzeug").level
    stream = io.StringIO()
    configure_logging("json", logging.INFO, stream)
    yield stream
    for handler in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger("werkzeug").setLevel(werkzeug)


def records(text: str) -> list[dict[str, object]]:
    lines = text.splitlines()
    parsed = [json.loads(line) for line in lines]  # every line is one JSON object
    for record in parsed:
        assert isinstance(record, dict) and record.keys() >= FIELDS
    return parsed


def test_json_logs_of_a_hook_call_and_its_analysis_carry_no_patient_id(
    tmp_path: Path, sandbox: SandboxHandle, json_log: io.StringIO
) -> None:
    handle, server = make_service(tmp_path, sandbox)
    try:
        body = patient_view_body(fhirServer=sandbox.fhir, fhirAuthorization=sandbox.authorization())
        assert signed_post(handle, sandbox, "cxr-ai-patient-view", body).status_code == 200
        assert drain(handle.store, SimulatedBackend()) > 0  # the studies the hook queued
        assert signed_post(handle, sandbox, "cxr-ai-patient-view", body).status_code == 200
        # A rejected JWT and a hook without data: logged for the operator.
        rejected = requests.post(handle.url("cxr-ai-patient-view"), json=body, timeout=10)
        assert rejected.status_code == 401
        bare = signed_post(handle, sandbox, "cxr-ai-patient-view", patient_view_body())
        assert bare.status_code == 412
    finally:
        server.stop()
    logged = records(json_log.getvalue())
    assert any(r["message"] == "client JWT rejected: no bearer token" for r in logged)
    assert any(str(r["message"]).startswith("analysed job ") for r in logged)
    assert all(r["process"] == os.getpid() for r in logged)
    uids = [imaging_study.study_uid(s) for s in sandbox.studies]
    for record in logged:
        line = json.dumps(record)
        assert "cxr-demo-1" not in line, line
        assert not any(uid and uid in line for uid in uids), line


def test_a_traceback_stays_inside_its_json_record() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "cds_service.x", logging.ERROR, __file__, 1, "failed %d", (3,), None
        )
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "failed 3" and entry["level"] == "ERROR"
    assert "ValueError: boom" in entry["exception"]


def test_log_format_and_metrics_settings() -> None:
    base = {"CXR_CDS_MODE": "development", "CXR_CDS_PUBLIC_URL": "http://127.0.0.1:8080"}
    default = Settings.from_env(base)
    assert default.log_format == "text" and default.metrics_enabled is True
    chosen = Settings.from_env({**base, "CXR_CDS_LOG_FORMAT": "JSON", "CXR_CDS_METRICS": "off"})
    assert chosen.log_format == "json" and chosen.metrics_enabled is False
    with pytest.raises(ConfigurationError, match="CXR_CDS_LOG_FORMAT"):
        Settings.from_env({**base, "CXR_CDS_LOG_FORMAT": "xml"})
    with pytest.raises(ConfigurationError, match="CXR_CDS_LOG_FORMAT"):
        configure_logging("xml")


def test_the_worker_command_logs_json_lines(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "CXR_CDS_MODE": "development",
        "CXR_CDS_AUTH": "off",
        "CXR_CDS_PUBLIC_URL": f"http://127.0.0.1:{free_port()}",
        "CXR_CDS_DB": str(tmp_path / "cds.sqlite3"),
        "CXR_CDS_LOG_FORMAT": "json",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "cds_service.cli", "worker"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "inference worker started" in line:
                break
    finally:
        proc.terminate()
        proc.wait(10)
    logged = records("".join(lines))
    assert any(str(r["message"]).startswith("inference worker started") for r in logged)
    assert {r["process"] for r in logged} == {proc.pid}
