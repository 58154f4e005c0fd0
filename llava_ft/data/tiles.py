"""Any-resolution pixels: an image as its base view and the tiles of its best canvas, exactly as transformers'
LlavaNextImageProcessor (PIL backend) cuts them; the geometry is `data/anyres.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image

from llava_ft.data.anyres import AnyresGeometry
from llava_ft.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Aspect, ImageProcessor, normalized, to_rgb


@dataclass
class AnyresImageProcessor:
    """PIL image -> [n_views, 3, tile, tile]: the base view, then the tiles of the image resized to its best
    canvas, row-major, as transformers' LlavaNextImageProcessor (PIL backend) makes them.

    The image is resized to fit the canvas with its aspect kept (bicubic, rounded up), centred and padded
    with black, then cut into tiles. The base view is the wrapped fixed processor's view of the whole image
    (`base_aspect`): LlavaNext has no such choice and squashes it to a square, which is "resize"; any other
    aspect gives a base view that LlavaNext's processor does not make.
    """

    geometry: AnyresGeometry
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    """Per-channel mean on the 0-1 scale."""
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    """Per-channel standard deviation on the 0-1 scale."""
    base_aspect: Aspect = "resize"
    """How the whole image becomes the base view (ImageProcessor's aspect); "resize" is LlavaNext's."""

    anyres: ClassVar[bool] = True  # what callers test (a fixed ImageProcessor has no such attribute)

    def __post_init__(self) -> None:
        self.base = ImageProcessor(self.geometry.tile, self.mean, self.std, self.base_aspect)
        self.mean, self.std = self.base.mean, self.base.std

    @classmethod
    def wrap(cls, processor: ImageProcessor, geometry: AnyresGeometry) -> AnyresImageProcessor:
        """Any-resolution views with a tower's fixed processor's mean, std and aspect (for the base view)."""
        if processor.image_size != geometry.tile:
            raise ValueError(
                f"anyres tiles of {geometry.tile} px need a {geometry.tile}-px processor, got {processor.image_size}"
            )
        return cls(geometry, processor.mean, processor.std, processor.aspect)

    @property
    def image_size(self) -> int:
        """Side of every view: the tower's input size."""
        return self.geometry.tile

    @property
    def matches_llava_next(self) -> bool:
        """Whether transformers' LlavaNextImageProcessor with `llava_next_kwargs()` makes these exact views (its
        base view is squashed: base_aspect "resize")."""
        return self.base_aspect == "resize"

    def llava_next_kwargs(self) -> dict[str, Any]:
        """The settings of transformers' LlavaNextImageProcessor that make these views (the base view too when
        `matches_llava_next`)."""
        tile = self.geometry.tile
        return {
            "size": {"shortest_edge": tile},
            "crop_size": {"height": tile, "width": tile},
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "image_grid_pinpoints": [list(p) for p in self.geometry.pinpoints],
            "resample": int(Image.Resampling.BICUBIC),
            "do_pad": True,
            "do_convert_rgb": True,
        }

    def views(self, img: Image.Image) -> list[Image.Image]:
        """The RGB views the tower sees, before normalisation: base view first, then tiles row-major."""
        img = to_rgb(img)
        width, height = img.size
        canvas_h, canvas_w = self.geometry.best_resolution(height, width)
        new_h, new_w = fit_size(height, width, canvas_h, canvas_w)
        canvas = Image.new("RGB", (canvas_w, canvas_h), (0, 0, 0))
        resized = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        canvas.paste(resized, ((canvas_w - new_w) // 2, (canvas_h - new_h) // 2))
        tile = self.geometry.tile
        tiles = [
            canvas.crop((x, y, x + tile, y + tile))
            for y in range(0, canvas_h, tile)
            for x in range(0, canvas_w, tile)
        ]
        return [self.base.resized(img), *tiles]

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """PIL image -> normalised float32 tensor [num_views(height, width), 3, tile, tile]."""
        return torch.stack([normalized(view, self.mean, self.std) for view in self.views(img)])

    def resized(self, img: Image.Image) -> Image.Image:
        """The image to keep for later processing: the RGB image itself, since its views and its token count
        depend on its full size (no smaller image stands in for it, unlike a fixed processor's square)."""
        return to_rgb(img)


def fit_size(height: int, width: int, canvas_h: int, canvas_w: int) -> tuple[int, int]:
    """(height, width) of an image resized into a canvas with its aspect kept, the short side rounded up
    (transformers' `get_patch_output_size`)."""
    scale_w, scale_h = canvas_w / width, canvas_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), canvas_h), canvas_w
    return canvas_h, min(math.ceil(width * scale_h), canvas_w)


Processor = ImageProcessor | AnyresImageProcessor
"""A tower's image processor: one view per image, or any-resolution views."""


def pixel_inputs(processor: Processor, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
    """The model's image inputs for `images`, in order: `pixel_values` [n_images, 3, S, S] with a fixed
    processor; with an any-resolution one every view of every image [sum of views, 3, S, S] and `image_sizes`
    LongTensor [n_images, 2] (each image's height, width). Empty without images."""
    if not images:
        return {}
    if not getattr(processor, "anyres", False):
        return {"pixel_values": torch.stack([processor(img) for img in images])}
    sizes = [(img.height, img.width) for img in images]
    return {
        "pixel_values": torch.cat([processor(img) for img in images]),
        "image_sizes": torch.tensor(sizes, dtype=torch.long),
    }
