"""Tiny random CLIP vision towers on disk, for tests and the CPU demo (stable API).

Weights are random but every LayerNorm and bias is perturbed away from its 1/0 init, so a conversion
or loading bug that swaps or drops such a tensor changes the outputs instead of hiding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from llava_ft.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor
from llava_ft.model.clip_convert import write_clip_preprocessor_config

OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"  # first name open_clip's local-dir loader looks for


def tiny_open_clip_model_cfg(
    *,
    image_size: int = 64,
    patch_size: int = 8,
    width: int = 64,
    layers: int = 2,
    heads: int = 2,
    quick_gelu: bool = True,
) -> dict[str, Any]:
    """An open_clip `model_cfg` with the given image tower and the smallest text tower CLIP accepts."""
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")
    return {
        "embed_dim": 32,
        "quick_gelu": quick_gelu,
        "vision_cfg": {
            "image_size": image_size,
            "patch_size": patch_size,
            "width": width,
            "layers": layers,
            "head_width": width // heads,
        },
        # open_clip's CLIP always builds a text tower; keep it negligible.
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1},
    }


def write_tiny_open_clip(
    out_dir: str | os.PathLike,
    *,
    image_size: int = 64,
    patch_size: int = 8,
    width: int = 64,
    layers: int = 2,
    heads: int = 2,
    quick_gelu: bool = True,
    seed: int = 0,
) -> Path:
    """Write an open_clip `local-dir:` folder (open_clip_config.json + open_clip_model.safetensors).

    Load it with `open_clip.create_model(f"local-dir:{path}")` or `VisionSection(model=f"local-dir:{path}")`.
    """
    model_cfg = tiny_open_clip_model_cfg(
        image_size=image_size,
        patch_size=patch_size,
        width=width,
        layers=layers,
        heads=heads,
        quick_gelu=quick_gelu,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = open_clip.CLIP(**model_cfg)
        _perturb_vectors(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    preprocess_cfg = {
        "size": image_size,
        "mean": list(OPENAI_CLIP_MEAN),
        "std": list(OPENAI_CLIP_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    (out / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2)
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / OPEN_CLIP_WEIGHTS))
    return out


def register_tiny_open_clip(folder: str | os.PathLike, name: str) -> tuple[str, Path]:
    """Register a `write_tiny_open_clip` folder's config under `name` in open_clip's (process-global)
    registry, for the `create_model(name, pretrained=<weights file>)` path. Returns (name, weights file)."""
    folder = Path(folder)
    model_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    registry_file = folder / "registry" / f"{name}.json"  # open_clip names a registered config by its stem
    registry_file.parent.mkdir(exist_ok=True)
    registry_file.write_text(json.dumps(model_cfg))
    open_clip.add_model_config(registry_file)
    return name, folder / OPEN_CLIP_WEIGHTS


def write_tiny_hf_clip(
    out_dir: str | os.PathLike,
    *,
    image_size: int = 64,
    patch_size: int = 8,
    width: int = 64,
    layers: int = 2,
    heads: int = 2,
    hidden_act: str = "quick_gelu",
    text_config: dict[str, Any] | None = None,
    projection_dim: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a transformers `CLIPVisionModel` folder with a CLIP `preprocessor_config.json`; with
    `text_config` (CLIPTextConfig fields) a whole `CLIPModel` folder, the layout of published CLIP checkpoints.
    `projection_dim` defaults to `width`."""
    vision = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act=hidden_act,
        projection_dim=projection_dim or width,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if text_config is None:
            model = CLIPVisionModel(vision)
        else:
            config = CLIPConfig(
                text_config={"hidden_act": hidden_act, **text_config},
                vision_config=vision.to_dict(),
                projection_dim=projection_dim or width,
            )
            model = CLIPModel(config)
        _perturb_vectors(model)
    out = Path(out_dir)
    model.save_pretrained(out)
    write_clip_preprocessor_config(out, ImageProcessor(image_size))
    return out


@torch.no_grad()
def _perturb_vectors(model: nn.Module) -> None:
    for param in model.parameters():
        if param.ndim == 1:
            param.add_(0.1 * torch.randn_like(param))
