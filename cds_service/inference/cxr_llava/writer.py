"""ReportWriter for a CXR-LLaVA v2 checkpoint: preprocessing, batched generation, the engine."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch

from cds_service.imaging.preprocess import model_input
from cds_service.inference.base import ReportRequest, WrittenReport
from cds_service.inference.cxr_llava.generate import (
    Sampling,
    generate_tokens,
    left_pad,
    splice,
)
from cds_service.inference.cxr_llava.loader import LoadedCheckpoint
from cds_service.inference.cxr_llava.static_decode import StaticDecoder
from cds_service.inference.engine import (
    BatchEngine,
    BatchResult,
    EngineMetrics,
    process_peak_memory,
)
from cds_service.results import ModelInfo

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 512
TINY_BANNER = (
    "TINY RANDOM MODEL - MEANINGLESS OUTPUT. Random weights for testing the pipeline; "
    "this text is not an interpretation of the image."
)
WARMUP_IMAGE_SIDE = 64


def model_info_for(ckpt: LoadedCheckpoint) -> ModelInfo:
    """A tiny (random) checkpoint is marked like the simulated backend: never a real result."""
    if ckpt.tiny:
        return ModelInfo(
            model_id="tiny-random-cxr-llava-meaningless", version=ckpt.version, simulated=True
        )
    return ModelInfo(model_id=ckpt.model_id, version=ckpt.version)


class CxrLlavaReportWriter:
    """Serves `write_reports` through a BatchEngine that owns the model's device."""

    def __init__(
        self,
        ckpt: LoadedCheckpoint,
        *,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        max_batch_size: int = 8,
        timeout_s: float = 600.0,
        sampling: Sampling | None = None,
        warmup: bool | None = None,
        ignore_eos: bool = False,
        decoder: str = "auto",
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        self.ckpt = ckpt
        self.model: ModelInfo = model_info_for(ckpt)
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling or Sampling()
        self.ignore_eos = ignore_eos
        on_cuda = ckpt.device.type == "cuda"
        if decoder not in ("auto", "dynamic", "static"):
            raise ValueError("decoder must be auto, dynamic or static")
        # auto: static cache + CUDA graphs on CUDA; the dynamic cache on CPU.
        self.static = (
            StaticDecoder(ckpt.model, cuda_graphs=on_cuda)
            if decoder == "static" or (decoder == "auto" and on_cuda)
            else None
        )
        self.engine: BatchEngine[ReportRequest, WrittenReport] = BatchEngine(
            self.run_batch,
            max_batch_size=max_batch_size,
            timeout_s=timeout_s,
            peak_memory=_cuda_peak if on_cuda else process_peak_memory,
            release_memory=self._release_memory,
            name="cxr-llava",
        )
        blank = np.full((WARMUP_IMAGE_SIDE, WARMUP_IMAGE_SIDE), 128, dtype=np.uint8)
        # Warm-up (allocator, kernels, the batch-1 CUDA graph) pays on CUDA; on CPU it would
        # only delay start-up by a whole report.
        warm = on_cuda if warmup is None else warmup
        self.engine.start([ReportRequest(blank)] if warm else [])

    def pixels(self, requests: Sequence[ReportRequest]) -> torch.Tensor:
        cfg = self.ckpt.config
        arrays = [
            model_input(r.image, cfg.image_mean, cfg.image_std, size=cfg.vision.image_size)
            for r in requests
        ]
        return torch.from_numpy(np.stack(arrays)).to(self.ckpt.device, self.ckpt.dtype)

    @torch.inference_mode()
    def run_batch(self, requests: list[ReportRequest]) -> BatchResult[WrittenReport]:
        model, tokenizer = self.ckpt.model, self.ckpt.tokenizer
        images = model.encode_images(self.pixels(requests))
        rows = [
            splice(model, tokenizer.prompt_ids(r.task, r.question), image)
            for r, image in zip(requests, images, strict=True)
        ]
        embeds, mask = left_pad(rows)
        generate = (
            self.static.generate if self.static is not None else partial(generate_tokens, model)
        )
        tokens = generate(
            embeds,
            mask,
            max_new_tokens=self.max_new_tokens,
            eos_id=tokenizer.eos_id,
            sampling=self.sampling,
            ignore_eos=self.ignore_eos,
        )
        reports = []
        for row in tokens:
            text = tokenizer.decode(row)
            if self.ckpt.tiny:
                text = f"{TINY_BANNER}\n\n{text}"
            cut = hit_token_limit(row, self.max_new_tokens, tokenizer.eos_id)
            reports.append(WrittenReport(text, truncated=cut, new_tokens=len(row)))
        return BatchResult(reports, new_tokens=sum(len(t) for t in tokens))

    def write_reports(self, requests: Sequence[ReportRequest]) -> list[str]:
        return [report.text for report in self.write_detailed_reports(requests)]

    def write_detailed_reports(self, requests: Sequence[ReportRequest]) -> list[WrittenReport]:
        return self.engine.run(list(requests))

    def metrics(self) -> EngineMetrics:
        return self.engine.metrics()

    def _release_memory(self) -> None:
        if self.static is not None:
            self.static.release()
        if self.ckpt.device.type == "cuda":
            torch.cuda.empty_cache()

    def close(self) -> None:
        self.engine.stop()


def hit_token_limit(row: list[int], max_new_tokens: int, eos_id: int) -> bool:
    """Generation used every allowed token and never produced `</s>`: the text is cut off."""
    return len(row) >= max_new_tokens and eos_id not in row


def _cuda_peak() -> int:
    return int(torch.cuda.max_memory_allocated())
