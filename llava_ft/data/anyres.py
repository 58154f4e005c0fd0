"""LLaVA-NeXT's any-resolution geometry: which canvas an image is tiled to and how many tokens it becomes.

`AnyresGeometry` is pure arithmetic on (height, width) (no torch, so data commands start fast), shared by
preparation (token counts from image headers, before any pixel is decoded), the model (unpadding the tiles'
features) and export (the pinpoints written to the config). It follows transformers' LlavaNext
(`select_best_resolution`, `get_anyres_image_grid_shape`, `unpad_image`), which the tests use as the reference.
The pixels of the views are cut in `data/tiles.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
