"""Vision towers: shapes, feature_layer meaning against block-by-block forwards, pooling, loading paths."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

from llava_ft.config import VisionSection
from llava_ft.data.images import ImageProcessor
from llava_ft.model.vision import build_vision_tower, tokens_per_image
from llava_ft.testing.tiny_vision import register_tiny_open_clip, write_tiny_hf_clip, write_tiny_open_clip

LAYERS, WIDTH, IMAGE, PATCH = 3, 64, 32, 8  # 4x4 patch grid
GRID = IMAGE // PATCH


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory):
    return write_tiny_open_clip(
        tmp_path_factory.mktemp("oc"), image_size=IMAGE, patch_size=PATCH, width=WIDTH, layers=LAYERS
    )


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_tiny_hf_clip(
        tmp_path_factory.mktemp("hf"),
        image_size=IMAGE,
        patch_size=PATCH,
        width=WIDTH,
        layers=LAYERS,
        hidden_act="gelu",
    )


def tower(backend: str, folder, **kwargs):
    model = f"local-dir:{folder}" if backend == "open_clip" else str(folder)
    return build_vision_tower(VisionSection(backend, model, **kwargs))


def open_clip_block_outputs(visual, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output (CLS first), by running the blocks one at a time."""
    x, outputs = visual._embeds(pixels), []
    for block in visual.transformer.resblocks:
        x = block(x)
        outputs.append(x)
    return outputs


def hf_block_outputs(model: CLIPVisionModel, pixels: torch.Tensor) -> list[torch.Tensor]:
    x, outputs = model.pre_layrnorm(model.embeddings(pixels)), []
    for layer in model.encoder.layers:
        x = layer(x, None)
        outputs.append(x)
    return outputs


def naive_pool(patches: torch.Tensor, factor: int) -> torch.Tensor:
    """Mean of each factor x factor square of the row-major patch grid, one cell at a time."""
    batch, _, dim = patches.shape
    grid = patches.reshape(batch, GRID, GRID, dim)
    cells = []
    for row in range(0, GRID, factor):
        for col in range(0, GRID, factor):
            cells.append(grid[:, row : row + factor, col : col + factor].mean(dim=(1, 2)))
    return torch.stack(cells, dim=1)


# feature_layer -> 0-based block index, as transformers' hidden_states[feature_layer] is block (index - 1).
LAYER_TO_BLOCK = {-2: LAYERS - 2, -1: LAYERS - 1, 1: 0, LAYERS: LAYERS - 1, -LAYERS: 0}


@pytest.mark.parametrize("backend", ["open_clip", "hf"])
@pytest.mark.parametrize("feature_layer", sorted(LAYER_TO_BLOCK))
def test_feature_layer_selects_that_blocks_patch_tokens(open_clip_dir, hf_dir, backend, feature_layer):
    t = tower(backend, open_clip_dir if backend == "open_clip" else hf_dir, feature_layer=feature_layer)
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        blocks = (
            open_clip_block_outputs(t.model, pixels)
            if backend == "open_clip"
            else hf_block_outputs(t.model, pixels)
        )
        expected = blocks[LAYER_TO_BLOCK[feature_layer]][:, 1:]
        torch.testing.assert_close(t(pixels), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["open_clip", "hf"])
@pytest.mark.parametrize("pool", [1, 2, 4])
def test_shapes_and_pool(open_clip_dir, hf_dir, backend, pool):
    t = tower(backend, open_clip_dir if backend == "open_clip" else hf_dir, pool=pool)
    assert t.num_tokens == (GRID // pool) ** 2
    assert (t.hidden_size, t.image_size, t.dtype) == (WIDTH, IMAGE, torch.float32)
    pixels = torch.randn(3, 3, IMAGE, IMAGE)
    with torch.no_grad():
        out = t(pixels)
        penultimate = (open_clip_block_outputs if backend == "open_clip" else hf_block_outputs)(
            t.model, pixels
        )[-2]
    assert out.shape == (3, t.num_tokens, WIDTH)
    torch.testing.assert_close(out, naive_pool(penultimate[:, 1:], pool), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["open_clip", "hf"])
@pytest.mark.parametrize("pool", [1, 2, 4])
def test_tokens_per_image_from_the_config_files_equals_the_built_towers(open_clip_dir, hf_dir, backend, pool):
    folder = open_clip_dir if backend == "open_clip" else hf_dir
    cfg = VisionSection(backend, f"local-dir:{folder}" if backend == "open_clip" else str(folder), pool=pool)
    assert tokens_per_image(cfg) == build_vision_tower(cfg).num_tokens == (GRID // pool) ** 2


def test_tokens_per_image_of_a_named_open_clip_model_reads_no_weights(tmp_path):
    """A model name's config ships with open_clip: the count needs no weights file."""
    cfg = VisionSection(
        "open_clip", "ViT-L-14-336-quickgelu", pretrained=str(tmp_path / "absent.safetensors")
    )
    assert tokens_per_image(cfg) == (336 // 14) ** 2 == 576
    with pytest.raises(ValueError, match="pool 5 must be >= 1 and divide the 24x24 patch grid"):
        tokens_per_image(VisionSection("open_clip", "ViT-L-14-336-quickgelu", pool=5))


def test_processor_matches_the_tower(open_clip_dir, hf_dir):
    for backend, folder in (("open_clip", open_clip_dir), ("hf", hf_dir)):
        t = tower(backend, folder, image_aspect="crop")
        assert t.processor == ImageProcessor(IMAGE, aspect="crop")


def test_pretrained_weights_file_with_a_named_config(open_clip_dir):
    name, weights = register_tiny_open_clip(open_clip_dir, "llava-ft-test-tiny")
    named = build_vision_tower(VisionSection("open_clip", name, pretrained=str(weights)))
    local = tower("open_clip", open_clip_dir)
    pixels = torch.randn(1, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(named(pixels), local(pixels), atol=0, rtol=0)


def test_hf_tower_loads_a_whole_clip_model_folder(tmp_path, capfd, caplog):
    """LLaVA's towers are published as whole CLIPModel checkpoints (vision_model.* keys). The text tower's keys
    are expected there: no load report lists them; a key of neither tower is named in one line."""
    config = CLIPConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 1,
        },
        vision_config={
            "hidden_size": WIDTH,
            "intermediate_size": 2 * WIDTH,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE,
            "patch_size": PATCH,
        },
        projection_dim=16,
    )
    clip = CLIPModel(config).eval()
    clip.save_pretrained(tmp_path)
    t = tower("hf", tmp_path)
    pixels = torch.randn(1, 3, IMAGE, IMAGE)
    with torch.no_grad():
        expected = hf_block_outputs(clip.vision_model, pixels)[-2][:, 1:]
        torch.testing.assert_close(t(pixels), expected, atol=1e-5, rtol=0)
    assert tokens_per_image(VisionSection("hf", str(tmp_path))) == t.num_tokens == GRID**2
    printed = capfd.readouterr()
    assert "text_model" not in printed.out + printed.err + caplog.text
    assert "not sharded" not in printed.out + printed.err + caplog.text
    weights = tmp_path / "model.safetensors"
    save_file({**load_file(weights), "stray.weight": torch.zeros(1)}, weights, metadata={"format": "pt"})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tower("hf", tmp_path)
    assert "1 checkpoint key(s) not used by the vision tower: stray.weight" in caplog.text
    assert "text_model" not in caplog.text


def test_bf16_tower_accepts_fp32_pixels(open_clip_dir):
    t = tower("open_clip", open_clip_dir).to(torch.bfloat16)
    out = t(torch.randn(1, 3, IMAGE, IMAGE))
    assert t.dtype == out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"feature_layer": 0}, "feature_layer 0 must select a block output"),
        ({"feature_layer": -(LAYERS + 1)}, "must select a block output"),
        ({"feature_layer": LAYERS + 1}, "must select a block output"),
        ({"pool": 3}, "pool 3 must be >= 1 and divide the 4x4 patch grid"),
        ({"pool": 0}, "pool 0"),
    ],
)
def test_bad_settings_are_rejected(open_clip_dir, hf_dir, kwargs, message):
    for backend, folder in (("open_clip", open_clip_dir), ("hf", hf_dir)):
        with pytest.raises(ValueError, match=message):
            tower(backend, folder, **kwargs)


def test_bad_sources_are_rejected(open_clip_dir, hf_dir, tmp_path):
    with pytest.raises(ValueError, match="would be ignored"):
        build_vision_tower(
            VisionSection("open_clip", f"local-dir:{open_clip_dir}", pretrained="x.safetensors")
        )
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        build_vision_tower(VisionSection("open_clip", f"local-dir:{tmp_path}"))
    with pytest.raises(ValueError, match="never downloaded"):
        build_vision_tower(VisionSection("open_clip", "hf-hub:org/model"))
    with pytest.raises(FileNotFoundError, match="missing.pt: open_clip weights file not found"):
        build_vision_tower(VisionSection("open_clip", "ViT-B-32", pretrained=str(tmp_path / "missing.pt")))
    with pytest.raises(ValueError, match="unknown open_clip model"):
        build_vision_tower(VisionSection("open_clip", "no-such-model"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_vision_tower(VisionSection("hf", str(tmp_path)))
    with pytest.raises(ValueError, match="unknown vision backend"):
        build_vision_tower(VisionSection("timm", str(hf_dir)))  # type: ignore[arg-type]


def test_hf_folder_with_missing_weights_is_refused(tmp_path):
    folder = write_tiny_hf_clip(tmp_path, image_size=IMAGE, patch_size=PATCH, width=WIDTH, layers=1)
    weights = folder / "model.safetensors"
    state = load_file(weights)
    del state["encoder.layers.0.mlp.fc1.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"missing from the checkpoint: \['encoder.layers.0.mlp.fc1.weight'\]"
    ):
        tower("hf", folder)


@pytest.mark.parametrize("backend", ["open_clip", "hf"])
@pytest.mark.parametrize("feature_layer", [-1, -2, 1])
def test_vision_lora_only_where_it_reaches_the_features(open_clip_dir, hf_dir, backend, feature_layer):
    """Every LoRA weight trainable.vision=lora adds must get a gradient: blocks after `feature_layer` never
    reach the features, so they get no adapter (one there would be trainable in name only)."""
    from peft import LoraConfig, get_peft_model

    from llava_ft.model.trainability import vision_lora_targets

    t = tower(backend, open_clip_dir if backend == "open_clip" else hf_dir, feature_layer=feature_layer)
    peft_tower = get_peft_model(t, LoraConfig(r=2, lora_alpha=4, target_modules=vision_lora_targets(t)))
    with torch.no_grad():  # B starts at zero, which would leave A without a gradient anywhere
        for name, p in peft_tower.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    pixels = torch.randn(1, 3, t.image_size, t.image_size)
    peft_tower(pixels).square().sum().backward()
    lora = {n: p for n, p in peft_tower.named_parameters() if "lora_" in n}
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values()), [
        n for n, p in lora.items() if p.grad is None or not p.grad.abs().sum()
    ]
    blocks = {
        int(n.split("resblocks." if backend == "open_clip" else "layers.")[1].split(".")[0]) for n in lora
    }
    assert blocks == set(range(t.block + 1))
