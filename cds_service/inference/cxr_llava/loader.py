"""Load a CXR-LLaVA v2 checkpoint folder (published layout) into our stock-parts model."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cds_service.inference.cxr_llava.config import (
    CheckpointError,
    CxrLlavaConfig,
    read_config,
)
from cds_service.inference.cxr_llava.identity import checkpoint_identity, weights_sha256
from cds_service.inference.cxr_llava.model import CxrLlava, build_empty
from cds_service.inference.cxr_llava.prompt import PromptTokenizer
from cds_service.inference.cxr_llava.weights import (
    iter_state_dict,
    published_layout,
    stored_shapes,
    verify_layout,
    weight_files,
)
from cds_service.inference.device import pick_device

log = logging.getLogger(__name__)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (as published), fp32 on CPU (bf16 matmuls are slow and inexact there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class LoadedCheckpoint:
    folder: Path
    config: CxrLlavaConfig
    model: CxrLlava
    tokenizer: PromptTokenizer
    device: torch.device
    dtype: torch.dtype
    sha256: str
    model_id: str
    revision: str
    tiny: bool

    @property
    def version(self) -> str:
        return self.sha256[:12]

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def inspect_checkpoint(folder: Path) -> tuple[CxrLlavaConfig, dict[str, str]]:
    """Read the config and verify every tensor name and shape; loads no tensor data."""
    config = read_config(folder)
    files = weight_files(folder)
    skeleton = build_empty(config)
    shapes = {name: tuple(p.shape) for name, p in skeleton.state_dict().items()}
    expected = published_layout(shapes, config.vision.width, config.vision.embed_dim)
    verify_layout(expected, stored_shapes(folder, files))
    return config, files


def load_checkpoint(
    folder: str | Path, device: str = "auto", dtype: torch.dtype | None = None
) -> LoadedCheckpoint:
    """Verify, then load. Parameters are built on the meta device and assigned once."""
    root = Path(folder)
    if not root.is_dir():
        raise CheckpointError(f"model folder {root} does not exist")
    started = time.monotonic()
    config, files = inspect_checkpoint(root)
    target = pick_device(device)
    dtype = dtype or default_dtype(target)
    tokenizer = PromptTokenizer.from_folder(root, config.bos_token_id, config.eos_token_id)
    vocab = int(config.llama["vocab_size"])
    if tokenizer.vocab_size > vocab:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} pieces > vocab {vocab}")
    model = build_empty(config)
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    expected = published_layout(shapes, config.vision.width, config.vision.embed_dim)
    state = dict(iter_state_dict(root, files, expected, target, dtype))
    model.load_state_dict(state, strict=True, assign=True)
    model.restore_buffers(target)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"parameters left unloaded: {leftover[:10]}")
    model.eval()
    model_id, revision, tiny = checkpoint_identity(root)
    sha = weights_sha256(root, files.values())
    log.info(
        "loaded %s (%s) on %s as %s in %.1f s",
        model_id,
        sha[:12],
        target,
        str(dtype).removeprefix("torch."),
        time.monotonic() - started,
    )
    return LoadedCheckpoint(
        folder=root,
        config=config,
        model=model,
        tokenizer=tokenizer,
        device=target,
        dtype=dtype,
        sha256=sha,
        model_id=model_id,
        revision=revision,
        tiny=tiny,
    )
