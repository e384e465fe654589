"""Write a random checkpoint in exactly the published CXR-LLaVA v2 on-disk layout.

`tiny` (default): a few hundred kB, for tests. `full_size`: 7B-shaped (about 14 GB bf16), for
the GPU benchmark; written one shard at a time, each tensor created once. Either way the
weights are random: the model's output is MEANINGLESS.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from safetensors.torch import save_file

from cds_service.inference.cxr_llava.config import parse_config
from cds_service.inference.cxr_llava.identity import MARKER_FILE
from cds_service.inference.cxr_llava.model import build_empty
from cds_service.inference.cxr_llava.prompt import (
    DIFFERENTIAL_REQUEST,
    REPORT_REQUEST,
    SYSTEM_TEXT,
)
from cds_service.inference.cxr_llava.weights import INDEX_FILE, Entry, published_layout

log = logging.getLogger(__name__)
TINY_MODEL_ID = "cxr-cds/tiny-random-cxr-llava (meaningless output)"
FULL_MODEL_ID = "cxr-cds/random-7b-cxr-llava (meaningless output)"
SHARDS = 3
TOKENIZER_VOCAB = 384
_CORPUS = (
    SYSTEM_TEXT,
    REPORT_REQUEST,
    DIFFERENTIAL_REQUEST,
    "[INST] <<SYS>> <</SYS>> [/INST]",
    "The heart size is normal. The lungs are clear. No pleural effusion or pneumothorax.",
    "Small left pleural effusion with adjacent atelectasis. Mild cardiomegaly.",
    "Right lower lobe consolidation, possibly pneumonia. No pulmonary edema.",
    "Possible differential diagnoses include pneumonia, atelectasis and pulmonary edema.",
)


def vision_section(full_size: bool) -> dict[str, Any]:
    if full_size:
        return {"image_size": 512, "layers": 24, "patch_size": 16, "width": 1024}
    return {"image_size": 64, "layers": 2, "patch_size": 16, "width": 128}


def llama_section(full_size: bool, vocab_size: int) -> dict[str, Any]:
    dims = (
        {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
         "max_position_embeddings": 4096}
        if full_size
        else {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": vocab_size,
              "max_position_embeddings": 512}
    )  # fmt: skip
    return {
        "_name_or_path": "meta-llama/Llama-2-7b-chat-hf",
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        **dims,
    }


def config_json(full_size: bool, vocab_size: int) -> dict[str, Any]:
    """The published config schema (custom class names kept for fidelity, never imported)."""
    vision = vision_section(full_size)
    return {
        "architectures": ["CXRLLAVAModel"],
        "auto_map": {
            "AutoConfig": "configuration_cxr_llava.CXRLLAVAConfig",
            "AutoModel": "modeling_cxr_llava.CXRLLAVAModel",
        },
        "model_type": "CXR-LLAVA",
        "clip_vision_cfg": vision,
        "clip_embed_dim": 128 if full_size else 32,
        "clip_quick_gelu": False,
        "clip_precision": "bf16",
        "image_preprocess_cfg": {"mean": 0.5518136078431373, "std": 0.3821719215686275},
        "mm_projector_dim": vision["width"],
        "projector_precision": "bf16",
        "llama": llama_section(full_size, vocab_size),
        "llama_precision": "bf16",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.36.2",
    }


def train_tokenizer(vocab_size: int = TOKENIZER_VOCAB) -> bytes:
    """A small Llama-style SentencePiece model (BPE, byte fallback, <unk>/<s>/</s> = 0/1/2)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 10),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def write_tokenizer(folder: Path) -> int:
    """tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json,
    added_tokens.json; returns the vocabulary size."""
    from transformers import LlamaTokenizer

    data = train_tokenizer()
    (folder / "tokenizer.model").write_bytes(data)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(data)
        try:
            # As Llama 2's own tokenizer.json: BOS prepended by the post-processor, legacy
            # SentencePiece handling of text after special tokens.
            converted = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True, legacy=True)
            converted.save_pretrained(tmp)
            (folder / "tokenizer.json").write_bytes((Path(tmp) / "tokenizer.json").read_bytes())
        except (ImportError, ValueError, OSError) as exc:  # conversion needs protobuf
            log.warning("no tokenizer.json written (%s); the loader reads tokenizer.model", exc)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    tokenizer_config: dict[str, Any] = {
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "added_tokens.json").write_text("{}")
    return int(spm.SentencePieceProcessor(model_proto=data).get_piece_size())


def _is_norm(name: str) -> bool:
    return name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight")) or (
        name.endswith(("norm.weight", "layernorm.weight"))
    )


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if _is_norm(name):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    scale = 0.02 if len(shape) > 1 else 0.01
    return scale * torch.randn(shape, generator=gen)


def _shards(layout: dict[str, Entry]) -> list[list[str]]:
    names = list(layout)
    sizes = [max(1, int(torch.Size(layout[n].shape).numel())) for n in names]
    budget = sum(sizes) / SHARDS
    shards: list[list[str]] = [[]]
    filled = 0
    for name, size in zip(names, sizes, strict=True):
        if filled >= budget * len(shards) and len(shards) < SHARDS:
            shards.append([])
        shards[-1].append(name)
        filled += size
    while len(shards) < SHARDS:
        shards.append([shards[-2].pop()])
    return shards


class _RandomPool:
    """Full size: slices of one pool of random values (fast; never zeros), not 7e9 draws."""

    def __init__(self, gen: torch.Generator, size: int = 1 << 24) -> None:
        self.values = torch.randn(size, generator=gen)
        self.offset = 0

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        count = int(torch.Size(shape).numel())
        repeats = -(-(self.offset % 4099 + count) // self.values.numel())
        flat = self.values.repeat(repeats)[self.offset % 4099 : self.offset % 4099 + count]
        self.offset += 7919
        scale = 0.1 if _is_norm(name) else (0.02 if len(shape) > 1 else 0.01)
        base = 1.0 if _is_norm(name) else 0.0
        return (base + scale * flat).reshape(shape)


def _shard_tensors(
    names: list[str], layout: dict[str, Entry], gen: torch.Generator, pool: _RandomPool | None
) -> Iterator[tuple[str, torch.Tensor]]:
    for name in names:
        shape = layout[name].shape
        tensor = pool.tensor(name, shape) if pool else _random_tensor(name, shape, gen)
        yield name, tensor.to(torch.bfloat16)


def make_checkpoint(folder: str | Path, *, full_size: bool = False, seed: int = 0) -> Path:
    """Write the random checkpoint; returns the folder."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(root)
    raw = config_json(full_size, vocab)
    (root / "config.json").write_text(json.dumps(raw, indent=2))
    (root / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2)
    )
    config = parse_config(raw)
    skeleton = build_empty(config)
    shapes = {name: tuple(p.shape) for name, p in skeleton.state_dict().items()}
    layout = published_layout(shapes, config.vision.width, config.vision.embed_dim)
    gen = torch.Generator().manual_seed(seed)
    pool = _RandomPool(gen) if full_size else None
    weight_map: dict[str, str] = {}
    total = 0
    for number, names in enumerate(_shards(layout), start=1):
        file_name = f"model-{number:05d}-of-{SHARDS:05d}.safetensors"
        tensors = dict(_shard_tensors(names, layout, gen, pool))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(root / file_name), metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(names, file_name))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (root / INDEX_FILE).write_text(json.dumps(index, indent=2))
    marker = {
        "model_id": FULL_MODEL_ID if full_size else TINY_MODEL_ID,
        "revision": f"random-seed-{seed}",
        "tiny": True,
        "note": "random weights written by cxr-cds model make-tiny: output is meaningless",
    }
    (root / MARKER_FILE).write_text(json.dumps(marker, indent=2))
    return root
