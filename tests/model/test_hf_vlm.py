"""hf_vlm: a stock image-text-to-text checkpoint (a tiny random llava-hf model built here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from cds_service.errors import ConfigurationError
from cds_service.inference.base import ReportRequest
from cds_service.inference.cxr_llava.make_tiny import write_tokenizer
from cds_service.inference.hf_vlm import HfVlmReportWriter

TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llava-hf")
    write_tokenizer(folder)
    tokenizer = LlamaTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.pad_token = tokenizer.unk_token
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TEMPLATE,
    )
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=32, patch_size=8)  # fmt: skip
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, vocab_size=len(tokenizer),
                       max_position_embeddings=256)  # fmt: skip
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_stock_llava_checkpoint_writes_reports_batched_like_alone(llava_dir: Path) -> None:
    writer = HfVlmReportWriter.from_folder(llava_dir, device="cpu", max_new_tokens=5)
    assert writer.model.model_id == llava_dir.name and len(writer.model.version) == 12
    assert not writer.model.simulated
    rng = np.random.default_rng(0)
    requests = [
        ReportRequest(rng.integers(0, 256, (40, 50), dtype=np.uint8)),
        ReportRequest(rng.integers(0, 256, (50, 40), dtype=np.uint8), "ask", "Left effusion?"),
    ]
    together = writer.write_reports(requests)
    assert len(together) == 2 and all(isinstance(t, str) and t for t in together)
    assert together == [writer.write_reports([r])[0] for r in requests]
    assert writer.write_reports([]) == []


def test_a_folder_without_safetensors_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ConfigurationError, match="no .safetensors"):
        HfVlmReportWriter.from_folder(tmp_path, device="cpu")


def test_registry_serves_hf_vlm_from_the_settings(llava_dir: Path) -> None:
    from cds_service.config import Settings
    from cds_service.inference.registry import load_report_writer, model_info

    settings = Settings(backend="hf_vlm", model_dir=str(llava_dir))
    writer = load_report_writer(settings, device="cpu", max_new_tokens=3)
    assert writer.model == model_info(settings)
    image = np.full((40, 40), 100, dtype=np.uint8)
    assert len(writer.write_reports([ReportRequest(image, "differential")])) == 1


def test_web_tier_and_worker_agree_on_the_version_despite_stray_weight_files(
    llava_dir: Path, tmp_path: Path
) -> None:
    import shutil

    from cds_service.config import Settings
    from cds_service.inference.registry import model_info

    folder = tmp_path / "with-stray-file"
    shutil.copytree(llava_dir, folder)
    shutil.copy(folder / "model.safetensors", folder / "adapter-left-over.safetensors")
    settings = Settings(backend="hf_vlm", model_dir=str(folder))
    writer = HfVlmReportWriter.from_folder(folder, device="cpu", max_new_tokens=2)
    assert writer.model == model_info(settings)


def test_stock_checkpoint_reports_cut_at_the_token_limit_are_flagged(llava_dir: Path) -> None:
    writer = HfVlmReportWriter.from_folder(llava_dir, device="cpu", max_new_tokens=2)
    image = np.full((40, 40), 100, dtype=np.uint8)
    [report] = writer.write_detailed_reports([ReportRequest(image)])
    assert report.truncated and report.new_tokens == 2
    eos = writer._model.generation_config.eos_token_id
    writer._model.generation_config.eos_token_id = None  # cannot tell: the limit decides
    assert writer.write_detailed_reports([ReportRequest(image)])[0].truncated
    writer._model.generation_config.eos_token_id = eos
