"""ReportWriter for stock transformers image-text-to-text checkpoints (e.g. MedGemma, llava-hf).

Loaded from a local folder with AutoProcessor + AutoModelForImageTextToText: safetensors only,
never `trust_remote_code`. The prompt goes through the processor's own chat template.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cds_service.errors import ConfigurationError
from cds_service.inference.base import ReportRequest, Task, WrittenReport
from cds_service.inference.cxr_llava.identity import weights_version
from cds_service.results import ModelInfo

log = logging.getLogger(__name__)

REQUESTS: dict[Task, str] = {
    "report": (
        "Write a radiologic report on the given chest radiograph, including information about "
        "atelectasis, cardiomegaly, consolidation, pulmonary edema, pleural effusion, and "
        "pneumothorax."
    ),
    "differential": "What are the possible differential diagnoses for this patient?",
}


def hf_model_id(folder: Path) -> str:
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"{folder}: no readable config.json ({exc})") from exc
    name = raw.get("_name_or_path") if isinstance(raw, dict) else None
    return str(name) if isinstance(name, str) and name and "/" in name else folder.name


def request_text(request: ReportRequest) -> str:
    if request.task == "ask":
        return (request.question or "").strip()
    return REQUESTS[request.task]


class HfVlmReportWriter:
    """Greedy generation, one padded batch per call."""

    def __init__(self, model: Any, processor: Any, info: ModelInfo, max_new_tokens: int) -> None:
        self._model = model
        self._processor = processor
        self.model = info
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_folder(
        cls, folder: Path, *, device: str = "auto", max_new_tokens: int = 512
    ) -> HfVlmReportWriter:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from cds_service.inference.device import pick_device

        weights = sorted(p.name for p in folder.glob("*.safetensors"))
        if not weights:
            raise ConfigurationError(
                f"{folder}: no .safetensors weights (pickled .bin files are never loaded)"
            )
        target = pick_device(device)
        dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
        try:
            processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(
                folder,
                dtype=dtype,
                local_files_only=True,
                use_safetensors=True,
                trust_remote_code=False,
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigurationError(f"{folder}: cannot load as image-text-to-text: {exc}") from exc
        model.to(target)  # type: ignore[arg-type]  # transformers types .to oddly
        model.eval()
        processor.tokenizer.padding_side = "left"
        info = ModelInfo(model_id=hf_model_id(folder), version=weights_version(folder))
        return cls(model, processor, info, max_new_tokens)

    def write_reports(self, requests: Sequence[ReportRequest]) -> list[str]:
        return [report.text for report in self.write_detailed_reports(requests)]

    def _eos_ids(self) -> set[int]:
        eos = getattr(self._model.generation_config, "eos_token_id", None)
        if eos is None:
            return set()
        return {int(e) for e in eos} if isinstance(eos, list | tuple) else {int(eos)}

    def write_detailed_reports(self, requests: Sequence[ReportRequest]) -> list[WrittenReport]:
        """Texts, each marked truncated when it used every allowed token without an EOS."""
        import torch
        from PIL import Image

        if not requests:
            return []
        images = [Image.fromarray(r.image, mode="L").convert("RGB") for r in requests]
        texts = [
            self._processor.apply_chat_template(
                [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": request_text(r)}],
                    }
                ],
                add_generation_prompt=True,
                tokenize=False,
            )
            for r in requests
        ]
        inputs = self._processor(images=images, text=texts, return_tensors="pt", padding=True)
        inputs = inputs.to(self._model.device)
        with torch.inference_mode():
            out = self._model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False
            )
        new = out[:, inputs["input_ids"].shape[1] :]
        decoded = self._processor.batch_decode(new, skip_special_tokens=True)
        eos = self._eos_ids()
        reports = []
        for row, text in zip(new.tolist(), decoded, strict=True):
            cut = len(row) >= self.max_new_tokens and not eos.intersection(row)
            reports.append(WrittenReport(str(text).strip(), truncated=cut, new_tokens=len(row)))
        return reports
