"""An independent, straightforward CXR-LLaVA v2 in plain torch, written from MODEL_FACTS.md.

It reads the raw published tensors by their published names and shares no code with
cds_service: conv patch embedding, class token, learned positions, ln_pre, pre-norm blocks
with fused qkv and exact GELU, ln_post on all tokens, class token dropped, linear projector,
then a Llama decoder (RMSNorm, rotary with rotate-half, SwiGLU, untied lm_head).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

Weights = dict[str, torch.Tensor]


def read_raw(folder: Path) -> Weights:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    weights: Weights = {}
    for file_name in sorted(set(index.values())):
        with safe_open(str(folder / file_name), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118
                weights[name] = handle.get_tensor(name).float()
    return weights


def _ln(x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], w[name + ".weight"], w[name + ".bias"], eps=1e-5)


def _linear(x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
    out = x @ w[name + ".weight"].T
    return out + w[name + ".bias"] if name + ".bias" in w else out


def vision(pixels: torch.Tensor, w: Weights, layers: int, heads: int) -> torch.Tensor:
    conv = w["vision_tower.conv1.weight"]
    x = F.conv2d(pixels, conv, stride=conv.shape[-1]).flatten(2).transpose(1, 2)
    cls = w["vision_tower.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + w["vision_tower.positional_embedding"]
    x = _ln(x, w, "vision_tower.ln_pre")
    batch, tokens, width = x.shape
    head = width // heads
    for i in range(layers):
        p = f"vision_tower.transformer.resblocks.{i}."
        h = _ln(x, w, p + "ln_1")
        qkv = h @ w[p + "attn.in_proj_weight"].T + w[p + "attn.in_proj_bias"]
        q, k, v = (t.view(batch, tokens, heads, head).transpose(1, 2) for t in qkv.chunk(3, -1))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head), dim=-1) @ v
        x = x + _linear(att.transpose(1, 2).reshape(batch, tokens, width), w, p + "attn.out_proj")
        h = _ln(x, w, p + "ln_2")
        x = x + _linear(F.gelu(_linear(h, w, p + "mlp.c_fc")), w, p + "mlp.c_proj")
    x = _ln(x, w, "vision_tower.ln_post")[:, 1:]
    return _linear(x, w, "mm_projector")


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def llama_logits(embeds: torch.Tensor, w: Weights, cfg: dict) -> torch.Tensor:
    """embeds [T, H] (one sequence, no padding) -> logits [T, V]."""
    tokens, hidden = embeds.shape
    heads, kv_heads = (
        cfg["num_attention_heads"],
        cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
    )
    head = hidden // heads
    eps = cfg["rms_norm_eps"]
    theta = cfg.get("rope_theta", 10000.0)
    inv = 1.0 / theta ** (torch.arange(0, head, 2, dtype=torch.float32) / head)
    angles = torch.outer(torch.arange(tokens, dtype=torch.float32), inv)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    causal = torch.full((tokens, tokens), float("-inf")).triu(1)
    x = embeds
    for i in range(cfg["num_hidden_layers"]):
        p = f"llama.layers.{i}."
        h = _rms(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(tokens, heads, head).transpose(0, 1)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(tokens, kv_heads, head).transpose(0, 1)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(tokens, kv_heads, head).transpose(0, 1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        k = k.repeat_interleave(heads // kv_heads, dim=0)
        v = v.repeat_interleave(heads // kv_heads, dim=0)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head) + causal
        att = (torch.softmax(scores, -1) @ v).transpose(0, 1).reshape(tokens, hidden)
        x = x + att @ w[p + "self_attn.o_proj.weight"].T
        h = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
        x = x + gate @ w[p + "mlp.down_proj.weight"].T
    return _rms(x, w["llama.norm.weight"], eps) @ w["lm_head.weight"].T


def prompt_embeds(
    ids: list[int], image: torch.Tensor, w: Weights, image_token: int
) -> torch.Tensor:
    table = w["llama.embed_tokens.weight"]
    cut = ids.index(image_token)
    return torch.cat([table[ids[:cut]], image, table[ids[cut + 1 :]]], dim=0)


def greedy(embeds: torch.Tensor, w: Weights, cfg: dict, steps: int, eos: int) -> list[int]:
    """Recompute the whole sequence each step (no cache): slow, obviously right."""
    out: list[int] = []
    table = w["llama.embed_tokens.weight"]
    for _ in range(steps):
        token = int(llama_logits(embeds, w, cfg)[-1].argmax())
        if token == eos:
            break
        out.append(token)
        embeds = torch.cat([embeds, table[token][None]], dim=0)
    return out
