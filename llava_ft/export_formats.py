"""What transformers' Llava can express of a stage, read from its saved config alone (no torch), so that
`llava-ft export --format hf-llava` refuses a model it cannot write before the model stack is imported."""

from __future__ import annotations

from pathlib import Path

from llava_ft.config import ModelSection
from llava_ft.model.names import projector_depth

# transformers' center_crop floors the margin; llava_ft (torchvision's CenterCrop) rounds it half to even, so
# for some image sizes every pixel would be one position off.
CROP_UNSUPPORTED = (
    "model.vision.image_aspect: crop cannot be exported as hf-llava: transformers' LlavaImageProcessor centre "
    "crops at other offsets than llava_ft (one pixel off for some image sizes). Export --format merged-llm, "
    "or train with image_aspect pad or resize"
)


def check_hf_llava(checkpoint: str | Path, model: ModelSection) -> None:
    """A ValueError naming the checkpoint for what transformers' Llava cannot express (hf_llava.py checks the
    same on the built model)."""
    vision = model.vision
    if vision is None:
        raise ValueError(
            f"{checkpoint}: a text-only checkpoint (no vision tower) exports as merged-llm, not hf-llava"
        )
    if vision.image_aspect == "crop":
        raise ValueError(f"{checkpoint}: {CROP_UNSUPPORTED}")
    if vision.pool != 1:
        raise ValueError(
            f"{checkpoint}: model.vision.pool is {vision.pool}: the vision tower average-pools its patch grid and "
            "transformers' Llava has no pooling, so hf-llava cannot express it (export --format merged-llm, or "
            "train with pool: 1)"
        )
    if projector_depth(model.projector) != 2:
        raise ValueError(
            f"{checkpoint}: model.projector is {model.projector}: transformers' Llava projector is "
            "Linear-GELU-Linear (mlp2x_gelu), so hf-llava cannot express it (export --format merged-llm)"
        )
