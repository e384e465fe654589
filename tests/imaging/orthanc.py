"""A real Orthanc PACS with its DICOMweb plugin, on loopback, for the tests.

Debian packages `orthanc` and `orthanc-dicomweb` (Makefile SYSTEM_PACKAGES). When they are
missing the tests FAIL, so CI cannot pass without a real PACS; set CXR_CDS_SKIP_ORTHANC=1 to
skip them deliberately on a machine without Debian packages.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
SKIP_VARIABLE = "CXR_CDS_SKIP_ORTHANC"


@dataclass
class OrthancServer:
    base: str
    process: subprocess.Popen[bytes]

    @property
    def dicomweb(self) -> str:
        return f"{self.base}/dicom-web"

    def upload(self, data: bytes) -> dict[str, str]:
        response = requests.post(f"{self.base}/instances", data=data, timeout=30)
        response.raise_for_status()
        answer = response.json()
        assert answer["Status"] in ("Success", "AlreadyStored"), answer
        return answer

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def orthanc_binary() -> str:
    if os.environ.get(SKIP_VARIABLE) == "1":
        pytest.skip(f"{SKIP_VARIABLE}=1: Orthanc tests skipped on purpose")
    binary = shutil.which("Orthanc") or (ORTHANC if Path(ORTHANC).exists() else None)
    if binary is None or not Path(DICOMWEB_PLUGIN).exists():
        pytest.fail(
            "Orthanc with its DICOMweb plugin is required (Debian packages orthanc and "
            f"orthanc-dicomweb; `make system-packages`), or set {SKIP_VARIABLE}=1 to skip"
        )
    return binary


def start_orthanc(workdir: Path, http_port: int, dicom_port: int) -> OrthancServer:
    """Start Orthanc with a generated config: HTTP on loopback only, no DICOM listener."""
    binary = orthanc_binary()
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "cxr-cds-test-pacs",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,  # loopback only
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "DicomPort": dicom_port,
        "HttpsCACertificates": "",
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    config_file = workdir / "orthanc.json"
    config_file.write_text(json.dumps(config), encoding="utf-8")
    log = (workdir / "orthanc.log").open("wb")
    process = subprocess.Popen([binary, str(config_file)], stdout=log, stderr=subprocess.STDOUT)
    server = OrthancServer(f"http://127.0.0.1:{http_port}", process)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"Orthanc exited at start-up: {(workdir / 'orthanc.log').read_text()}")
        try:
            if requests.get(f"{server.base}/system", timeout=1).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.1)
    server.stop()
    pytest.fail("Orthanc did not answer within 30 s")
