"""Prompt tokenization with the tokenizer files the export writes next to the model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import numpy as np


@dataclass
class TokenizedPrompts:
    """Token ids and attention masks, padded to ``max_length``, one row per prompt."""

    input_ids: np.ndarray  # int64 [rows, max_length]
    attention_mask: np.ndarray  # int64 [rows, max_length]
    truncated: np.ndarray  # bool [rows]: the prompt had more tokens than max_length


class PromptTokenizer:
    """A Hugging Face tokenizer loaded from local files only (no hub access).

    Long prompts are truncated to ``max_length`` tokens, as diffusers pipelines do.
    """

    def __init__(self, directory: Path, max_length: int):
        from transformers import AutoTokenizer

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer files not found in {directory}: run the export first")
        self._tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        self.max_length = max_length

    def __call__(self, prompts: Sequence[str]) -> TokenizedPrompts:
        prompts: List[str] = list(prompts)
        encoded = self._tokenizer(prompts, padding="max_length", truncation=True,
                                  max_length=self.max_length, return_tensors="np")
        full_lengths = [len(ids) for ids in self._tokenizer(prompts, truncation=False)["input_ids"]]
        mask = encoded.get("attention_mask")
        ids = encoded["input_ids"].astype(np.int64)
        if mask is None:
            mask = np.ones_like(ids)
        return TokenizedPrompts(input_ids=ids, attention_mask=mask.astype(np.int64),
                                truncated=np.array([n > self.max_length for n in full_lengths]))
