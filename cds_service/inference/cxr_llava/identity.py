"""Which checkpoint a folder holds: id, revision, tiny marker and a sha256 over the weights.

Standard library only, so the web tier can name the model without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from cds_service.inference.cxr_llava.config import MODEL_ID, PINNED_REVISION, CheckpointError

log = logging.getLogger(__name__)
# Written by make-tiny ({"tiny": true, ...}) and by `cxr-cds model fetch` (repo id, revision
# and the downloaded files with their sizes).
MARKER_FILE = "cxr-cds-checkpoint.json"
UNVERIFIED_MODEL_ID = "unverified local checkpoint (CXR-LLaVA v2 layout)"
UNVERIFIED_REVISION = "unknown"
HASH_CACHE = ".cxr-cds-weights-sha256.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def safetensors_files(folder: Path) -> list[str]:
    """The weight files named by the index (or the single file); never .bin."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return sorted({str(v) for v in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: unreadable index ({exc})") from exc
    if (folder / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    raise CheckpointError(f"{folder}: no {INDEX_FILE} or {SINGLE_FILE} (safetensors only)")


def fetched_files(folder: Path) -> dict[str, int]:
    """Every regular file in the folder (not our own bookkeeping) with its size in bytes."""
    skip = {MARKER_FILE, HASH_CACHE}
    return {
        p.name: p.stat().st_size
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name not in skip
    }


def write_fetch_marker(folder: Path, revision: str) -> None:
    """Record what `cxr-cds model fetch` downloaded: repo id, revision, files and sizes."""
    marker = {
        "model_id": MODEL_ID,
        "revision": revision,
        "tiny": False,
        "files": fetched_files(folder),
    }
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=2), encoding="utf-8")


def _is_pinned_download(raw: dict[str, object], folder: Path) -> bool:
    """The fetch marker names the published repo at the pinned revision, and the weight files
    are still the ones downloaded (same names and sizes). We do not know the published
    weights' sha256, so this proves provenance only as far as our own download record goes."""
    files = raw.get("files")
    if raw.get("model_id") != MODEL_ID or raw.get("revision") != PINNED_REVISION:
        return False
    if not isinstance(files, dict) or not files:
        return False
    present = fetched_files(folder)
    weights = safetensors_files(folder)
    return all(present.get(name) == files.get(name) for name in weights) and all(
        present.get(str(name)) == size for name, size in files.items()
    )


def checkpoint_identity(folder: Path) -> tuple[str, str, bool]:
    """(model id, revision, tiny). The published id only for a folder our fetch marker proves
    came from the pinned revision; any other checkpoint is an unverified local one."""
    marker = folder / MARKER_FILE
    if not marker.is_file():
        return UNVERIFIED_MODEL_ID, UNVERIFIED_REVISION, False
    try:
        raw = json.loads(marker.read_text(encoding="utf-8"))
        model_id, revision, tiny = str(raw["model_id"]), str(raw["revision"]), raw.get("tiny")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{marker}: unreadable ({exc})") from exc
    if tiny is True:
        return model_id, revision, True
    if _is_pinned_download(raw, folder):
        return model_id, revision, False
    log.warning(
        "%s: not proven to be %s at %s; labelled unverified", folder, MODEL_ID, PINNED_REVISION
    )
    return UNVERIFIED_MODEL_ID, UNVERIFIED_REVISION, False


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(folder: Path, file_names: Iterable[str]) -> str:
    """sha256 over the weight files' sha256s (sorted by name); cached next to the weights."""
    names = sorted(set(file_names))
    stamp = {n: [(folder / n).stat().st_size, (folder / n).stat().st_mtime_ns] for n in names}
    cache = folder / HASH_CACHE
    try:
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if cached.get("files") == stamp:
            return str(cached["sha256"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    total = sum(size for size, _ in stamp.values())
    log.info(
        "hashing %d weight files (%.1f GB) for the model version; this takes a while "
        "once and is cached in %s",
        len(names),
        total / 1e9,
        cache.name,
    )
    combined = hashlib.sha256()
    for name in names:
        combined.update(f"{name}:{_file_digest(folder / name)}\n".encode())
    value = combined.hexdigest()
    try:
        cache.write_text(json.dumps({"files": stamp, "sha256": value}), encoding="utf-8")
    except OSError:
        log.info("cannot cache the weights hash in %s (read-only folder)", folder)
    return value


def weights_version(folder: Path) -> str:
    """The model version every tier shows: the first 12 hex digits of `weights_sha256` over
    exactly the files the index names (or the single file), never whatever else lies there."""
    return weights_sha256(folder, safetensors_files(folder))[:12]
