"""Factories at the edge: config -> tokenizer + LlavaModel (text-only when there is no vision tower).

The GPU choices are made here, once, and logged: compute dtype, attention kernel, loss computation and the
optional liger-kernel ops. `check_names` checks the names a config hands to the code before anything loads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import is_flash_attn_2_available

from llava_ft.config import ModelSection, RunConfig
from llava_ft.data.anyres import AnyresImageProcessor
from llava_ft.data.tokenizer import load_tokenizer
from llava_ft.model import names
from llava_ft.model.attention import PACKED_SDPA
from llava_ft.model.kernels import apply_liger_kernels, resolve_liger
from llava_ft.model.llava import LlavaModel
from llava_ft.model.llm import load_llm
from llava_ft.model.loss import resolve_loss_mode
from llava_ft.model.projector import build_projector
from llava_ft.model.vision import VisionTower, build_vision_tower, image_token_rule

log = logging.getLogger("llava_ft")


def check_names(cfg: RunConfig, source: str | Path | None = None) -> None:
    """ConfigError, naming the field (after `source`, the config file, when given), for a projector kind, data
    format, chat template or attention implementation the code does not know: found when the config is read
    for use, not minutes later when the run is built after data preparation."""
    names.check_names(cfg, source, attention=attn_implementations)


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def flash_attn_available() -> bool:
    return is_flash_attn_2_available()


def attn_implementations() -> list[str]:
    """The names a config may give: transformers' own, and model/attention.py's packed SDPA (a hub kernel
    "org/name" is resolved by transformers itself)."""
    return ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys(), PACKED_SDPA]


def resolve_attn_implementation(
    name: str | None, *, packing: bool = False, on_gpu: bool | None = None
) -> str:
    """An explicit name wins. Else on GPU: flash_attention_2 when flash-attn is installed (its varlen kernel
    reads packed position_ids), flex_attention for packed rows (a block-diagonal mask that skips the other
    samples' blocks); on CPU, sdpa_packed for packed rows (attention within each sample, model/attention.py);
    sdpa otherwise."""
    if name:
        return name
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    if on_gpu and flash_attn_available():
        return "flash_attention_2"
    if packing:
        return "flex_attention" if on_gpu else PACKED_SDPA
    return "sdpa"


def build_vision(model_cfg: ModelSection) -> VisionTower | None:
    """The vision tower; with `vision.anyres` its processor makes LLaVA-NeXT's any-resolution views (the
    fixed processor's mean and std, its aspect for the base view)."""
    if model_cfg.vision is None:
        return None
    tower = build_vision_tower(model_cfg.vision)
    if model_cfg.vision.anyres is not None:
        rule = image_token_rule(model_cfg.vision)
        if (rule.tile, rule.patch_grid) != (tower.image_size, tower.grid):
            raise ValueError(
                f"anyres geometry of {rule.tile}-px tiles and a {rule.patch_grid}-patch grid does not fit the "
                f"tower ({tower.image_size} px, {tower.grid} patches)"
            )
        tower.processor = AnyresImageProcessor.wrap(tower.processor, rule)
    return tower


def build_model(cfg: RunConfig, *, load_in_4bit: bool | None = None, tokenizer=None):
    """Tokenizer (`tokenizer` when given, else loaded from the LLM's folder) and base model (pretrained parts
    only; trained weights are applied by the caller)."""
    m = cfg.model
    on_gpu = torch.cuda.is_available()
    dtype = resolve_dtype(m.dtype)
    four_bit = cfg.resolved_llm_4bit() if load_in_4bit is None else load_in_4bit
    attn = resolve_attn_implementation(m.attn_implementation, packing=cfg.data.packing, on_gpu=on_gpu)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(m.llm)
    # The unquantised parts of a 4-bit LLM (embeddings, lm_head, norms) load in `dtype` and stay there: no
    # prepare_model_for_kbit_training, whose fp32 upcast costs memory and speed.
    llm = load_llm(m.llm, dtype=dtype, load_in_4bit=four_bit, attn_implementation=attn)
    liger = resolve_liger(m.liger, on_gpu=on_gpu) and apply_liger_kernels(llm)
    loss = resolve_loss_mode(m.loss, on_gpu=on_gpu, head=llm.get_output_embeddings())
    log.info(
        "LLM %s: dtype %s, 4-bit %s, attention %s, loss %s, liger kernels %s",
        m.llm,
        dtype,
        four_bit,
        attn,
        loss,
        "on" if liger else "off",
    )
    vision = build_vision(m)
    projector = None
    if vision is not None:
        vision.to(dtype)
        # The projector keeps fp32 master weights; autocast runs it in bf16 on GPU.
        anyres = getattr(vision.processor, "anyres", False)
        projector = build_projector(m.projector, vision.hidden_size, llm.config.hidden_size, newline=anyres)
        log.info(
            "vision %s: %d tokens/view x %d dims -> projector %s%s",
            m.vision.model,
            vision.num_tokens,
            vision.hidden_size,
            m.projector,
            f"; any-resolution canvases {list(vision.processor.geometry.pinpoints)}" if anyres else "",
        )
    model = LlavaModel(llm, vision, projector, loss=loss, loss_chunk_size=m.loss_chunk_size)
    return tokenizer, model
