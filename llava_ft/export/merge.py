"""Load a stage output unquantized and merge its LoRA adapters into the base weights."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

from llava_ft.stage import load_stage

log = logging.getLogger("llava_ft")


def load_merged(checkpoint: str | Path, *, overrides: dict[str, str | None] | None = None):
    """(cfg, tokenizer, template, LlavaModel with adapters applied but not merged), fp32, unquantized.
    `overrides`: base model folders at other paths, as `load_stage` takes them."""
    # QLoRA adapters merge into the base in full precision: a 4-bit base cannot hold the merged weights.
    stage = load_stage(checkpoint, dtype="float32", overrides=overrides)
    return stage.config, stage.tokenizer, stage.template, stage.model


def merge_adapters(model) -> list[str]:
    """Merge every peft adapter of a LlavaModel in place; returns what was merged."""
    merged = []
    for attr in ("llm", "vision_tower"):
        module = getattr(model, attr)
        while isinstance(module, PeftModel):  # one wrapper per stage that trained an adapter
            if attr == "llm" and untie_adapted_embeddings(module.get_base_model()):
                log.info("LoRA targets the tied input/output embeddings: the export saves lm_head separately")
            module = module.merge_and_unload()
            merged.append(attr)
        setattr(model, attr, module)
    return merged


def untie_adapted_embeddings(llm) -> bool:
    """Give the output layer its own copy of the shared embedding matrix when a LoRA adapts either of them.

    Merging adds a LoRA's delta to its base weight; with tied embeddings that weight is also the other layer's,
    so an lm_head delta would change the input embeddings (and vice versa). Returns whether it untied."""
    inp, out = llm.get_input_embeddings(), llm.get_output_embeddings()
    if out is None or inp is None or not (isinstance(inp, BaseTunerLayer) or isinstance(out, BaseTunerLayer)):
        return False
    head = out.get_base_layer() if isinstance(out, BaseTunerLayer) else out
    table = inp.get_base_layer() if isinstance(inp, BaseTunerLayer) else inp
    if head.weight.data_ptr() != table.weight.data_ptr():
        return False
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    # Saved and reloaded untied: with tie_word_embeddings transformers would tie them again on load.
    for config in {id(c): c for c in (llm.config, llm.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return True
