"""Read the published `config.json` of CXR-LLaVA v2 into typed settings for our model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cds_service.errors import ConfigurationError

MODEL_ID = "ECOFRI/CXR-LLAVA-v2"
PINNED_REVISION = "b2224786bb90d54b1e1291171866706cfbb44e2b"
MODEL_LICENCE = (
    "CXR-LLaVA v2 weights: CC BY-NC 4.0 plus the Llama 2 licence; research use only, "
    "not for clinical decisions."
)
# Width per attention head of the open_clip ViT (ViT-L/16: 1024 / 64 = 16 heads).
VISION_HEAD_WIDTH = 64
VISION_MLP_RATIO = 4
LLAMA_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "rms_norm_eps",
    "max_position_embeddings",
)


class CheckpointError(ConfigurationError):
    """The folder is not a usable CXR-LLaVA checkpoint; the message says what is wrong."""


@dataclass(frozen=True)
class VisionConfig:
    image_size: int
    patch_size: int
    width: int
    layers: int
    embed_dim: int  # open_clip's `proj` output width; not used by the language model

    @property
    def heads(self) -> int:
        return self.width // VISION_HEAD_WIDTH

    @property
    def mlp_width(self) -> int:
        return self.width * VISION_MLP_RATIO

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class CxrLlavaConfig:
    vision: VisionConfig
    image_mean: float
    image_std: float
    projector_input: int
    llama: dict[str, Any]

    @property
    def text_hidden(self) -> int:
        return int(self.llama["hidden_size"])

    @property
    def bos_token_id(self) -> int:
        return int(self.llama.get("bos_token_id", 1))

    @property
    def eos_token_id(self) -> int:
        eos = self.llama.get("eos_token_id", 2)
        return int(eos[0] if isinstance(eos, list) else eos)


def _need(mapping: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if key not in mapping:
        raise CheckpointError(f"config.json: {where}{key} is missing")
    value = mapping[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise CheckpointError(f"config.json: {where}{key} has the wrong type ({value!r})")
    return value


def parse_config(raw: dict[str, Any]) -> CxrLlavaConfig:
    """Validate the published config schema; raises CheckpointError naming the missing field."""
    if not isinstance(raw, dict):
        raise CheckpointError("config.json must hold a JSON object")
    clip = _need(raw, "clip_vision_cfg", "", dict)
    vision = VisionConfig(
        image_size=_need(clip, "image_size", "clip_vision_cfg.", int),
        patch_size=_need(clip, "patch_size", "clip_vision_cfg.", int),
        width=_need(clip, "width", "clip_vision_cfg.", int),
        layers=_need(clip, "layers", "clip_vision_cfg.", int),
        embed_dim=_need(raw, "clip_embed_dim", "", int),
    )
    if vision.width % VISION_HEAD_WIDTH or vision.image_size % vision.patch_size:
        raise CheckpointError("config.json: clip_vision_cfg has inconsistent sizes")
    if raw.get("clip_quick_gelu", False):
        raise CheckpointError("config.json: clip_quick_gelu=true is not the published model")
    pre = _need(raw, "image_preprocess_cfg", "", dict)
    llama = _need(raw, "llama", "", dict)
    for key in LLAMA_REQUIRED:
        _need(llama, key, "llama.", (int, float))
    projector_input = _need(raw, "mm_projector_dim", "", int)
    if projector_input != vision.width:
        raise CheckpointError(
            f"config.json: mm_projector_dim {projector_input} != vision width {vision.width}"
        )
    return CxrLlavaConfig(
        vision=vision,
        image_mean=float(_need(pre, "mean", "image_preprocess_cfg.", (int, float))),
        image_std=float(_need(pre, "std", "image_preprocess_cfg.", (int, float))),
        projector_input=projector_input,
        llama=dict(llama),
    )


def read_config(folder: Path) -> CxrLlavaConfig:
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{folder}: no config.json (not a CXR-LLaVA checkpoint)") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    return parse_config(raw)
