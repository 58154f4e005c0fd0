"""What transformers' Llava classes can express of a stage, read from its saved config alone (no torch), so that
`llava-ft export` refuses a model its format cannot write before the model stack is imported."""

from __future__ import annotations

from pathlib import Path

from llava_ft.config import ModelSection
from llava_ft.model.names import projector_depth

ANYRES_FORMATS = ("hf-llava-next", "hf-llava-onevision")
"""Formats for any-resolution models: LlavaNext and LlavaOnevision tile every image (LLaVA-NeXT's layout)."""
IMAGE_FORMATS = ("hf-llava", *ANYRES_FORMATS)
"""Formats with a vision tower, a processor and the `<image>` token."""

# transformers' center_crop floors the margin; llava_ft (torchvision's CenterCrop) rounds it half to even, so
# for some image sizes every pixel would be one position off.
CROP_UNSUPPORTED = (
    "model.vision.image_aspect: crop cannot be exported as hf-llava: transformers' LlavaImageProcessor centre "
    "crops at other offsets than llava_ft (one pixel off for some image sizes). Export --format merged-llm, "
    "or train with image_aspect pad or resize"
)


def check_export_format(checkpoint: str | Path, model: ModelSection, fmt: str) -> None:
    """A ValueError naming the checkpoint for what format `fmt` cannot express (merged-llm takes any model)."""
    if fmt == "hf-llava":
        check_hf_llava(checkpoint, model)
    elif fmt in ANYRES_FORMATS:
        check_anyres_format(checkpoint, model, fmt)


def check_hf_llava(checkpoint: str | Path, model: ModelSection) -> None:
    """A ValueError naming the checkpoint for what transformers' Llava cannot express (hf_llava.py checks the
    same on the built model)."""
    vision = model.vision
    if vision is None:
        raise ValueError(
            f"{checkpoint}: a text-only checkpoint (no vision tower) exports as merged-llm, not hf-llava"
        )
    if vision.anyres is not None:
        raise ValueError(
            f"{checkpoint}: model.vision.anyres tiles each image, which transformers' Llava cannot express: "
            f"export --format {' or '.join(ANYRES_FORMATS)}"
        )
    if vision.image_aspect == "crop":
        raise ValueError(f"{checkpoint}: {CROP_UNSUPPORTED}")
    if vision.pool != 1:
        raise ValueError(
            f"{checkpoint}: model.vision.pool is {vision.pool}: the vision tower average-pools its patch grid and "
            "transformers' Llava has no pooling, so hf-llava cannot express it (export --format merged-llm, or "
            "train with pool: 1)"
        )
    _check_mlp2x(checkpoint, model, "hf-llava")


def check_anyres_format(checkpoint: str | Path, model: ModelSection, fmt: str) -> None:
    """A ValueError naming the checkpoint for what LlavaNext / LlavaOnevision cannot express (hf_llava_next.py
    checks the built model and verifies the written one)."""
    vision = model.vision
    if vision is None:
        raise ValueError(
            f"{checkpoint}: a text-only checkpoint (no vision tower) exports as merged-llm, not {fmt}"
        )
    if vision.anyres is None:
        raise ValueError(
            f"{checkpoint}: model.vision.anyres is not set: {fmt} tiles every image and this model sees one "
            "fixed-size view, so it exports as hf-llava"
        )
    if vision.image_aspect not in (None, "resize"):  # unset is resize under anyres
        raise ValueError(
            f"{checkpoint}: model.vision.image_aspect is {vision.image_aspect}: llava_ft made each image's base view "
            f"with it, and {fmt}'s processor squashes the whole image to the base view (image_aspect resize), "
            "so it cannot express it (train any-res models with image_aspect: resize to export them)"
        )
    _check_mlp2x(checkpoint, model, fmt)


def _check_mlp2x(checkpoint: str | Path, model: ModelSection, fmt: str) -> None:
    if projector_depth(model.projector) != 2:
        raise ValueError(
            f"{checkpoint}: model.projector is {model.projector}: transformers' Llava projectors are "
            f"Linear-GELU-Linear (mlp2x_gelu), so {fmt} cannot express it (export --format merged-llm)"
        )
