"""Tiny LLaVA stage outputs for tests: real on-disk formats, written without training.

Trainable weights (projector, LoRA) are set to random non-zero values, so a merge or export that dropped
them would change the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from llava_ft.config import DataSection, LoraSection, ModelSection, RunConfig, TrainableSection, VisionSection
from llava_ft.data.templates import get_template
from llava_ft.model.build import build_model
from llava_ft.model.trainability import apply_trainability
from llava_ft.stage import save_stage_output
from llava_ft.testing.tiny_llm import write_tiny_internlm2, write_tiny_llama
from llava_ft.testing.tiny_vision import (
    write_tiny_hf_clip,
    write_tiny_hf_siglip,
    write_tiny_open_clip,
    write_tiny_open_clip_siglip,
)


def tiny_config(
    root: Path,
    *,
    llm_mode: Literal["frozen", "full", "lora", "qlora"] = "lora",
    vision_backend: Literal["open_clip", "hf", None] = "open_clip",
    template: str = "internlm2_chat",
    llm_kind: Literal["internlm2", "llama"] = "internlm2",
    vision_mode: Literal["frozen", "full", "lora"] = "frozen",
) -> RunConfig:
    """Writes tiny base models under root (once) and returns a RunConfig that uses them."""
    root = Path(root)
    llm_dir = root / f"llm_{llm_kind}"
    if not (llm_dir / "config.json").exists():
        if llm_kind == "internlm2":
            write_tiny_internlm2(llm_dir, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
        else:
            write_tiny_llama(llm_dir, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    vision = None
    if vision_backend == "open_clip":
        clip = root / "clip_open_clip"
        if not (clip / "open_clip_config.json").exists():
            write_tiny_open_clip(clip, image_size=32, patch_size=8, width=32, layers=2, heads=2)
        vision = VisionSection(backend="open_clip", model=f"local-dir:{clip}")
    elif vision_backend == "hf":
        clip = root / "clip_hf"
        if not (clip / "config.json").exists():
            write_tiny_hf_clip(clip, image_size=32, patch_size=8)
        vision = VisionSection(backend="hf", model=str(clip))
    return RunConfig(
        model=ModelSection(llm=str(llm_dir), vision=vision, dtype="float32"),
        trainable=TrainableSection(
            llm=llm_mode, projector="full" if vision else "frozen", vision=vision_mode if vision else "frozen"
        ),
        lora=LoraSection(r=4, alpha=8, dropout=0.0),
        data=DataSection(template=template),
        name="tiny_test",
    )


def write_tiny_stage_output(root: Path, out: Path, *, seed: int = 0, **kwargs) -> Path:
    """A stage output folder as a finished stage would leave it, with random non-zero trained weights."""
    return save_random_stage(tiny_config(root, **kwargs), out, seed=seed)


def save_random_stage(cfg: RunConfig, out: Path, *, seed: int = 0) -> Path:
    """cfg's model, its trainable weights set to random non-zero values, saved as a stage output at out."""
    cfg.train.output_dir = str(out)
    tokenizer, model = build_model(cfg)
    apply_trainability(model, cfg.trainable, cfg.lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    save_stage_output(model, cfg, tokenizer, get_template(cfg.data.template, tokenizer), out)
    return out


def tiny_siglip_vision(
    root: Path, backend: Literal["open_clip", "hf"], *, image_size: int = 32, patch_size: int = 8, **fields
) -> VisionSection:
    """A tiny SigLIP tower under root (written once, open_clip or transformers layout) and its vision section."""
    folder = Path(root) / f"siglip_{backend}"
    if backend == "open_clip":
        if not (folder / "open_clip_config.json").exists():
            write_tiny_open_clip_siglip(folder, image_size=image_size, patch_size=patch_size)
        return VisionSection("open_clip", f"local-dir:{folder}", **fields)
    if not (folder / "config.json").exists():
        write_tiny_hf_siglip(folder, image_size=image_size, patch_size=patch_size)
    return VisionSection("hf", str(folder), **fields)
