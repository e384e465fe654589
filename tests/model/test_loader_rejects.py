"""The loader refuses folders that are not the published layout, with lists of what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cds_service.inference.base import ReportRequest
from cds_service.inference.cxr_llava.config import CheckpointError
from cds_service.inference.cxr_llava.loader import LoadedCheckpoint, load_checkpoint
from cds_service.inference.cxr_llava.writer import CxrLlavaReportWriter

INDEX = "model.safetensors.index.json"


def _copy(tiny_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, folder)
    return folder


def _rewrite_shard(folder: Path, change: dict[str, torch.Tensor | None]) -> None:
    """Replace (tensor) or drop (None) tensors in whichever shard holds them; fix the index."""
    index = json.loads((folder / INDEX).read_text())
    weight_map = index["weight_map"]
    shard = weight_map.get(next(iter(change))) or sorted(set(weight_map.values()))[0]
    with safe_open(str(folder / shard), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    for name, tensor in change.items():
        if tensor is None:
            tensors.pop(name)
            weight_map.pop(name)
        else:
            tensors[name] = tensor
            weight_map[name] = shard
    save_file(tensors, str(folder / shard))
    (folder / INDEX).write_text(json.dumps(index))


def test_missing_unexpected_and_misshapen_tensors_are_all_listed(
    tiny_dir: Path, tmp_path: Path
) -> None:
    folder = _copy(tiny_dir, tmp_path)
    _rewrite_shard(folder, {"lm_head.weight": None})
    _rewrite_shard(
        folder,
        {
            "mm_projector.weight": torch.zeros(3, 3, dtype=torch.bfloat16),
            "vision_tower.attn_mask": torch.zeros(2, dtype=torch.bfloat16),
        },
    )
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(folder, device="cpu")
    message = str(caught.value)
    assert "missing tensors (1):\n  lm_head.weight" in message
    assert "unexpected tensors (1):\n  vision_tower.attn_mask" in message
    assert "mm_projector.weight: checkpoint [3, 3], expected [64, 128]" in message


def test_a_bin_only_folder_is_refused_without_unpickling(tiny_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bin-only"
    folder.mkdir()
    for name in ("config.json", "tokenizer.model"):
        shutil.copy(tiny_dir / name, folder / name)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 pickle that must never be loaded")
    with pytest.raises(CheckpointError, match="only pickled .bin weights"):
        load_checkpoint(folder, device="cpu")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.pop("llama"), "llama is missing"),
        (lambda c: c["llama"].pop("rms_norm_eps"), "llama.rms_norm_eps is missing"),
        (lambda c: c["clip_vision_cfg"].pop("width"), "clip_vision_cfg.width is missing"),
        (lambda c: c.pop("image_preprocess_cfg"), "image_preprocess_cfg is missing"),
        (lambda c: c.update(clip_quick_gelu=True), "clip_quick_gelu"),
    ],
)
def test_config_without_required_fields_is_refused(
    tiny_dir: Path, tmp_path: Path, edit: object, message: str
) -> None:
    folder = _copy(tiny_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    edit(config)  # type: ignore[operator]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(folder, device="cpu")


def test_index_naming_a_missing_shard_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_dir, tmp_path)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="not in"):
        load_checkpoint(folder, device="cpu")


def test_writer_batches_give_the_same_greedy_text_as_one_by_one(tiny: LoadedCheckpoint) -> None:
    rng = np.random.default_rng(1)
    requests = [
        ReportRequest(rng.integers(0, 256, (70, 90), dtype=np.uint8)),
        ReportRequest(rng.integers(0, 256, (90, 70), dtype=np.uint8), "differential"),
        ReportRequest(rng.integers(0, 256, (64, 64), dtype=np.uint8), "ask", "Any effusion?"),
    ]
    batched = CxrLlavaReportWriter(tiny, max_new_tokens=10, max_batch_size=3, warmup=True)
    alone = CxrLlavaReportWriter(tiny, max_new_tokens=10, max_batch_size=1, warmup=False)
    try:
        together = batched.write_reports(requests)
        separately = [alone.write_reports([r])[0] for r in requests]
        assert batched.metrics().largest_batch == 3
    finally:
        batched.close()
        alone.close()
    assert together == separately
    assert len(set(together)) == 3


def test_static_cache_decoder_gives_the_dynamic_caches_greedy_text(
    tiny: LoadedCheckpoint,
) -> None:
    """The decoder used on CUDA (static cache, prepared 4D mask, bucketed batch) runs eagerly
    on CPU here: same tokens as the dynamic-cache path, with padding and bucket filler rows."""
    rng = np.random.default_rng(2)
    requests = [
        ReportRequest(rng.integers(0, 256, (70, 90), dtype=np.uint8)),
        ReportRequest(rng.integers(0, 256, (64, 64), dtype=np.uint8), "ask", "Is the tube ok?"),
        ReportRequest(rng.integers(0, 256, (90, 70), dtype=np.uint8), "differential"),
    ]
    results = []
    for decoder in ("dynamic", "static"):
        writer = CxrLlavaReportWriter(
            tiny, max_new_tokens=12, max_batch_size=3, warmup=False, decoder=decoder
        )
        try:
            results.append(writer.write_reports(requests))
            results.append(writer.write_reports(requests[:1]))  # another shape, reused slots
            results.append(writer.write_reports(requests))
        finally:
            writer.close()
    assert results[:3] == results[3:]
    assert results[0][0] == results[1][0] == results[2][0]
