"""The Llama-2 chat prompt of CXR-LLaVA v2 and its token ids, with the image placeholder.

Tokenisation uses the folder's SentencePiece model (`tokenizer.model`) directly, so the ids do
not depend on how a given transformers release converts or post-processes the tokenizer.

Second BOS, deliberately: the published pipeline renders the chat template to a string that
starts with the literal `<s>` and then tokenises it with a tokenizer call that prepends BOS
again, so the model saw `<s><s>[INST] ...` in its own code (LLaVA's `tokenizer_image_token`
keeps the first chunk's BOS and the chunk's own tokens, which start with the literal `<s>`).
We reproduce that (`DOUBLE_BOS`); a test compares our ids with transformers' Llama
tokenizer reading the literal `<s>[INST] ...` string, split at `<image>` as LLaVA does.
Each text chunk around `<image>` is encoded separately with SentencePiece's dummy prefix,
as in the published pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from cds_service.inference.base import Task
from cds_service.inference.cxr_llava.config import CheckpointError

SYSTEM_TEXT = (
    "You are a helpful radiologist. Try to interpret chest x ray image and answer to the "
    "question that user provides."
)
IMAGE_PLACEHOLDER = "<image>"
REPORT_REQUEST = (
    "<image>\nWrite a radiologic report on the given chest radiograph, including information "
    "about atelectasis, cardiomegaly, consolidation, pulmonary edema, pleural effusion, and "
    "pneumothorax.\n"
)
DIFFERENTIAL_REQUEST = "<image>\nWhat are the possible differential diagnoses for this patient?\n"
DOUBLE_BOS = True
IMAGE_TOKEN = -200  # marks where the image embeddings go; never reaches the embedding table
MAX_QUESTION_CHARS = 2000


def user_text(task: Task, question: str | None = None) -> str:
    if task == "report":
        return REPORT_REQUEST
    if task == "differential":
        return DIFFERENTIAL_REQUEST
    text = (question or "").strip()
    if not text:
        raise ValueError("task 'ask' needs a question")
    if len(text) > MAX_QUESTION_CHARS:
        raise ValueError(f"questions are limited to {MAX_QUESTION_CHARS} characters")
    return IMAGE_PLACEHOLDER + "\n" + text.replace(IMAGE_PLACEHOLDER, "")


def chat_text(task: Task, question: str | None = None) -> str:
    """The prompt as text, without the leading BOS token(s)."""
    user = user_text(task, question).strip()
    return f"[INST] <<SYS>>\n{SYSTEM_TEXT}\n<</SYS>>\n\n{user} [/INST]"


@dataclass
class PromptTokenizer:
    """SentencePiece from the checkpoint folder, with Llama's special ids."""

    processor: spm.SentencePieceProcessor
    bos_id: int
    eos_id: int

    @classmethod
    def from_folder(cls, folder: Path, bos_id: int = 1, eos_id: int = 2) -> PromptTokenizer:
        path = folder / "tokenizer.model"
        if not path.is_file():
            raise CheckpointError(f"{folder}: no tokenizer.model (SentencePiece)")
        try:
            processor = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
        if processor.bos_id() != bos_id or processor.eos_id() != eos_id:
            raise CheckpointError(
                f"{path}: BOS/EOS ids {processor.bos_id()}/{processor.eos_id()} do not match the "
                f"config ({bos_id}/{eos_id})"
            )
        return cls(processor, bos_id, eos_id)

    @property
    def vocab_size(self) -> int:
        return int(self.processor.get_piece_size())

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.processor.encode(text)]

    def prompt_ids(self, task: Task, question: str | None = None) -> list[int]:
        """Token ids with exactly one IMAGE_TOKEN where the image embeddings go."""
        before, after = chat_text(task, question).split(IMAGE_PLACEHOLDER)
        head = [self.bos_id, self.bos_id] if DOUBLE_BOS else [self.bos_id]
        return head + self.encode(before) + [IMAGE_TOKEN] + self.encode(after)

    def decode(self, ids: list[int]) -> str:
        kept = [i for i in ids if i not in (self.bos_id, self.eos_id) and i >= 0]
        return str(self.processor.decode(kept)).strip()
