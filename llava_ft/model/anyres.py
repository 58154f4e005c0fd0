"""Any-resolution features: one image's projected views packed as LLaVA-NeXT packs them.

The base view's features come first, then the tiles' features put back on one map (rows of tiles, each a
patch grid), the padding around the resized image cut off, and a learned newline embedding closing each row
(transformers' LlavaNext `pack_image_features`, merge "spatial_unpad"; the tests use it as the reference).
"""

from __future__ import annotations

import torch

from llava_ft.data.anyres import AnyresGeometry


def pack_image(
    views: torch.Tensor, geometry: AnyresGeometry, height: int, width: int, newline: torch.Tensor
) -> torch.Tensor:
    """[num_views, grid*grid, D] features of one image of (height, width) -> [num_tokens, D]."""
    rows, cols = geometry.grid_shape(height, width)
    grid = geometry.patch_grid
    if views.shape[:2] != (1 + rows * cols, grid * grid):
        raise ValueError(
            f"an image of {height}x{width} needs {1 + rows * cols} views of {grid * grid} features, got "
            f"{tuple(views.shape[:2])}"
        )
    base, tiles = views[0], views[1:]
    dim = views.shape[-1]
    # [rows, cols, grid, grid, D] -> [rows * grid, cols * grid, D]: tile rows stacked, tiles side by side.
    full = (
        tiles.reshape(rows, cols, grid, grid, dim)
        .permute(0, 2, 1, 3, 4)
        .reshape(rows * grid, cols * grid, dim)
    )
    keep_h, keep_w = geometry.unpadded_shape(height, width)
    top, left = (rows * grid - keep_h) // 2, (cols * grid - keep_w) // 2
    full = full[top : top + keep_h, left : left + keep_w]
    ends = newline.to(full.dtype).expand(keep_h, 1, dim)
    return torch.cat([base, torch.cat([full, ends], dim=1).reshape(-1, dim)])
