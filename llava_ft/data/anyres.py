"""LLaVA-NeXT's any-resolution tiling: which canvas an image is tiled to, how many tokens it becomes, and its
pixels.

`AnyresGeometry` is pure arithmetic on (height, width), shared by preparation (token counts from image headers,
before any pixel is decoded), the model (unpadding the tiles' features) and export (the pinpoints written to
the config). It follows transformers' LlavaNext (`select_best_resolution`, `get_anyres_image_grid_shape`,
`unpad_image`), which the tests use as the reference. `AnyresImageProcessor` cuts an image into its base view
and tiles as transformers' LlavaNextImageProcessor does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image

from llava_ft.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Aspect, ImageProcessor, normalized, to_rgb

# LLaVA-NeXT's canvases as (rows, cols) of tower-sized tiles: at 336 px, its published image_grid_pinpoints.
LLAVA_NEXT_GRIDS: tuple[tuple[int, int], ...] = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


@dataclass(frozen=True)
class AnyresGeometry:
    tile: int
    """Side of one tile in pixels: the tower's input size."""
    patch_grid: int
    """Feature tokens per tile side (tile // patch size)."""
    pinpoints: tuple[tuple[int, int], ...]
    """Canvases as (height, width) in pixels, in the order best-fit ties are broken (the first wins)."""

    @classmethod
    def build(
        cls,
        tile: int,
        patch_grid: int,
        grid_pinpoints: Sequence[Sequence[int]] | None = None,
        *,
        max_tiles: int | None = None,
        max_image_tokens: int | None = None,
    ) -> AnyresGeometry:
        """The geometry of a config's `anyres` section; canvases over `max_tiles` or able to exceed
        `max_image_tokens` are left out. ValueError when a canvas is not a multiple of `tile` or none is left."""
        if grid_pinpoints is None:
            grid_pinpoints = [(rows * tile, cols * tile) for rows, cols in LLAVA_NEXT_GRIDS]
        points = []
        for point in grid_pinpoints:
            height, width = (int(x) for x in point)
            if height <= 0 or width <= 0 or height % tile or width % tile:
                raise ValueError(
                    f"anyres canvas [{height}, {width}] must have sides that are positive multiples of the "
                    f"tower's {tile}-pixel input"
                )
            points.append((height, width))
        geometry = cls(tile, patch_grid, tuple(points))
        kept = tuple(
            p
            for p in points
            if (max_tiles is None or geometry.tiles_of(p) <= max_tiles)
            and (max_image_tokens is None or geometry.max_tokens_of(p) <= max_image_tokens)
        )
        if not kept:
            raise ValueError(
                f"anyres: no canvas of {points} fits max_tiles {max_tiles} and max_image_tokens "
                f"{max_image_tokens} (the smallest can carry {min(geometry.max_tokens_of(p) for p in points)} "
                "tokens)"
            )
        return cls(tile, patch_grid, kept)

    def tiles_of(self, canvas: tuple[int, int]) -> int:
        """Tiles a canvas is cut into (the base view not counted)."""
        return (canvas[0] // self.tile) * (canvas[1] // self.tile)

    def max_tokens_of(self, canvas: tuple[int, int]) -> int:
        """Most tokens an image tiled to `canvas` can carry: nothing unpadded, a newline per feature row."""
        rows = canvas[0] // self.tile * self.patch_grid
        cols = canvas[1] // self.tile * self.patch_grid
        return self.patch_grid**2 + rows * (cols + 1)

    @property
    def max_tokens(self) -> int:
        """Most tokens any image can carry."""
        return max(self.max_tokens_of(p) for p in self.pinpoints)

    def best_resolution(self, height: int, width: int) -> tuple[int, int]:
        """The canvas that keeps most of the image's pixels after an aspect-preserving resize, then wastes the
        least (transformers' `select_best_resolution`)."""
        best, best_effective, best_wasted = self.pinpoints[0], 0, float("inf")
        for canvas_h, canvas_w in self.pinpoints:
            scale = min(canvas_w / width, canvas_h / height)
            effective = min(int(width * scale) * int(height * scale), width * height)
            wasted = canvas_w * canvas_h - effective
            if effective > best_effective or (effective == best_effective and wasted < best_wasted):
                best, best_effective, best_wasted = (canvas_h, canvas_w), effective, wasted
        return best

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of tiles for an image of this size."""
        canvas_h, canvas_w = self.best_resolution(height, width)
        return canvas_h // self.tile, canvas_w // self.tile

    def num_views(self, height: int, width: int) -> int:
        """Tower inputs for one image: the base view and its tiles."""
        rows, cols = self.grid_shape(height, width)
        return 1 + rows * cols

    def unpadded_shape(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the tiles' feature grid once the padding around the resized image is cut off
        (transformers' `unpad_image`: an odd margin leaves one padded row or column)."""
        rows, cols = self.grid_shape(height, width)
        current_h, current_w = rows * self.patch_grid, cols * self.patch_grid
        if width / height > current_w / current_h:
            new_h = int(round(height * (current_w / width), 7))
            current_h -= (current_h - new_h) // 2 * 2
        else:
            new_w = int(round(width * (current_h / height), 7))
            current_w -= (current_w - new_w) // 2 * 2
        return current_h, current_w

    def num_tokens(self, height: int, width: int) -> int:
        """Image tokens for an image of this size: the base view's grid, then the unpadded tiles' features with
        a newline closing each row."""
        rows, cols = self.unpadded_shape(height, width)
        return self.patch_grid**2 + rows * (cols + 1)


ImageTokens = int | AnyresGeometry
"""What an image costs in tokens: a fixed count per image, or any-resolution geometry (by the image's size)."""


def image_token_count(rule: ImageTokens, height: int, width: int) -> int:
    """Tokens of one image of (height, width) under `rule`."""
    return rule if isinstance(rule, int) else rule.num_tokens(height, width)


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
