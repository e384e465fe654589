"""Our stock-parts model == an independent plain-torch reference, on published-format files."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import save_file

from cds_service.inference.cxr_llava.generate import generate_tokens, left_pad, splice
from cds_service.inference.cxr_llava.loader import LoadedCheckpoint, load_checkpoint
from cds_service.inference.cxr_llava.prompt import IMAGE_TOKEN, chat_text
from tests.model import reference

SYSTEM = (
    "You are a helpful radiologist. Try to interpret chest x ray image and answer to the "
    "question that user provides."
)
REPORT = (
    "Write a radiologic report on the given chest radiograph, including information about "
    "atelectasis, cardiomegaly, consolidation, pulmonary edema, pleural effusion, and "
    "pneumothorax."
)


def _our_logits(ckpt: LoadedCheckpoint, ids: list[int], pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        image = ckpt.model.encode_images(pixels)[0]
        embeds = splice(ckpt.model, ids, image)[None]
        return ckpt.model.language(inputs_embeds=embeds).logits[0]


def test_logits_match_the_reference_to_1e5(tiny: LoadedCheckpoint, tiny_dir: Path) -> None:
    raw = reference.read_raw(tiny_dir)
    cfg = json.loads((tiny_dir / "config.json").read_text())
    size = cfg["clip_vision_cfg"]["image_size"]
    pixels = torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(3))
    ids = tiny.tokenizer.prompt_ids("report")
    ours = _our_logits(tiny, ids, pixels)
    layers, heads = cfg["clip_vision_cfg"]["layers"], cfg["clip_vision_cfg"]["width"] // 64
    image = reference.vision(pixels, raw, layers, heads)[0]
    with torch.inference_mode():
        mine = tiny.model.encode_images(pixels)[0]
    assert (mine - image).abs().max().item() < 1e-5
    embeds = reference.prompt_embeds(ids, image, raw, IMAGE_TOKEN)
    theirs = reference.llama_logits(embeds, raw, cfg["llama"])
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-5
    assert ours.abs().max().item() > 1e-3  # not trivially zero


# -- a checkpoint written by someone else's script ----------------------------------------
def _independent_writer(folder: Path) -> dict:
    """Writes the published layout with no cds_service code: 2 shards, own tokenizer."""
    folder.mkdir()
    sentences = [SYSTEM, REPORT, "No pneumothorax. Mild cardiomegaly.", "[INST] <<SYS>> [/INST]"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences * 5), model_writer=buf, vocab_size=300,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, minloglevel=2, num_threads=1,
    )  # fmt: skip
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    width, layers, patch, image, embed = 64, 1, 8, 32, 16
    llama = {
        "vocab_size": 320, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 256, "rope_theta": 500.0, "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    config = {
        "model_type": "CXR-LLAVA",
        "clip_vision_cfg": {"image_size": image, "layers": layers, "patch_size": patch,
                            "width": width},
        "clip_embed_dim": embed, "clip_quick_gelu": False,
        "image_preprocess_cfg": {"mean": 0.55, "std": 0.38},
        "mm_projector_dim": width, "llama": llama,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(11)

    def r(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=g)).to(torch.bfloat16)

    def norm(n: int) -> torch.Tensor:
        return (1 + r(n, scale=0.2).float()).to(torch.bfloat16)

    vision = {
        "vision_tower.conv1.weight": r(width, 1, patch, patch),
        "vision_tower.class_embedding": r(width),
        "vision_tower.positional_embedding": r((image // patch) ** 2 + 1, width),
        "vision_tower.ln_pre.weight": norm(width), "vision_tower.ln_pre.bias": r(width),
        "vision_tower.ln_post.weight": norm(width), "vision_tower.ln_post.bias": r(width),
        "vision_tower.proj": r(width, embed),
    }  # fmt: skip
    for i in range(layers):
        p = f"vision_tower.transformer.resblocks.{i}."
        vision |= {
            p + "ln_1.weight": norm(width), p + "ln_1.bias": r(width),
            p + "attn.in_proj_weight": r(3 * width, width), p + "attn.in_proj_bias": r(3 * width),
            p + "attn.out_proj.weight": r(width, width), p + "attn.out_proj.bias": r(width),
            p + "ln_2.weight": norm(width), p + "ln_2.bias": r(width),
            p + "mlp.c_fc.weight": r(4 * width, width), p + "mlp.c_fc.bias": r(4 * width),
            p + "mlp.c_proj.weight": r(width, 4 * width), p + "mlp.c_proj.bias": r(width),
        }  # fmt: skip
    h, inter, v = llama["hidden_size"], llama["intermediate_size"], llama["vocab_size"]
    kv = h // llama["num_attention_heads"] * llama["num_key_value_heads"]
    text = {
        "mm_projector.weight": r(h, width), "mm_projector.bias": r(h),
        "llama.embed_tokens.weight": r(v, h, scale=0.5), "llama.norm.weight": norm(h),
        "lm_head.weight": r(v, h, scale=0.5),
    }  # fmt: skip
    for i in range(llama["num_hidden_layers"]):
        p = f"llama.layers.{i}."
        text |= {
            p + "self_attn.q_proj.weight": r(h, h, scale=0.2),
            p + "self_attn.k_proj.weight": r(kv, h, scale=0.2),
            p + "self_attn.v_proj.weight": r(kv, h, scale=0.2),
            p + "self_attn.o_proj.weight": r(h, h, scale=0.2),
            p + "mlp.gate_proj.weight": r(inter, h, scale=0.2),
            p + "mlp.up_proj.weight": r(inter, h, scale=0.2),
            p + "mlp.down_proj.weight": r(h, inter, scale=0.2),
            p + "input_layernorm.weight": norm(h),
            p + "post_attention_layernorm.weight": norm(h),
        }
    weight_map = {}
    for name, tensors in (("weights-a.safetensors", text), ("weights-b.safetensors", vision)):
        save_file(tensors, str(folder / name))
        weight_map |= dict.fromkeys(tensors, name)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return config


def _reference_prompt(folder: Path) -> list[int]:
    """Llama-2 chat with the published system text; <s><s> as the published pipeline makes."""
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    before = f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n"
    after = f"\n{REPORT} [/INST]"
    return [1, 1, *sp.encode(before), IMAGE_TOKEN, *sp.encode(after)]


def test_someone_elses_checkpoint_gives_the_references_greedy_tokens(tmp_path: Path) -> None:
    folder = tmp_path / "theirs"
    config = _independent_writer(folder)
    ours = load_checkpoint(folder, device="cpu")
    ids = ours.tokenizer.prompt_ids("report")
    assert ids == _reference_prompt(folder)
    raw = reference.read_raw(folder)
    g = torch.Generator().manual_seed(5)
    pixels = [torch.randn(1, 1, 32, 32, generator=g) for _ in range(2)]
    prompts = [ids, ours.tokenizer.prompt_ids("ask", "Is there a pneumothorax?")]
    assert len(prompts[0]) != len(prompts[1])  # the batch below needs left padding
    expected = []
    for pix, prompt in zip(pixels, prompts, strict=True):
        image = reference.vision(pix, raw, layers=1, heads=1)[0]
        embeds = reference.prompt_embeds(prompt, image, raw, IMAGE_TOKEN)
        expected.append(reference.greedy(embeds, raw, config["llama"], steps=12, eos=2))
    with torch.inference_mode():
        images = ours.model.encode_images(torch.cat(pixels))
        rows = [splice(ours.model, p, image) for p, image in zip(prompts, images, strict=True)]
        embeds, mask = left_pad(rows)
        got = generate_tokens(ours.model, embeds, mask, max_new_tokens=12, eos_id=2)
    assert got == expected
    assert any(len(tokens) > 3 for tokens in expected)
    assert expected[0] != expected[1]  # the image matters


def test_prompt_has_two_bos_then_inst_and_one_image_slot(tiny: LoadedCheckpoint) -> None:
    for task, question in (("report", None), ("differential", None), ("ask", "Is there a PTX?")):
        ids = tiny.tokenizer.prompt_ids(task, question)  # type: ignore[arg-type]
        assert ids[:2] == [1, 1] and ids[2] != 1
        assert ids.count(IMAGE_TOKEN) == 1
    text = tiny.tokenizer.decode(tiny.tokenizer.prompt_ids("ask", "Is there <image> effusion?"))
    assert "[INST] <<SYS>>" in text and text.endswith("Is there  effusion? [/INST]")


@pytest.mark.parametrize("task", ["differential", "ask"])
def test_requests_use_the_published_wording(tiny: LoadedCheckpoint, task: str) -> None:
    text = tiny.tokenizer.decode(tiny.tokenizer.prompt_ids(task, "Where is the tube?"))  # type: ignore[arg-type]
    wanted = (
        "What are the possible differential diagnoses for this patient?"
        if task == "differential"
        else "Where is the tube?"
    )
    assert text.endswith(f"\n{wanted} [/INST]")
    assert SYSTEM in text


def _llava_style_ids(tokenizer: Any, prompt: str) -> list[int]:
    """How the published pipeline turns its prompt string into ids (LLaVA's image-token split):
    each chunk around <image> is tokenised with the tokenizer's own BOS; the first chunk keeps
    it, later chunks drop it, and one image id goes between chunks."""
    chunks = [list(tokenizer(chunk).input_ids) for chunk in prompt.split("<image>")]
    keep_bos = bool(chunks[0]) and chunks[0][0] == tokenizer.bos_token_id
    offset = 1 if keep_bos else 0
    ids = chunks[0][:1] if keep_bos else []
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN)
        ids.extend(chunk[offset:])
    return ids


@pytest.mark.parametrize("loader", ["LlamaTokenizer", "AutoTokenizer"])
def test_prompt_ids_match_transformers_tokenising_the_literal_chat_string(
    tiny: LoadedCheckpoint, tiny_dir: Path, loader: str
) -> None:
    """Not our own code twice: transformers' Llama tokenizer (from the folder's own files, BOS
    added as Llama 2's tokenizer config says) reads the rendered chat string, which starts with
    a literal "<s>"; that literal is the BOS token and the tokenizer prepends BOS again, so the
    published pipeline fed the model <s><s>[INST] ... and so do we (prompt.DOUBLE_BOS)."""
    import transformers

    tokenizer = getattr(transformers, loader).from_pretrained(tiny_dir)
    assert tokenizer("<s>[INST]").input_ids[:2] == [1, 1]  # the double BOS itself
    for task, question in (("report", None), ("differential", None), ("ask", "Is there a PTX?")):
        literal = "<s>" + chat_text(task, question)  # type: ignore[arg-type]
        assert literal.startswith("<s>[INST] <<SYS>>\n") and literal.count("<image>") == 1
        expected = _llava_style_ids(tokenizer, literal)
        assert tiny.tokenizer.prompt_ids(task, question) == expected  # type: ignore[arg-type]
