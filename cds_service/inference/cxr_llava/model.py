"""The CXR-LLaVA v2 network from stock transformers classes.

Vision: `CLIPVisionModel` with one input channel; the final LayerNorm is applied to ALL tokens
(stock CLIP applies it only to the pooled class token) and the class token is dropped.
Projector: one `nn.Linear`. Language model: `LlamaForCausalLM` with an untied `lm_head`.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from cds_service.inference.cxr_llava.config import CxrLlavaConfig

ATTENTION = "sdpa"
# transformers 5.x renamed the forward argument `past_key_values` to `cache`.
_FORWARD_ARGS = inspect.signature(LlamaForCausalLM.forward).parameters
CACHE_KWARG = "cache" if "cache" in _FORWARD_ARGS else "past_key_values"


def clip_config(cfg: CxrLlavaConfig) -> CLIPVisionConfig:
    v = cfg.vision
    config = CLIPVisionConfig(
        num_channels=1,
        image_size=v.image_size,
        patch_size=v.patch_size,
        hidden_size=v.width,
        num_hidden_layers=v.layers,
        num_attention_heads=v.heads,
        intermediate_size=v.mlp_width,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
    )
    config._attn_implementation = ATTENTION
    return config


def llama_config(cfg: CxrLlavaConfig) -> LlamaConfig:
    fields = {k: v for k, v in cfg.llama.items() if not k.startswith("_")}
    for key in ("architectures", "auto_map", "model_type", "transformers_version", "torch_dtype"):
        fields.pop(key, None)
    fields["tie_word_embeddings"] = False
    config = LlamaConfig(**fields)
    config._attn_implementation = ATTENTION
    return config


class CxrLlava(nn.Module):
    """Image -> 1,024 projected tokens spliced into a Llama-2 prompt."""

    def __init__(self, cfg: CxrLlavaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = CLIPVisionModel(clip_config(cfg))
        self.projector = nn.Linear(cfg.projector_input, cfg.text_hidden)
        self.language = LlamaForCausalLM(llama_config(cfg))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 1, S, S] normalised pixels -> [B, num_patches, text_hidden] image embeddings."""
        tower = self.vision
        hidden = tower(pixel_values=pixels.to(self.projector.weight.dtype)).last_hidden_state
        hidden = tower.post_layernorm(hidden)[:, 1:, :]
        return self.projector(hidden)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        embedding: nn.Embedding = self.language.model.embed_tokens
        return embedding(ids)

    def restore_buffers(self, device: torch.device) -> None:
        """Recompute non-persistent buffers after building the module on the meta device."""
        emb = self.vision.embeddings
        emb.position_ids = nn.Buffer(
            torch.arange(emb.num_positions, device=device).expand((1, -1)), persistent=False
        )
        with torch.device(device):
            self.language.model.rotary_emb = LlamaRotaryEmbedding(self.language.config)


def build_empty(cfg: CxrLlavaConfig) -> CxrLlava:
    """The module on the meta device: parameters get assigned from the checkpoint."""
    with torch.device("meta"):
        return CxrLlava(cfg)
