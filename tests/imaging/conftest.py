"""Fixtures for the imaging tests: the project's seed films and the NEMA RG1 film encodings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from tests.conftest import free_port
from tests.imaging.orthanc import OrthancServer, start_orthanc

SEED_DICOM = Path(__file__).resolve().parents[2] / "ehr_sandbox" / "seed" / "dicom"
MEAN = 0.5518136078431373
STD = 0.3821719215686275


def seed_file(name: str) -> Path:
    return SEED_DICOM / name


def rg1_file(name: str) -> Path:
    """An RG1 encoding shipped inside the pydicom-data wheel (never downloaded)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.fail(f"pydicom-data does not ship {name}: install the dev extras")
    return Path(path)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"), free_port(), free_port())
    yield server
    server.stop()
