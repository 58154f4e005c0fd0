"""CLIP and SigLIP vision towers (open_clip or transformers) that return LLaVA's image features.

Every tower returns the same thing: the patch tokens output by one transformer block (`feature_layer`,
indexed like transformers' `hidden_states`, so -2 is the output of the second-to-last block), without
ln_post / post_layernorm. CLIP's CLS token is dropped, as LLaVA and transformers' Llava ("default" strategy)
do; SigLIP has none, so all its tokens are patches (transformers' "full" strategy).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import timm
import torch
import torch.nn.functional as F
from open_clip.model import CLIPVisionCfg
from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model
from timm.models import VisionTransformer
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from llava_ft.config import VisionSection
from llava_ft.data.anyres import AnyresGeometry, ImageTokens
from llava_ft.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Aspect, ImageProcessor
from llava_ft.errors import InputError

logger = logging.getLogger(__name__)

LOCAL_DIR = "local-dir:"
# SigLIP's normalisation (big_vision's [-1, 1] inputs), as its published preprocessor configs give it.
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


class VisionTower(nn.Module):
    """Wraps a backend model (`self.model`); subclasses return one block's output as (prefix, patches)."""

    select_strategy = "default"
    """transformers' vision_feature_select_strategy giving the same tokens: "default" drops the one prefix
    (CLS) token, "full" keeps every token (a tower without prefix tokens)."""

    def __init__(
        self,
        cfg: VisionSection,
        model: nn.Module,
        *,
        num_layers: int,
        hidden_size: int,
        image_size: int,
        patch_size: int,
        processor: ImageProcessor,
    ):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.processor = processor
        self._hidden_size = hidden_size
        self._image_size = image_size
        self.block = _block_index(cfg.feature_layer, num_layers)  # 0-based block whose output is returned
        self.grid = _patch_grid(image_size, patch_size, cfg.pool)

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def num_tokens(self) -> int:
        """Image tokens per image: the patch grid after pooling."""
        return (self.grid // self.cfg.pool) ** 2

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, num_tokens, hidden_size]."""
        _, patches = self._block_output(pixel_values.to(self.dtype))
        if self.cfg.pool > 1:
            batch, _, dim = patches.shape
            grid = patches.transpose(1, 2).reshape(batch, dim, self.grid, self.grid)
            patches = F.avg_pool2d(grid, self.cfg.pool).flatten(2).transpose(1, 2)
        return patches

    def _block_output(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class OpenClipVisionTower(VisionTower):
    """`model` is open_clip's `CLIP.visual` (a VisionTransformer); `open_clip_cfg` its model config."""

    def __init__(self, cfg: VisionSection, visual: nn.Module, open_clip_cfg: dict[str, Any]):
        if not hasattr(visual, "transformer"):
            raise ValueError(
                f"{cfg.model}: only open_clip ViT image towers are supported, not {type(visual).__name__}"
            )
        size = _square(visual.image_size, "open_clip image_size")
        super().__init__(
            cfg,
            visual,
            num_layers=len(visual.transformer.resblocks),
            hidden_size=visual.transformer.width,
            image_size=size,
            patch_size=_square(visual.patch_size, "open_clip patch_size"),
            processor=_open_clip_processor(visual, size, cfg.image_aspect),
        )
        self.open_clip_cfg = open_clip_cfg  # vision_cfg, quick_gelu...: what conversion to HF CLIP needs

    def _block_output(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.forward_intermediates(
            pixel_values,
            indices=[self.block],
            stop_early=True,  # later blocks are not needed
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        return out["image_intermediates_prefix"][0], out["image_intermediates"][0]


class OpenClipTimmVisionTower(VisionTower):
    """`model` is open_clip's `TimmModel` around a timm ViT trunk, as open_clip builds its SigLIP models
    (`ViT-SO400M-14-SigLIP-384`: no CLS token, so every token is a patch)."""

    def __init__(self, cfg: VisionSection, visual: nn.Module, open_clip_cfg: dict[str, Any]):
        trunk = getattr(visual, "trunk", None)
        if not isinstance(trunk, VisionTransformer):
            raise ValueError(
                f"{cfg.model}: only timm ViT trunks are supported in open_clip, not {type(trunk).__name__}"
            )
        size = _square(tuple(trunk.patch_embed.img_size), "timm img_size")
        super().__init__(
            cfg,
            visual,
            num_layers=len(trunk.blocks),
            hidden_size=trunk.embed_dim,
            image_size=size,
            patch_size=_square(tuple(trunk.patch_embed.patch_size), "timm patch_size"),
            processor=_open_clip_processor(visual, size, cfg.image_aspect),
        )
        self.open_clip_cfg = open_clip_cfg
        if trunk.num_prefix_tokens == 0:
            self.select_strategy = "full"

    def _block_output(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # timm splits off prefix (class, register) tokens itself; only patches come back.
        patches = self.model.trunk.forward_intermediates(
            pixel_values, indices=[self.block], stop_early=True, intermediates_only=True, output_fmt="NLC"
        )[0]
        return patches[:, :0], patches


def _open_clip_processor(visual: nn.Module, size: int, aspect: Aspect) -> ImageProcessor:
    pp = visual.preprocess_cfg
    # aspect "crop" is open_clip's "shortest" transform, "resize" its "squash" (SigLIP's).
    if pp.get("interpolation", "bicubic") != "bicubic" or pp.get("resize_mode", "shortest") not in (
        "shortest",
        "squash",
    ):
        logger.warning("open_clip preprocess %s differs from the bicubic ImageProcessor", pp)
    return ImageProcessor(size, tuple(pp["mean"]), tuple(pp["std"]), aspect)


class HFVisionTower(VisionTower):
    """`model` is a transformers vision model whose hidden_states start with the embedding output."""

    num_prefix_tokens = 0

    def __init__(self, cfg: VisionSection, model: nn.Module, processor: ImageProcessor):
        config = model.config
        super().__init__(
            cfg,
            model,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            image_size=config.image_size,
            patch_size=config.patch_size,
            processor=processor,
        )

    def _block_output(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # hidden_states[0] is the embedding output, so block i's output is hidden_states[i + 1].
        hidden = self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[
            self.block + 1
        ]
        return hidden[:, : self.num_prefix_tokens], hidden[:, self.num_prefix_tokens :]


class HFClipVisionTower(HFVisionTower):
    """`model` is a transformers `CLIPVisionModel`: its first token is CLS."""

    num_prefix_tokens = 1


class HFSiglipVisionTower(HFVisionTower):
    """`model` is a transformers `SiglipVisionModel`: every token is a patch."""

    select_strategy = "full"


def build_vision_tower(cfg: VisionSection) -> VisionTower:
    try:
        if cfg.backend == "open_clip":
            return _build_open_clip(cfg)
        if cfg.backend == "hf":
            return _build_hf(cfg)
    except pickle.UnpicklingError:
        raise InputError(
            f"model.vision: {cfg.pretrained or cfg.model}: a pickled weight file holds more than tensors and is "
            "refused, since unpickling it can run code; convert it once where you trust it: load it and save "
            "the tensors as safetensors (save_pretrained(folder, safe_serialization=True))"
        ) from None
    raise ValueError(f"unknown vision backend {cfg.backend!r}: expected 'open_clip' or 'hf'")


def tokens_per_image(cfg: VisionSection) -> int:
    """Image tokens per image (one view) of the tower `cfg` describes, read from its config files (no weights
    load)."""
    size, patch = _tower_geometry(cfg)
    return (_patch_grid(size, patch, cfg.pool) // cfg.pool) ** 2


def _tower_geometry(cfg: VisionSection) -> tuple[int, int]:
    """(input size, patch size) in pixels of the tower `cfg` describes, from its config files."""
    if cfg.backend == "open_clip":
        vision_cfg = _open_clip_config(cfg.model).get("vision_cfg", {})
        if vision_cfg.get("timm_model_name"):
            # The trunk's own arguments decide its geometry: built on the meta device, it costs no memory.
            with torch.device("meta"):
                trunk = timm.create_model(vision_cfg["timm_model_name"], pretrained=False, num_classes=0)
            size = _square(tuple(trunk.patch_embed.img_size), "timm img_size")
            return size, _square(tuple(trunk.patch_embed.patch_size), "timm patch_size")
        defaults = CLIPVisionCfg()  # the values of keys a model config leaves out
        size = _square(vision_cfg.get("image_size", defaults.image_size), "open_clip image_size")
        patch = _square(vision_cfg.get("patch_size", defaults.patch_size), "open_clip patch_size")
    elif cfg.backend == "hf":
        folder = _hf_folder(cfg)
        config = _hf_kind(folder).config.from_pretrained(folder, local_files_only=True)
        size, patch = config.image_size, config.patch_size
    else:
        raise ValueError(f"unknown vision backend {cfg.backend!r}: expected 'open_clip' or 'hf'")
    return size, patch


def image_token_rule(cfg: VisionSection) -> ImageTokens:
    """What one image costs in tokens with the tower `cfg` describes: a fixed count, or with `cfg.anyres` the
    any-resolution geometry (its count depends on the image's size). Read from config files only."""
    if cfg.anyres is None:
        return tokens_per_image(cfg)
    size, patch = _tower_geometry(cfg)
    a = cfg.anyres
    try:
        return AnyresGeometry.build(
            size, size // patch, a.grid_pinpoints, max_tiles=a.max_tiles, max_image_tokens=a.max_image_tokens
        )
    except ValueError as e:
        raise InputError(f"model.vision.anyres: {e}") from None


def _open_clip_config(name: str) -> dict[str, Any]:
    """open_clip's model config (vision_cfg, quick_gelu, ...) of a model name or a local-dir folder."""
    if name.startswith("hf-hub:"):
        raise ValueError(
            f"{name}: hub models are never downloaded; save the folder and use '{LOCAL_DIR}/path'"
        )
    if name.startswith(LOCAL_DIR):
        folder = Path(name.removeprefix(LOCAL_DIR))
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{folder}: no open_clip_config.json (not an open_clip local-dir folder)")
    open_clip_cfg = open_clip.get_model_config(name)
    if open_clip_cfg is None:
        raise ValueError(f"unknown open_clip model {name!r} (see open_clip.list_models())")
    return open_clip_cfg


def _build_open_clip(cfg: VisionSection) -> OpenClipVisionTower | OpenClipTimmVisionTower:
    name = cfg.model
    open_clip_cfg = _open_clip_config(name)
    preprocess = None
    if name.startswith(LOCAL_DIR):
        if cfg.pretrained is not None:
            raise ValueError(
                f"{name}: the folder holds the weights; `pretrained` ({cfg.pretrained}) would be ignored"
            )
    elif cfg.pretrained is None:
        logger.warning("open_clip %s: no `pretrained` weights file, the tower is randomly initialised", name)
    elif not os.path.isfile(cfg.pretrained):
        raise FileNotFoundError(
            f"{cfg.pretrained}: open_clip weights file not found (a local file, not a tag)"
        )
    else:
        preprocess = _published_preprocess(name)
    clip = open_clip.create_model(
        name,
        pretrained=cfg.pretrained,
        pretrained_text=False,
        weights_only=True,
        force_preprocess_cfg=preprocess,
    )
    # Keep only the image tower: the text tower is never used.
    if hasattr(clip.visual, "trunk"):
        return OpenClipTimmVisionTower(cfg, clip.visual, open_clip_cfg)
    return OpenClipVisionTower(cfg, clip.visual, open_clip_cfg)


_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


def _published_preprocess(name: str) -> dict[str, Any] | None:
    """The preprocessing open_clip's published weights of model `name` were trained with, when all its tags
    agree. open_clip applies a tag's preprocessing only when it downloads the tag; a local weights file would
    otherwise get CLIP's defaults (wrong for SigLIP's mean/std 0.5 and squash resize)."""
    found = set()
    for tag in list_pretrained_tags_by_model(name):
        tag_cfg = get_pretrained_cfg(name, tag)
        found.add(tuple((k, _hashable(tag_cfg[k])) for k in _PREPROCESS_KEYS if k in tag_cfg))
    if len(found) != 1:
        return None
    return dict(found.pop())


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


def _hf_folder(cfg: VisionSection) -> Path:
    folder = Path(cfg.model)
    if cfg.pretrained is not None:
        raise ValueError(
            f"hf vision backend loads weights from the folder {folder}; `pretrained` must be None"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a transformers model folder)")
    return folder


@dataclass(frozen=True)
class _HFKind:
    config: type
    model: type
    tower: type[HFVisionTower]
    mean: tuple[float, float, float]
    """Mean and std when the folder has no preprocessor_config.json."""
    std: tuple[float, float, float]


_CLIP = _HFKind(CLIPVisionConfig, CLIPVisionModel, HFClipVisionTower, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
_SIGLIP = _HFKind(SiglipVisionConfig, SiglipVisionModel, HFSiglipVisionTower, SIGLIP_MEAN, SIGLIP_STD)
# config.json model_type: a vision model's folder, or a whole two-tower checkpoint's.
_HF_KINDS = {"clip": _CLIP, "clip_vision_model": _CLIP, "siglip": _SIGLIP, "siglip_vision_model": _SIGLIP}


def _hf_kind(folder: Path) -> _HFKind:
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type not in _HF_KINDS:
        raise ValueError(
            f"{folder}: model_type {model_type!r}; the hf vision backend reads CLIP and SigLIP folders "
            f"({', '.join(_HF_KINDS)})"
        )
    return _HF_KINDS[model_type]


# What a whole CLIPModel or SiglipModel checkpoint holds beyond the vision tower.
_TEXT_SIDE = re.compile(r"(text_model\.|text_projection\.|visual_projection\.|logit_scale$|logit_bias$)")


def _no_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in record.getMessage()


def _build_hf(cfg: VisionSection) -> HFVisionTower:
    folder = _hf_folder(cfg)
    kind = _hf_kind(folder)
    # A published CLIP or SigLIP folder holds the whole two-tower model: transformers' load report would list
    # every text-tower key as unexpected (hundreds of lines per load). The report is held back and the keys
    # are judged here. (A filter, not a logger level: transformers runs extra checks when its logger's level
    # is raised.)
    report = logging.getLogger("transformers.modeling_utils")
    report.addFilter(_no_load_report)
    try:
        model, info = kind.model.from_pretrained(folder, output_loading_info=True)
    finally:
        report.removeFilter(_no_load_report)
    # transformers only warns about missing weights; a half-random tower must not train silently.
    if info["missing_keys"]:
        raise ValueError(
            f"{folder}: vision weights missing from the checkpoint: {sorted(info['missing_keys'])}"
        )
    if other := sorted(k for k in info["unexpected_keys"] if not _TEXT_SIDE.match(k)):
        more = f" (and {len(other) - 5} more)" if len(other) > 5 else ""
        logger.warning(
            "%s: %d checkpoint key(s) not used by the vision tower: %s%s",
            folder,
            len(other),
            ", ".join(other[:5]),
            more,
        )
    return kind.tower(cfg, model, _hf_processor(folder, model.config.image_size, cfg.image_aspect, kind))


def _hf_processor(folder: Path, image_size: int, aspect: Aspect, kind: _HFKind = _CLIP) -> ImageProcessor:
    """Mean and std from the folder's preprocessor_config.json; the resize follows `aspect` (SigLIP's own,
    resize to a square with no crop, is aspect "resize")."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        logger.warning("%s: no preprocessor_config.json, using the tower's usual mean/std", folder)
        return ImageProcessor(image_size, kind.mean, kind.std, aspect)
    pp = json.loads(path.read_text())
    return ImageProcessor(
        image_size, tuple(pp.get("image_mean", kind.mean)), tuple(pp.get("image_std", kind.std)), aspect
    )


def _patch_grid(image_size: int, patch_size: int, pool: int) -> int:
    """Patches per side of the image (the patch convolution leaves out a remainder, as SigLIP's 384-px input
    gives 27 patches of 14); the pooling factor must divide it."""
    grid = image_size // patch_size
    if grid < 1:
        raise ValueError(f"image size {image_size} is smaller than patch size {patch_size}")
    if pool < 1 or grid % pool:
        raise ValueError(f"pool {pool} must be >= 1 and divide the {grid}x{grid} patch grid")
    return grid


def _block_index(feature_layer: int, num_layers: int) -> int:
    # hidden_states has num_layers + 1 entries (embeddings first); only block outputs exist in both backends.
    index = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 1 <= index <= num_layers:
        raise ValueError(
            f"feature_layer {feature_layer} must select a block output of the {num_layers}-block tower "
            f"(1..{num_layers} or -{num_layers}..-1)"
        )
    return index - 1


def _square(size: int | tuple[int, int], what: str) -> int:
    if isinstance(size, int):
        return size
    if size[0] != size[1]:
        raise ValueError(f"{what} {tuple(size)} is not square")
    return size[0]
