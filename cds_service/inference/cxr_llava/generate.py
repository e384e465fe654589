"""Batched generation: splice image embeddings, left-pad, prefill once, decode with a KV cache.

Left padding with an attention mask and per-row position ids makes a batched greedy run give
the same tokens as running each request alone (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from cds_service.inference.cxr_llava.model import CACHE_KWARG, CxrLlava
from cds_service.inference.cxr_llava.prompt import IMAGE_TOKEN

GREEDY_BELOW = 0.001  # the published code: temperature <= 0.001 means greedy


@dataclass(frozen=True)
class Sampling:
    """Greedy by default; temperature/top_p only on request (published defaults 0.2/0.8)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_BELOW

    def __post_init__(self) -> None:
        if not (0.0 <= self.temperature <= 5.0 and 0.0 < self.top_p <= 1.0):
            raise ValueError("temperature must be in [0, 5] and top_p in (0, 1]")


def splice(model: CxrLlava, ids: list[int], image: torch.Tensor) -> torch.Tensor:
    """Token embeddings with the IMAGE_TOKEN position replaced by the image's [N, H] rows."""
    if ids.count(IMAGE_TOKEN) != 1:
        raise ValueError("a prompt needs exactly one image placeholder")
    cut = ids.index(IMAGE_TOKEN)
    device = image.device
    before = model.embed_tokens(torch.tensor(ids[:cut], device=device, dtype=torch.long))
    after = model.embed_tokens(torch.tensor(ids[cut + 1 :], device=device, dtype=torch.long))
    return torch.cat([before, image.to(before.dtype), after], dim=0)


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[L_i, H] rows -> embeddings [B, L, H] (zeros on the left) and mask [B, L]."""
    length = max(row.shape[0] for row in rows)
    first = rows[0]
    embeds = first.new_zeros((len(rows), length, first.shape[1]))
    mask = torch.zeros((len(rows), length), dtype=torch.long, device=first.device)
    for i, row in enumerate(rows):
        embeds[i, length - row.shape[0] :] = row
        mask[i, length - row.shape[0] :] = 1
    return embeds, mask


def seeded_generator(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    """The random generator for seeded sampling; None when greedy or unseeded."""
    if sampling.greedy or sampling.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(sampling.seed)


def pick_tokens(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None
) -> torch.Tensor:
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = sorted_probs.cumsum(dim=-1) - sorted_probs < sampling.top_p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


@torch.inference_mode()
def generate_tokens(
    model: CxrLlava,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_id: int,
    sampling: Sampling | None = None,
    ignore_eos: bool = False,
) -> list[list[int]]:
    """New token ids per row, stopped at (and without) `</s>`; `ignore_eos` forces the length."""
    sampling = sampling or Sampling()
    generator = seeded_generator(sampling, embeds.device)
    lm = model.language
    batch = embeds.shape[0]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=lm.config)
    out = lm(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{CACHE_KWARG: cache},
    )
    next_position = positions[:, -1:] + 1
    finished = torch.zeros(batch, dtype=torch.bool, device=embeds.device)
    steps: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        token = pick_tokens(out.logits[:, -1, :], sampling, generator)
        if not ignore_eos:
            token = torch.where(finished, torch.full_like(token, eos_id), token)
            finished |= token == eos_id
        steps.append(token)
        if step == max_new_tokens - 1 or (not ignore_eos and bool(finished.all())):
            break
        mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
        out = lm(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=next_position,
            use_cache=True,
            **{CACHE_KWARG: cache},
        )
        next_position = next_position + 1
    if not steps:
        return [[] for _ in range(batch)]
    return cut_at_eos(torch.stack(steps, dim=1).tolist(), eos_id, ignore_eos)


def cut_at_eos(table: list[list[int]], eos_id: int, ignore_eos: bool) -> list[list[int]]:
    """Each row's tokens up to (without) the first `</s>`; all of them when EOS is ignored."""
    if ignore_eos:
        return [[int(t) for t in row] for row in table]
    return [[int(t) for t in (row[: row.index(eos_id)] if eos_id in row else row)] for row in table]
