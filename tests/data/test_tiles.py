"""Any-resolution pixels (data/tiles.py) against transformers' LlavaNextImageProcessor (PIL backend)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava_next import LlavaNextImageProcessorPil

from llava_ft.data.anyres import AnyresGeometry
from llava_ft.data.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageProcessor
from llava_ft.data.tiles import AnyresImageProcessor, pixel_inputs

# (height, width): portrait, landscape, tiny, large, square, one tile exactly, odd sizes, extreme aspects.
PIXEL_SIZES = [(150, 70), (70, 150), (5, 7), (1, 1), (700, 900), (64, 64), (129, 64), (33, 77), (40, 400)]


def noise(height: int, width: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return img if mode == "RGB" else img.convert(mode)


def llava_next_processor(geometry: AnyresGeometry, mean, std) -> LlavaNextImageProcessorPil:
    """transformers' LLaVA-NeXT processor as an export configures it for a tower of `geometry.tile` px."""
    tile = geometry.tile
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_mean=list(mean),
        image_std=list(std),
        image_grid_pinpoints=[list(p) for p in geometry.pinpoints],
    )


@pytest.mark.parametrize(
    ("geometry", "mean", "std"),
    [
        (AnyresGeometry.build(64, 8), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        # SigLIP's normalisation, canvases of its own and a tile budget.
        (
            AnyresGeometry.build(48, 4, [[48, 96], [96, 48], [96, 96], [48, 144]], max_tiles=3),
            (0.5,) * 3,
            (0.5,) * 3,
        ),
    ],
)
def test_processor_equals_transformers_llava_next(geometry: AnyresGeometry, mean, std) -> None:
    ours = AnyresImageProcessor(geometry, mean, std)
    assert ours.matches_llava_next
    reference = llava_next_processor(geometry, mean, std)
    # The settings an export writes, through a saved preprocessor config, make the same views.
    written = LlavaNextImageProcessorPil.from_dict(
        LlavaNextImageProcessorPil(**ours.llava_next_kwargs()).to_dict()
    )
    for k, (height, width) in enumerate(PIXEL_SIZES):
        img = noise(height, width, seed=k)
        want = reference(images=img, return_tensors="pt")
        got = ours(img)
        assert want["image_sizes"].tolist() == [[height, width]]
        assert got.shape == (geometry.num_views(height, width), 3, geometry.tile, geometry.tile)
        torch.testing.assert_close(got, want["pixel_values"][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(
            got, written(images=img, return_tensors="pt")["pixel_values"][0], atol=1e-6, rtol=0
        )
    # Other modes go through the same RGB conversion (grey; transparency on white, as convert_to_rgb).
    for mode in ("L", "RGBA", "P"):
        img = noise(90, 50, mode=mode)
        torch.testing.assert_close(ours(img), reference(images=img, return_tensors="pt")["pixel_values"][0])


def test_base_view_takes_the_fixed_processors_aspect() -> None:
    """The tiles are LLaVA-NeXT's whatever the aspect; the base view is the wrapped processor's view."""
    geometry = AnyresGeometry.build(64, 8)
    fixed = ImageProcessor(64, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), aspect="pad")
    ours = AnyresImageProcessor.wrap(fixed, geometry)
    assert (ours.mean, ours.std, ours.base_aspect, ours.image_size) == (fixed.mean, fixed.std, "pad", 64)
    assert ours.anyres and not getattr(fixed, "anyres", False) and not ours.matches_llava_next
    reference = llava_next_processor(geometry, fixed.mean, fixed.std)
    img = noise(150, 70)
    got, want = ours(img), reference(images=img, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(got[1:], want[1:], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[0], fixed(img))
    assert not torch.allclose(got[0], want[0])  # LLaVA-NeXT squashes the base view
    with pytest.raises(ValueError, match="64-px processor"):
        AnyresImageProcessor.wrap(ImageProcessor(32), geometry)
    # The image kept for later is the image itself: its views depend on its full size.
    assert torch.equal(ours(ours.resized(img)), got)


def test_pixel_inputs_carry_views_and_sizes() -> None:
    geometry = AnyresGeometry.build(64, 8)
    images = [noise(150, 70, 1), noise(64, 64, 2), noise(40, 400, 3)]
    anyres = AnyresImageProcessor(geometry)
    out = pixel_inputs(anyres, images)
    assert (
        out["image_sizes"].tolist() == [[150, 70], [64, 64], [40, 400]]
        and out["image_sizes"].dtype == torch.long
    )
    views = [geometry.num_views(h, w) for h, w in out["image_sizes"].tolist()]
    assert out["pixel_values"].shape == (sum(views), 3, 64, 64)
    assert torch.equal(out["pixel_values"], torch.cat([anyres(img) for img in images]))
    fixed = ImageProcessor(64)
    out = pixel_inputs(fixed, images)
    assert out.keys() == {"pixel_values"} and torch.equal(
        out["pixel_values"], torch.stack([fixed(i) for i in images])
    )
    assert pixel_inputs(anyres, []) == {} and pixel_inputs(None, []) == {}
