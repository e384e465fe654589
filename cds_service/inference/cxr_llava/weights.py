"""Published tensor names <-> our module names, checked against the checkpoint's own index.

The published checkpoint stores open_clip names for the vision tower (`vision_tower.*`, fused
qkv `in_proj_weight`), `mm_projector.*`, `llama.*` for the decoder and `lm_head.weight`.
Only safetensors are read; a folder with only pickled `.bin` weights is refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from cds_service.inference.cxr_llava.config import CheckpointError
from cds_service.inference.cxr_llava.identity import INDEX_FILE, SINGLE_FILE

log = logging.getLogger(__name__)

LISTED = 15  # names shown per category in an error message
_VISION = "vision_tower."
_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_VISION_TOP = {
    "conv1.weight": "vision.embeddings.patch_embedding.weight",
    "class_embedding": "vision.embeddings.class_embedding",
    "positional_embedding": "vision.embeddings.position_embedding.weight",
    "ln_pre.weight": "vision.pre_layrnorm.weight",
    "ln_pre.bias": "vision.pre_layrnorm.bias",
    "ln_post.weight": "vision.post_layernorm.weight",
    "ln_post.bias": "vision.post_layernorm.bias",
}
UNUSED_PROJ = "vision_tower.proj"  # open_clip's contrastive projection; not used for text


@dataclass(frozen=True)
class Entry:
    """One published tensor: its shape and the module parameters it fills (qkv: three)."""

    shape: tuple[int, ...]
    targets: tuple[str, ...]


def _vision_targets(ours: str) -> tuple[str, str] | None:
    """Our vision parameter name -> (published name, qkv part or '')."""
    for published, mine in _VISION_TOP.items():
        if mine == ours:
            return _VISION + published, ""
    prefix = "vision.encoder.layers."
    if not ours.startswith(prefix):
        return None
    layer, rest = ours[len(prefix) :].split(".", 1)
    block = f"{_VISION}transformer.resblocks.{layer}."
    for part in ("q", "k", "v"):
        if rest.startswith(f"self_attn.{part}_proj."):
            kind = rest.rsplit(".", 1)[1]  # weight or bias
            return f"{block}attn.in_proj_{kind}", part
    for published, mine in _BLOCK.items():
        if rest.startswith(mine + "."):
            return block + published + rest[len(mine) :], ""
    return None


def published_name(ours: str) -> tuple[str, str]:
    """Map one of our parameter names to its published name (and qkv part for fused ones)."""
    if ours.startswith("language.model."):
        return "llama." + ours[len("language.model.") :], ""
    if ours == "language.lm_head.weight":
        return "lm_head.weight", ""
    if ours.startswith("projector."):
        return "mm_projector." + ours[len("projector.") :], ""
    mapped = _vision_targets(ours)
    if mapped is None:
        raise CheckpointError(f"no published name for parameter {ours}")
    return mapped


def published_layout(
    shapes: dict[str, tuple[int, ...]], vision_width: int, clip_embed_dim: int
) -> dict[str, Entry]:
    """Every published tensor name with its expected shape, from our modules' shapes."""
    layout: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for ours, shape in shapes.items():
        name, _part = published_name(ours)
        layout.setdefault(name, []).append((ours, shape))
    entries: dict[str, Entry] = {}
    for name, parts in layout.items():
        if len(parts) == 1:
            entries[name] = Entry(parts[0][1], (parts[0][0],))
            continue
        order = {"q": 0, "k": 1, "v": 2}
        parts.sort(key=lambda item: order[item[0].split("self_attn.")[1][0]])
        rows = sum(shape[0] for _, shape in parts)
        entries[name] = Entry((rows, *parts[0][1][1:]), tuple(ours for ours, _ in parts))
    entries[UNUSED_PROJ] = Entry((vision_width, clip_embed_dim), ())
    return entries


def weight_files(folder: Path) -> dict[str, str]:
    """Published tensor name -> file name, from the index (or the single safetensors file)."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: unreadable index ({exc})") from exc
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map is not an object")
        for file_name in set(weight_map.values()):
            if "/" in file_name or not (folder / file_name).is_file():
                raise CheckpointError(f"{index} names {file_name!r}, which is not in {folder}")
        return {str(k): str(v) for k, v in weight_map.items()}
    if (folder / SINGLE_FILE).is_file():
        with safe_open(str(folder / SINGLE_FILE), framework="pt") as handle:
            return dict.fromkeys(handle.keys(), SINGLE_FILE)
    if any(folder.glob("*.bin")):
        raise CheckpointError(
            f"{folder} holds only pickled .bin weights; they are never loaded (unpickling runs "
            "code). Fetch the safetensors files (`cxr-cds model fetch`)."
        )
    raise CheckpointError(f"{folder}: no {INDEX_FILE} or {SINGLE_FILE}")


def stored_shapes(folder: Path, files: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """Shapes read from the safetensors headers (no tensor data is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file_name in sorted(set(files.values())):
        with safe_open(str(folder / file_name), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                if files.get(name) == file_name:
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def _listed(title: str, items: list[str]) -> str:
    shown = "\n  ".join(items[:LISTED])
    more = f"\n  ... and {len(items) - LISTED} more" if len(items) > LISTED else ""
    return f"{title} ({len(items)}):\n  {shown}{more}"


def verify_layout(expected: dict[str, Entry], stored: dict[str, tuple[int, ...]]) -> None:
    """Raise CheckpointError listing missing, unexpected and wrongly shaped tensors."""
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    mismatched = sorted(
        f"{name}: checkpoint {list(stored[name])}, expected {list(expected[name].shape)}"
        for name in set(expected) & set(stored)
        if tuple(stored[name]) != expected[name].shape
    )
    problems = [
        _listed(title, items)
        for title, items in (
            ("missing tensors", missing),
            ("unexpected tensors", unexpected),
            ("tensors with the wrong shape", mismatched),
        )
        if items
    ]
    if problems:
        raise CheckpointError(
            "the checkpoint does not match the CXR-LLaVA v2 layout:\n" + "\n".join(problems)
        )


def iter_state_dict(
    folder: Path,
    files: dict[str, str],
    expected: dict[str, Entry],
    device: torch.device,
    dtype: torch.dtype,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (our name, tensor on device) one published tensor at a time."""
    for file_name in sorted(set(files.values())):
        with safe_open(str(folder / file_name), framework="pt", device="cpu") as handle:
            for name in sorted(n for n, f in files.items() if f == file_name):
                entry = expected[name]
                if not entry.targets:
                    continue
                tensor = handle.get_tensor(name).to(device=device, dtype=dtype)
                if len(entry.targets) == 1:
                    yield entry.targets[0], tensor
                    continue
                for target, part in zip(entry.targets, tensor.chunk(3, dim=0), strict=True):
                    yield target, part.contiguous()
