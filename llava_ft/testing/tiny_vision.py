"""Tiny random CLIP and SigLIP vision towers on disk, for tests and the CPU demo (stable API).

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
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from llava_ft.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor
from llava_ft.model.clip_convert import write_clip_preprocessor_config
from llava_ft.model.siglip_convert import write_siglip_preprocessor_config
from llava_ft.model.vision import SIGLIP_MEAN, SIGLIP_STD

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


def write_tiny_open_clip_siglip(
    out_dir: str | os.PathLike,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    width: int = 32,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
) -> Path:
    """Write an open_clip `local-dir:` folder of a SigLIP model laid out as open_clip's own
    (`ViT-SO400M-14-SigLIP-384`): a timm SigLIP ViT trunk with its attention-pool head, no projection.

    open_clip passes no size arguments to timm, so the trunk is a timm `local-dir:` folder inside (`timm/`:
    timm's SigLIP architecture with tiny model_args) that the open_clip config names by absolute path: move
    the folder and the config no longer finds it.
    """
    out = Path(out_dir).absolute()
    (out / "timm").mkdir(parents=True, exist_ok=True)
    timm_config = {
        "architecture": "vit_base_patch16_siglip_224",  # class_token=False, global_pool="map"
        "model_args": {
            "img_size": image_size,
            "patch_size": patch_size,
            "embed_dim": width,
            "depth": layers,
            "num_heads": heads,
            "mlp_ratio": 3.0,
        },
        "pretrained_cfg": {"input_size": [3, image_size, image_size], "mean": SIGLIP_MEAN, "std": SIGLIP_STD},
    }
    (out / "timm" / "config.json").write_text(json.dumps(timm_config, indent=2))
    model_cfg = {
        "embed_dim": width,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {
            "image_size": image_size,
            "timm_model_name": f"local-dir:{out / 'timm'}",
            "timm_model_pretrained": False,
            "timm_pool": "map",
            "timm_proj": "none",
        },
        # open_clip's SigLIP text tower, as small as it builds.
        "text_cfg": {
            "context_length": 8,
            "vocab_size": 64,
            "width": 16,
            "heads": 1,
            "layers": 1,
            "no_causal_mask": True,
            "pool_type": "last",
            "proj_bias": True,
        },
    }
    preprocess_cfg = {
        "size": image_size,
        "mean": list(SIGLIP_MEAN),
        "std": list(SIGLIP_STD),
        "interpolation": "bicubic",
        "resize_mode": "squash",
    }
    (out / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CustomTextCLIP(**{k: v for k, v in model_cfg.items() if k != "custom_text"})
        _perturb_vectors(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / OPEN_CLIP_WEIGHTS))
    return out


def write_tiny_hf_siglip(
    out_dir: str | os.PathLike,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    width: int = 32,
    layers: int = 2,
    heads: int = 2,
    hidden_act: str = "gelu_pytorch_tanh",
    text_config: dict[str, Any] | None = None,
    seed: int = 0,
) -> Path:
    """Write a transformers `SiglipVisionModel` folder with SigLIP's `preprocessor_config.json`; with
    `text_config` (SiglipTextConfig fields) a whole `SiglipModel` folder, the layout of published checkpoints."""
    vision = SiglipVisionConfig(
        hidden_size=width,
        intermediate_size=3 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act=hidden_act,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if text_config is None:
            model = SiglipVisionModel(vision)
        else:
            model = SiglipModel(SiglipConfig(text_config=text_config, vision_config=vision.to_dict()))
        _perturb_vectors(model)
    out = Path(out_dir)
    model.save_pretrained(out)
    write_siglip_preprocessor_config(out, ImageProcessor(image_size, SIGLIP_MEAN, SIGLIP_STD, "resize"))
    return out


@torch.no_grad()
def _perturb_vectors(model: nn.Module) -> None:
    for param in model.parameters():
        if param.ndim == 1:
            param.add_(0.1 * torch.randn_like(param))
