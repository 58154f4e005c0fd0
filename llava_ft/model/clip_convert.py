"""open_clip ViT image tower -> transformers `CLIPVisionModel` (config + state dict).

Export target is transformers' own Llava, whose vision tower is a `CLIPVisionModel`; transformers 5
ships no conversion script, so the key map lives here. Only the plain OpenAI-style ViT (learnable
positions, ln_pre, standard blocks) has an exact CLIPVisionModel equivalent; anything else is refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from llava_ft.data.images import ImageProcessor

# open_clip vision_cfg options whose non-default values change the architecture away from HF CLIP.
_PLAIN_VIT_DEFAULTS: dict[str, Any] = {
    "timm_model_name": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "ls_init_value": None,
    "pos_embed_type": "learnable",
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "act_kwargs": None,
    "norm_kwargs": None,
}

_BLOCK_MAP = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOP_MAP = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
# The joint-embedding projection has no place in CLIPVisionModel (LLaVA never uses it).
_DROPPED = {"proj"}


def open_clip_to_hf_clip_vision(
    visual: nn.Module | Mapping[str, torch.Tensor], model_cfg: Mapping[str, Any]
) -> tuple[CLIPVisionConfig, dict[str, torch.Tensor]]:
    """Convert an open_clip image tower (`model.visual`, or a state dict of it or of the whole CLIP model)
    described by its open_clip `model_cfg` (the dict with `vision_cfg` and `quick_gelu`)."""
    state = dict(visual.state_dict() if isinstance(visual, nn.Module) else visual)
    if any(k.startswith("visual.") for k in state):
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    config = _hf_config(state, model_cfg)

    converted: dict[str, torch.Tensor] = {}
    for src, dst in _TOP_MAP.items():
        converted[dst] = state.pop(src)
    for i in range(config.num_hidden_layers):
        src_prefix, dst_prefix = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        # nn.MultiheadAttention packs q, k, v row-wise in one projection.
        for kind in ("weight", "bias"):
            q, k, v = state.pop(f"{src_prefix}attn.in_proj_{kind}").chunk(3, dim=0)
            for name, part in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                converted[f"{dst_prefix}self_attn.{name}.{kind}"] = part
        for src, dst in _BLOCK_MAP.items():
            for kind in ("weight", "bias"):
                converted[f"{dst_prefix}{dst}.{kind}"] = state.pop(f"{src_prefix}{src}.{kind}")
    leftover = sorted(set(state) - _DROPPED)
    if leftover:
        raise ValueError(f"open_clip vision weights with no CLIPVisionModel equivalent: {leftover}")
    return config, {k: v.detach().clone().contiguous() for k, v in converted.items()}


def _hf_config(state: Mapping[str, torch.Tensor], model_cfg: Mapping[str, Any]) -> CLIPVisionConfig:
    vision_cfg = dict(model_cfg.get("vision_cfg", {}))
    for key, default in _PLAIN_VIT_DEFAULTS.items():
        if vision_cfg.get(key, default) != default:
            raise ValueError(
                f"open_clip vision_cfg {key}={vision_cfg[key]!r} has no CLIPVisionModel equivalent"
            )
    if vision_cfg.get("block_type") not in (None, "default"):
        raise ValueError(
            f"open_clip vision_cfg block_type={vision_cfg['block_type']!r} is not a plain ViT block"
        )
    if "conv1.weight" not in state:
        raise ValueError("not an open_clip ViT image tower: no 'conv1.weight' (a ResNet or timm tower?)")

    width, _, patch, _ = state["conv1.weight"].shape
    layers = sum(1 for k in state if k.startswith("transformer.resblocks.") and k.endswith(".ln_1.weight"))
    image_size = vision_cfg.get("image_size", 224)
    if isinstance(image_size, list | tuple):
        if len(set(image_size)) != 1:
            raise ValueError(f"non-square open_clip image_size {image_size} is not supported")
        image_size = image_size[0]
    grid = image_size // patch
    if state["positional_embedding"].shape[0] != grid * grid + 1:
        raise ValueError(
            f"positional_embedding has {state['positional_embedding'].shape[0]} rows, "
            f"expected {grid * grid + 1} for image_size {image_size} and patch {patch}"
        )
    for key, found in (("width", width), ("layers", layers), ("patch_size", patch)):
        if key in vision_cfg and vision_cfg[key] != found:
            raise ValueError(f"vision_cfg {key}={vision_cfg[key]} but the weights have {found}")
    head_width = vision_cfg.get("head_width", 64)
    if width % head_width:
        raise ValueError(f"width {width} is not a multiple of head_width {head_width}")
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=width // head_width,
        num_channels=3,
        image_size=image_size,
        patch_size=patch,
        # open_clip builds the towers with QuickGELU only when the model config says so, else erf GELU.
        hidden_act="quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu",
        layer_norm_eps=1e-5,  # open_clip's LayerNorm default
        projection_dim=model_cfg.get("embed_dim", 512),
    )


def save_hf_clip_vision(
    visual: nn.Module | Mapping[str, torch.Tensor],
    model_cfg: Mapping[str, Any],
    out_dir: str | os.PathLike,
    processor: ImageProcessor | None = None,
) -> Path:
    """Write a `CLIPVisionModel.from_pretrained`-loadable folder (safetensors), plus a
    `preprocessor_config.json` carrying the processor's size, mean and std when one is given."""
    config, state = open_clip_to_hf_clip_vision(visual, model_cfg)
    model = CLIPVisionModel(config).to(state["embeddings.patch_embedding.weight"].dtype)
    model.load_state_dict(state, strict=True)
    out = Path(out_dir)
    model.save_pretrained(out)
    if processor is not None:
        write_clip_preprocessor_config(out, processor)
    return out


def write_clip_preprocessor_config(out_dir: str | os.PathLike, processor: ImageProcessor) -> None:
    """CLIP's resize + center crop with our mean/std. The pad-to-square step is not representable in
    `CLIPImageProcessor` (it ignores do_pad); LlavaImageProcessor carries it at export time."""
    size = processor.image_size
    CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(processor.mean),
        image_std=list(processor.std),
    ).save_pretrained(out_dir)
