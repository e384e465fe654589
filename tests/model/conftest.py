"""One tiny random checkpoint per test session, written by `make-tiny` into a temp folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from cds_service.inference.cxr_llava.loader import LoadedCheckpoint, load_checkpoint
from cds_service.inference.cxr_llava.make_tiny import make_checkpoint


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny-cxr-llava"))


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path) -> LoadedCheckpoint:
    return load_checkpoint(tiny_dir, device="cpu")
