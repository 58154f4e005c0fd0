"""The "merged-llm" format: the merged causal LM alone with its tokenizer and chat template, for
AutoModelForCausalLM / AutoTokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase


def write_merged_llm(
    llm, tokenizer: PreTrainedTokenizerBase, generation: GenerationConfig, folder: Path, dtype: torch.dtype
) -> None:
    llm = llm.to(dtype)
    llm.generation_config = generation
    llm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
