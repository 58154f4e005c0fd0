"""A tiny pretrain -> finetune chain as training leaves it: the pretrain trains the projector, the finetune
starts from it (train.init_from), keeps the projector frozen and trains LoRA on the LLM."""

from __future__ import annotations

from pathlib import Path

import torch

from llava_ft.data.templates import get_template
from llava_ft.model.build import build_model
from llava_ft.model.trainability import apply_trainability
from llava_ft.stage import apply_stage_weights, save_stage_output
from llava_ft.testing.tiny_llava import tiny_config, write_tiny_stage_output


def write_tiny_chain(root: Path, *, seed: int = 0) -> tuple[Path, Path]:
    """Base models under root/bases, stages root/pretrain and root/finetune; returns (pretrain, finetune)."""
    root = Path(root)
    pretrain = write_tiny_stage_output(root / "bases", root / "pretrain", seed=seed, llm_mode="frozen")
    cfg = tiny_config(root / "bases", llm_mode="lora")
    cfg.trainable.projector = "frozen"
    cfg.train.init_from = str(pretrain)
    cfg.train.output_dir = str(root / "finetune")
    tokenizer, model = build_model(cfg)
    apply_trainability(model, cfg.trainable, cfg.lora)
    apply_stage_weights(model, pretrain, adapters="init")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    template = get_template(cfg.data.template, tokenizer)
    return pretrain, save_stage_output(model, cfg, tokenizer, template, root / "finetune")
