"""open_clip SigLIP image tower (a timm ViT trunk) -> transformers `SiglipVisionModel` (config + state dict).

open_clip builds its SigLIP models (`ViT-SO400M-14-SigLIP-384`, ...) around timm's VisionTransformer with no
class token and a latent-attention pooling head ("map"); transformers' SiglipVisionModel is the same network
under other names. Only that layout converts exactly; any other trunk option (class or register tokens, layer
scale, q/k norms, pre-norm) is refused rather than approximated.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from timm.layers import AttentionPoolLatent, Mlp
from timm.models import VisionTransformer
from torch import nn
from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

from llava_ft.data.images import ImageProcessor

_BLOCK_MAP = {
    "norm1": "layer_norm1",
    "attn.proj": "self_attn.out_proj",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_TOP_MAP = {
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_HEAD_MAP = {
    "attn_pool.latent": "head.probe",
    "attn_pool.proj.weight": "head.attention.out_proj.weight",
    "attn_pool.proj.bias": "head.attention.out_proj.bias",
    "attn_pool.norm.weight": "head.layernorm.weight",
    "attn_pool.norm.bias": "head.layernorm.bias",
    "attn_pool.mlp.fc1.weight": "head.mlp.fc1.weight",
    "attn_pool.mlp.fc1.bias": "head.mlp.fc1.bias",
    "attn_pool.mlp.fc2.weight": "head.mlp.fc2.weight",
    "attn_pool.mlp.fc2.bias": "head.mlp.fc2.bias",
}
# transformers' names for the GELU variants timm builds.
_GELU = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}


def open_clip_to_hf_siglip_vision(visual: nn.Module) -> tuple[SiglipVisionConfig, dict[str, torch.Tensor]]:
    """Convert open_clip's `TimmModel` image tower (`model.visual`) of a SigLIP model."""
    trunk = getattr(visual, "trunk", None)
    if not isinstance(trunk, VisionTransformer):
        raise ValueError(f"not an open_clip timm ViT image tower: {type(visual).__name__}")
    if len(visual.head) or not isinstance(trunk.head, nn.Identity):
        raise ValueError(
            "open_clip timm_proj / classifier head after the trunk has no SiglipVisionModel place"
        )
    config = _hf_config(trunk)
    state = dict(trunk.state_dict())

    converted = {dst: state.pop(src) for src, dst in _TOP_MAP.items()}
    converted["embeddings.position_embedding.weight"] = state.pop("pos_embed")[0]
    for i in range(config.num_hidden_layers):
        src_prefix, dst_prefix = f"blocks.{i}.", f"encoder.layers.{i}."
        # timm packs q, k, v row-wise in one projection (reshaped as 3 x heads x head_dim).
        for kind in ("weight", "bias"):
            q, k, v = state.pop(f"{src_prefix}attn.qkv.{kind}").chunk(3, dim=0)
            for name, part in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                converted[f"{dst_prefix}self_attn.{name}.{kind}"] = part
        for src, dst in _BLOCK_MAP.items():
            for kind in ("weight", "bias"):
                converted[f"{dst_prefix}{dst}.{kind}"] = state.pop(f"{src_prefix}{src}.{kind}")
    if config.vision_use_head:
        converted |= {dst: state.pop(src) for src, dst in _HEAD_MAP.items()}
        # nn.MultiheadAttention's in_proj is q over k over v; timm's kv projection is k over v.
        for kind in ("weight", "bias"):
            packed = torch.cat([state.pop(f"attn_pool.q.{kind}"), state.pop(f"attn_pool.kv.{kind}")])
            converted[f"head.attention.in_proj_{kind}"] = packed
    if state:
        raise ValueError(f"open_clip timm weights with no SiglipVisionModel equivalent: {sorted(state)}")
    return config, {k: v.detach().clone().contiguous() for k, v in converted.items()}


def _hf_config(trunk: VisionTransformer) -> SiglipVisionConfig:
    if trunk.num_prefix_tokens:
        raise ValueError(
            f"the timm trunk has {trunk.num_prefix_tokens} class/register token(s); SigLIP has none"
        )
    if getattr(trunk, "dynamic_img_size", False):
        raise ValueError("a timm trunk with dynamic_img_size has no SiglipVisionModel equivalent")
    for name in ("norm_pre", "fc_norm"):
        if not isinstance(getattr(trunk, name), nn.Identity):
            raise ValueError(f"the timm trunk's {name} has no SiglipVisionModel equivalent")
    block = trunk.blocks[0]
    identities = {
        "ls1": block.ls1,
        "ls2": block.ls2,
        "attn.q_norm": block.attn.q_norm,
        "attn.k_norm": block.attn.k_norm,
        "attn.norm": getattr(block.attn, "norm", nn.Identity()),
        "mlp.norm": getattr(block.mlp, "norm", nn.Identity()),
    }
    for name, module in identities.items():
        if not isinstance(module, nn.Identity):
            raise ValueError(
                f"timm block {name} ({type(module).__name__}) has no SiglipVisionModel equivalent"
            )
    if not isinstance(block.mlp, Mlp) or not isinstance(block.mlp.act, nn.GELU):
        raise ValueError(f"timm block mlp {block.mlp} is not SigLIP's Linear-GELU-Linear")
    if block.attn.qkv.bias is None:
        raise ValueError("timm attention without qkv bias has no SiglipVisionModel equivalent")
    pool = trunk.attn_pool
    if pool is not None and not (
        isinstance(pool, AttentionPoolLatent)
        and pool.latent_len == 1
        and pool.pool == "token"
        and isinstance(pool.q, nn.Linear)
        and pool.pos_embed is None
    ):
        raise ValueError(f"timm pooling {type(pool).__name__} is not SigLIP's one-latent attention pool")
    norms = {m.eps for m in trunk.modules() if isinstance(m, nn.LayerNorm)}
    if len(norms) != 1:
        raise ValueError(f"timm trunk LayerNorms with several eps {sorted(norms)}")
    size, patch = trunk.patch_embed.img_size, trunk.patch_embed.patch_size
    if size[0] != size[1] or patch[0] != patch[1]:
        raise ValueError(f"non-square timm image {size} or patch {patch} is not supported")
    return SiglipVisionConfig(
        hidden_size=trunk.embed_dim,
        intermediate_size=block.mlp.fc1.out_features,
        num_hidden_layers=len(trunk.blocks),
        num_attention_heads=block.attn.num_heads,
        num_channels=trunk.patch_embed.proj.in_channels,
        image_size=size[0],
        patch_size=patch[0],
        hidden_act=_GELU[block.mlp.act.approximate],
        layer_norm_eps=norms.pop(),
        vision_use_head=pool is not None,
    )


def save_hf_siglip_vision(
    visual: nn.Module, out_dir: str | os.PathLike, processor: ImageProcessor | None = None
) -> Path:
    """Write a `SiglipVisionModel.from_pretrained`-loadable folder (safetensors), plus a
    `preprocessor_config.json` carrying the processor's size, mean and std when one is given."""
    config, state = open_clip_to_hf_siglip_vision(visual)
    model = SiglipVisionModel(config).to(state["embeddings.patch_embedding.weight"].dtype)
    model.load_state_dict(state, strict=True)
    out = Path(out_dir)
    model.save_pretrained(out)
    if processor is not None:
        write_siglip_preprocessor_config(out, processor)
    return out


def write_siglip_preprocessor_config(out_dir: str | os.PathLike, processor: ImageProcessor) -> None:
    """SigLIP's own preprocessing: bicubic resize to a square (no crop), rescale, normalise with our mean/std;
    llava_ft's ImageProcessor with aspect "resize" gives the same pixels."""
    size = processor.image_size
    SiglipImageProcessor(
        size={"height": size, "width": size},
        resample=3,  # PIL bicubic
        image_mean=list(processor.mean),
        image_std=list(processor.std),
    ).save_pretrained(out_dir)
