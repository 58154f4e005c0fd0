"""Factories at the edge: config -> tokenizer + LlavaModel (text-only when there is no vision tower)."""

from __future__ import annotations

import dataclasses
import logging

import torch

from llava_ft.config import ModelSection, RunConfig
from llava_ft.model.llava import LlavaModel

log = logging.getLogger("llava_ft")


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def resolve_attn_implementation(name: str | None) -> str:
    if name:
        return name
    try:
        import flash_attn  # noqa: F401

        if torch.cuda.is_available():
            return "flash_attention_2"
    except ImportError:
        pass
    return "sdpa"


def build_vision(model_cfg: ModelSection):
    if model_cfg.vision is None:
        return None
    from llava_ft.model.vision import VisionConfig, build_vision_tower

    return build_vision_tower(VisionConfig(**dataclasses.asdict(model_cfg.vision)))


def build_model(cfg: RunConfig, *, load_in_4bit: bool | None = None):
    """Tokenizer and base model (pretrained parts only; trained weights are applied by the caller)."""
    from llava_ft.model.llm import load_llm, load_tokenizer
    from llava_ft.model.projector import build_projector

    m = cfg.model
    dtype = resolve_dtype(m.dtype)
    four_bit = cfg.resolved_llm_4bit() if load_in_4bit is None else load_in_4bit
    attn = resolve_attn_implementation(m.attn_implementation)
    tokenizer = load_tokenizer(m.llm)
    llm = load_llm(m.llm, dtype=dtype, load_in_4bit=four_bit, attn_implementation=attn)
    log.info("LLM %s: dtype %s, 4-bit %s, attention %s", m.llm, dtype, four_bit, attn)
    vision = build_vision(m)
    projector = None
    if vision is not None:
        vision.to(dtype)
        # The projector keeps fp32 master weights; autocast runs it in bf16 on GPU.
        projector = build_projector(m.projector, vision.hidden_size, llm.config.hidden_size)
        log.info("vision %s: %d tokens/image x %d dims -> projector %s", m.vision.model, vision.num_tokens,
                 vision.hidden_size, m.projector)
    return tokenizer, LlavaModel(llm, vision, projector)
