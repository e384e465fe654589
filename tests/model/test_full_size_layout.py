"""The 7B-shaped layout make-tiny --full-size writes matches MODEL_FACTS (checked on the meta
device: no memory, no weights)."""

from __future__ import annotations

import torch

from cds_service.inference.cxr_llava.config import parse_config
from cds_service.inference.cxr_llava.make_tiny import _RandomPool, _shards, config_json
from cds_service.inference.cxr_llava.model import build_empty
from cds_service.inference.cxr_llava.weights import published_layout


def test_full_size_layout_has_the_published_shapes_and_about_7b_parameters() -> None:
    config = parse_config(config_json(full_size=True, vocab_size=32000))
    model = build_empty(config)
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    layout = published_layout(shapes, config.vision.width, config.vision.embed_dim)
    expected = {
        "vision_tower.conv1.weight": (1024, 1, 16, 16),
        "vision_tower.class_embedding": (1024,),
        "vision_tower.positional_embedding": (1025, 1024),
        "vision_tower.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
        "vision_tower.transformer.resblocks.23.mlp.c_fc.weight": (4096, 1024),
        "vision_tower.proj": (1024, 128),
        "mm_projector.weight": (4096, 1024),
        "llama.layers.31.mlp.down_proj.weight": (4096, 11008),
        "lm_head.weight": (32000, 4096),
    }
    for name, shape in expected.items():
        assert layout[name].shape == shape, name
    total = sum(int(torch.Size(e.shape).numel()) for e in layout.values())
    assert 7.0e9 < total < 7.1e9  # "about 7.05 B parameters"
    shards = _shards(layout)
    assert len(shards) == 3 and sorted(n for s in shards for n in s) == sorted(layout)


def test_full_size_random_values_are_varied_and_never_all_zero() -> None:
    pool = _RandomPool(torch.Generator().manual_seed(0), size=1000)
    first = pool.tensor("llama.layers.0.mlp.up_proj.weight", (30, 70))
    second = pool.tensor("llama.layers.0.mlp.up_proj.weight", (30, 70))
    norm = pool.tensor("llama.norm.weight", (64,))
    assert first.shape == (30, 70) and first.std() > 0.01 and not torch.equal(first, second)
    assert 0.5 < float(norm.mean()) < 1.5
