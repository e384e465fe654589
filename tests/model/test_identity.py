"""Which model a folder holds: only a fetch record of the pinned revision names the published
model; any other checkpoint in the published layout is labelled unverified (finding 6)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cds_service.config import Settings
from cds_service.inference.cxr_llava.config import MODEL_ID, PINNED_REVISION
from cds_service.inference.cxr_llava.identity import (
    MARKER_FILE,
    UNVERIFIED_MODEL_ID,
    checkpoint_identity,
    write_fetch_marker,
)
from cds_service.inference.registry import device_info, model_info

URL = "https://cds.example.org"


@pytest.fixture
def local_copy(tiny_dir: Path, tmp_path: Path) -> Path:
    """A checkpoint in the published layout that nobody vouches for: no marker file."""
    folder = tmp_path / "someones-checkpoint"
    shutil.copytree(tiny_dir, folder)
    (folder / MARKER_FILE).unlink()
    return folder


def test_a_folder_without_our_marker_is_an_unverified_local_checkpoint(local_copy: Path) -> None:
    assert checkpoint_identity(local_copy) == (UNVERIFIED_MODEL_ID, "unknown", False)
    settings = Settings(backend="cxr_llava", model_dir=str(local_copy), public_url=URL)
    info = model_info(settings)
    assert info.model_id == UNVERIFIED_MODEL_ID and MODEL_ID not in info.model_id
    device = device_info(settings, info)
    assert (
        "not verified" in device.manufacturer
        and "ECOFRI (model authors)" not in device.manufacturer
    )
    assert "huggingface.co" not in device.model_card_url


def test_the_fetch_record_of_the_pinned_revision_names_the_published_model(
    local_copy: Path,
) -> None:
    write_fetch_marker(local_copy, PINNED_REVISION)
    assert checkpoint_identity(local_copy) == (MODEL_ID, PINNED_REVISION, False)
    settings = Settings(backend="cxr_llava", model_dir=str(local_copy), public_url=URL)
    assert "ECOFRI" in device_info(settings, model_info(settings)).manufacturer


@pytest.mark.parametrize(
    "change", ["other-revision", "weights-replaced", "no-file-list", "unknown-repo"]
)
def test_a_marker_that_does_not_prove_the_pinned_download_is_unverified(
    local_copy: Path, change: str
) -> None:
    write_fetch_marker(local_copy, "main" if change == "other-revision" else PINNED_REVISION)
    marker = local_copy / MARKER_FILE
    raw = json.loads(marker.read_text())
    if change == "weights-replaced":
        shard = sorted(local_copy.glob("*.safetensors"))[0]
        shard.write_bytes(shard.read_bytes() + b" ")
    elif change == "no-file-list":
        del raw["files"]
    elif change == "unknown-repo":
        raw["model_id"] = "someone/else"
    marker.write_text(json.dumps(raw))
    assert checkpoint_identity(local_copy)[0] == UNVERIFIED_MODEL_ID


def test_the_tiny_marker_still_marks_random_weights(tiny_dir: Path) -> None:
    model_id, _revision, tiny = checkpoint_identity(tiny_dir)
    assert tiny and "meaningless" in model_id
