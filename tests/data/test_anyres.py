"""Any-resolution geometry and pixels against transformers' LLaVA-NeXT functions and image processor (the
references)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from llava_ft.data.anyres import AnyresGeometry, image_token_count

# Sizes that hit ties, odd margins, extreme aspects and images smaller than one tile.
SIZES = [(336, 336), (480, 640), (640, 480), (1000, 200), (200, 1000), (33, 77), (1080, 1920), (337, 1009)]


def _sizes(n: int = 200) -> list[tuple[int, int]]:
    rng = random.Random(0)
    return SIZES + [(rng.randint(10, 3000), rng.randint(10, 3000)) for _ in range(n)]


@pytest.mark.parametrize("tile,grid", [(336, 24), (64, 8), (384, 27)])
def test_geometry_matches_transformers_llava_next(tile: int, grid: int) -> None:
    geometry = AnyresGeometry.build(tile, grid)
    pinpoints = [list(p) for p in geometry.pinpoints]
    assert pinpoints[0] == [tile, 2 * tile] and len(pinpoints) == 5
    for height, width in _sizes():
        assert geometry.best_resolution(height, width) == select_best_resolution((height, width), pinpoints)
        assert geometry.grid_shape(height, width) == get_anyres_image_grid_shape(
            (height, width), pinpoints, tile
        )
        assert geometry.num_views(height, width) == image_size_to_num_patches(
            (height, width), pinpoints, tile
        )
        rows, cols = geometry.grid_shape(height, width)
        features = torch.zeros(1, rows * grid, cols * grid)
        assert geometry.unpadded_shape(height, width) == tuple(
            unpad_image(features, (height, width)).shape[1:]
        )
        h, w = geometry.unpadded_shape(height, width)
        assert geometry.num_tokens(height, width) == grid * grid + h * (w + 1)
        assert image_token_count(geometry, height, width) == geometry.num_tokens(height, width)
        assert geometry.num_tokens(height, width) <= geometry.max_tokens


def test_caps_leave_out_canvases() -> None:
    full = AnyresGeometry.build(64, 8)
    assert AnyresGeometry.build(64, 8, max_tiles=2).pinpoints == ((64, 128), (128, 64))
    # A tall canvas has more feature rows, so more newlines: 64 + 16 x 9 tokens against 64 + 8 x 17.
    cap = full.max_tokens_of((128, 64))
    assert cap == 208 and full.max_tokens_of((64, 128)) == 200
    capped = AnyresGeometry.build(64, 8, max_image_tokens=cap)
    assert capped.pinpoints == ((64, 128), (128, 64))
    assert all(capped.num_tokens(h, w) <= cap for h, w in _sizes())
    with pytest.raises(ValueError, match="no canvas"):
        AnyresGeometry.build(64, 8, max_image_tokens=10)
    with pytest.raises(ValueError, match="multiples"):
        AnyresGeometry.build(64, 8, [[64, 100]])


def test_fixed_rule_is_a_count() -> None:
    assert image_token_count(576, 10, 5000) == 576
