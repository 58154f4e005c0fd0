"""CLIP vision towers (open_clip or transformers) that return LLaVA's image features.

Both backends return the same thing: the patch tokens output by one transformer block (`feature_layer`,
indexed like transformers' `hidden_states`, so -2 is the output of the second-to-last block), without
ln_post / post_layernorm, CLS dropped, as LLaVA and transformers' Llava ("default" strategy) do.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIPVisionCfg
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from llava_ft.config import VisionSection
from llava_ft.data.anyres import AnyresGeometry, ImageTokens
from llava_ft.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Aspect, ImageProcessor
from llava_ft.errors import InputError

logger = logging.getLogger(__name__)

LOCAL_DIR = "local-dir:"


class VisionTower(nn.Module):
    """Wraps a backend model (`self.model`); subclasses return one block's output as (cls, patches)."""

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
        pp = visual.preprocess_cfg
        if pp.get("interpolation", "bicubic") != "bicubic" or pp.get("resize_mode", "shortest") != "shortest":
            logger.warning("open_clip preprocess %s differs from the bicubic/shortest ImageProcessor", pp)
        processor = ImageProcessor(size, tuple(pp["mean"]), tuple(pp["std"]), cfg.image_aspect)
        super().__init__(
            cfg,
            visual,
            num_layers=len(visual.transformer.resblocks),
            hidden_size=visual.transformer.width,
            image_size=size,
            patch_size=_square(visual.patch_size, "open_clip patch_size"),
            processor=processor,
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


class HFClipVisionTower(VisionTower):
    """`model` is a transformers `CLIPVisionModel`."""

    def __init__(self, cfg: VisionSection, model: CLIPVisionModel, processor: ImageProcessor):
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
        return hidden[:, :1], hidden[:, 1:]


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
        defaults = CLIPVisionCfg()  # the values of keys a model config leaves out
        size = _square(vision_cfg.get("image_size", defaults.image_size), "open_clip image_size")
        patch = _square(vision_cfg.get("patch_size", defaults.patch_size), "open_clip patch_size")
    elif cfg.backend == "hf":
        config = CLIPVisionConfig.from_pretrained(_hf_folder(cfg), local_files_only=True)
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


def _build_open_clip(cfg: VisionSection) -> OpenClipVisionTower:
    name = cfg.model
    open_clip_cfg = _open_clip_config(name)
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
    clip = open_clip.create_model(name, pretrained=cfg.pretrained, pretrained_text=False, weights_only=True)
    # Keep only the image tower: the text tower is never used.
    return OpenClipVisionTower(cfg, clip.visual, open_clip_cfg)


def _hf_folder(cfg: VisionSection) -> Path:
    folder = Path(cfg.model)
    if cfg.pretrained is not None:
        raise ValueError(
            f"hf vision backend loads weights from the folder {folder}; `pretrained` must be None"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a transformers model folder)")
    return folder


# What a whole CLIPModel checkpoint holds beyond the vision tower.
_CLIP_TEXT_SIDE = re.compile(r"(text_model\.|text_projection\.|visual_projection\.|logit_scale$)")


def _no_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in record.getMessage()


def _build_hf(cfg: VisionSection) -> HFClipVisionTower:
    folder = _hf_folder(cfg)
    # A published CLIP folder holds the whole CLIPModel: transformers' load report would list every text-tower
    # key as unexpected (hundreds of lines per load). The report is held back and the keys are judged here.
    # (A filter, not a logger level: transformers runs extra checks when its logger's level is raised.)
    report = logging.getLogger("transformers.modeling_utils")
    report.addFilter(_no_load_report)
    try:
        model, info = CLIPVisionModel.from_pretrained(folder, output_loading_info=True)
    finally:
        report.removeFilter(_no_load_report)
    # transformers only warns about missing weights; a half-random tower must not train silently.
    if info["missing_keys"]:
        raise ValueError(
            f"{folder}: vision weights missing from the checkpoint: {sorted(info['missing_keys'])}"
        )
    if other := sorted(k for k in info["unexpected_keys"] if not _CLIP_TEXT_SIDE.match(k)):
        more = f" (and {len(other) - 5} more)" if len(other) > 5 else ""
        logger.warning(
            "%s: %d checkpoint key(s) not used by the vision tower: %s%s",
            folder,
            len(other),
            ", ".join(other[:5]),
            more,
        )
    return HFClipVisionTower(cfg, model, _hf_processor(folder, model.config.image_size, cfg.image_aspect))


def _hf_processor(folder: Path, image_size: int, aspect: Aspect) -> ImageProcessor:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        logger.warning("%s: no preprocessor_config.json, using OpenAI CLIP mean/std", folder)
        return ImageProcessor(image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, aspect)
    pp = json.loads(path.read_text())
    return ImageProcessor(
        image_size,
        tuple(pp.get("image_mean", OPENAI_CLIP_MEAN)),
        tuple(pp.get("image_std", OPENAI_CLIP_STD)),
        aspect,
    )


def _patch_grid(image_size: int, patch_size: int, pool: int) -> int:
    """Patches per side of the image; the patch size and the pooling factor must divide it."""
    if image_size % patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of patch size {patch_size}")
    grid = image_size // patch_size
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
