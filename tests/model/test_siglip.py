"""SigLIP towers: open_clip's timm trunk and transformers' SiglipVisionModel return one block's tokens (no CLS),
open_clip's tower converts to SiglipVisionModel with the same features, preprocessing gives SigLIP's pixels, and
token counts come from the config files in fixed and any-resolution modes."""

from __future__ import annotations

import copy
import logging

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from timm.layers import LayerScale
from transformers import AutoImageProcessor, SiglipModel, SiglipVisionConfig, SiglipVisionModel

from llava_ft.config import AnyresSection, VisionSection
from llava_ft.data.anyres import AnyresGeometry
from llava_ft.model.siglip_convert import open_clip_to_hf_siglip_vision, save_hf_siglip_vision
from llava_ft.model.trainability import open_used_tower, vision_lora_targets
from llava_ft.model.vision import (
    SIGLIP_MEAN,
    SIGLIP_STD,
    OpenClipTimmVisionTower,
    _published_preprocess,
    build_vision_tower,
    image_token_rule,
    tokens_per_image,
)
from llava_ft.testing.tiny_vision import write_tiny_hf_siglip, write_tiny_open_clip_siglip

LAYERS, WIDTH, IMAGE, PATCH = 3, 32, 32, 8  # 4x4 patch grid, every token a patch
GRID = IMAGE // PATCH
# SiglipTextConfig fields of the smallest whole SiglipModel (token ids inside its vocabulary).
TINY_TEXT = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 1,
    "vocab_size": 64,
    "max_position_embeddings": 8,
    "pad_token_id": 1,
    "bos_token_id": 2,
    "eos_token_id": 3,
}


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory):
    return write_tiny_open_clip_siglip(
        tmp_path_factory.mktemp("oc_siglip"), image_size=IMAGE, patch_size=PATCH, width=WIDTH, layers=LAYERS
    )


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_tiny_hf_siglip(
        tmp_path_factory.mktemp("hf_siglip"), image_size=IMAGE, patch_size=PATCH, width=WIDTH, layers=LAYERS
    )


def tower(backend: str, folder, **kwargs):
    model = f"local-dir:{folder}" if backend == "open_clip" else str(folder)
    return build_vision_tower(VisionSection(backend, model, **kwargs))


def timm_block_outputs(visual, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output of open_clip's timm trunk, running the blocks one at a time."""
    trunk = visual.trunk
    x, outputs = trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(pixels))), []
    for block in trunk.blocks:
        x = block(x)
        outputs.append(x)
    return outputs


def hf_block_outputs(model: SiglipVisionModel, pixels: torch.Tensor) -> list[torch.Tensor]:
    x, outputs = model.embeddings(pixels), []
    for layer in model.encoder.layers:
        x = layer(x, None)
        outputs.append(x)
    return outputs


def block_outputs(backend: str, model, pixels: torch.Tensor) -> list[torch.Tensor]:
    return (timm_block_outputs if backend == "open_clip" else hf_block_outputs)(model, pixels)


LAYER_TO_BLOCK = {-2: LAYERS - 2, -1: LAYERS - 1, 1: 0, LAYERS: LAYERS - 1, -LAYERS: 0}


@pytest.mark.parametrize("backend", ["open_clip", "hf"])
@pytest.mark.parametrize("feature_layer", sorted(LAYER_TO_BLOCK))
def test_feature_layer_selects_that_blocks_tokens_all_of_them(open_clip_dir, hf_dir, backend, feature_layer):
    t = tower(backend, open_clip_dir if backend == "open_clip" else hf_dir, feature_layer=feature_layer)
    assert (t.num_tokens, t.hidden_size, t.image_size, t.select_strategy) == (GRID**2, WIDTH, IMAGE, "full")
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        expected = block_outputs(backend, t.model, pixels)[LAYER_TO_BLOCK[feature_layer]]
        assert expected.shape == (2, GRID**2, WIDTH)  # no CLS to drop
        torch.testing.assert_close(t(pixels), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["open_clip", "hf"])
def test_pool(open_clip_dir, hf_dir, backend):
    t = tower(backend, open_clip_dir if backend == "open_clip" else hf_dir, pool=2)
    pixels = torch.randn(1, 3, IMAGE, IMAGE)
    with torch.no_grad():
        grid = block_outputs(backend, t.model, pixels)[-2].reshape(1, GRID, GRID, WIDTH)
        out = t(pixels)
    assert out.shape == (1, (GRID // 2) ** 2, WIDTH) and t.num_tokens == (GRID // 2) ** 2
    torch.testing.assert_close(out[:, 0], grid[:, :2, :2].mean(dim=(1, 2)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("feature_layer", [-2, -1, 1])
def test_open_clip_siglip_converts_to_transformers(open_clip_dir, tmp_path, feature_layer):
    """The converted SiglipVisionModel's hidden_states[feature_layer] are llava_ft's features, its pooled output
    is open_clip's image embedding (the head converts too), and the folder serves as the hf backend."""
    t = tower("open_clip", open_clip_dir, feature_layer=feature_layer, image_aspect="resize")
    config, state = open_clip_to_hf_siglip_vision(t.model)
    assert config.hidden_act == "gelu"  # timm's SigLIP trunk uses erf GELU
    assert (config.num_hidden_layers, config.hidden_size, config.image_size, config.patch_size) == (
        LAYERS,
        WIDTH,
        IMAGE,
        PATCH,
    )
    hf = SiglipVisionModel(config).eval()
    assert state.keys() == hf.state_dict().keys()
    hf.load_state_dict(state, strict=True)
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        out = hf(pixel_values=pixels, output_hidden_states=True)
        diff = float((out.hidden_states[feature_layer] - t(pixels)).abs().max())
        pooled = float((out.pooler_output - t.model(pixels)).abs().max())
    print(f"feature_layer {feature_layer}: features max|diff| {diff:.2e}, pooled {pooled:.2e}")
    assert diff < 1e-5 and pooled < 1e-5

    folder = save_hf_siglip_vision(t.model, tmp_path / "hf", processor=t.processor)
    hf_tower = tower("hf", folder, feature_layer=feature_layer, image_aspect="resize")
    assert type(hf_tower.model) is SiglipVisionModel and hf_tower.processor == t.processor
    with torch.no_grad():
        torch.testing.assert_close(hf_tower(pixels), t(pixels), atol=1e-5, rtol=0)


def test_key_map(open_clip_dir):
    """Where each open_clip (timm) tensor goes: q, k, v split out of the fused qkv; the pooling head's q and kv
    packed into nn.MultiheadAttention's in_proj; positions without their batch axis."""
    t = tower("open_clip", open_clip_dir)
    trunk = t.model.trunk.state_dict()
    _, state = open_clip_to_hf_siglip_vision(t.model)
    w = WIDTH
    qkv = trunk["blocks.1.attn.qkv.weight"]
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        assert torch.equal(state[f"encoder.layers.1.self_attn.{name}.weight"], qkv[i * w : (i + 1) * w])
    pairs = {
        "pos_embed": "embeddings.position_embedding.weight",
        "blocks.2.norm1.bias": "encoder.layers.2.layer_norm1.bias",
        "blocks.0.attn.proj.weight": "encoder.layers.0.self_attn.out_proj.weight",
        "blocks.0.mlp.fc2.bias": "encoder.layers.0.mlp.fc2.bias",
        "norm.weight": "post_layernorm.weight",
        "attn_pool.latent": "head.probe",
        "attn_pool.norm.bias": "head.layernorm.bias",
    }
    for src, dst in pairs.items():
        assert torch.equal(state[dst], trunk[src].reshape(state[dst].shape)), src
    in_proj = state["head.attention.in_proj_bias"]
    assert torch.equal(in_proj[:w], trunk["attn_pool.q.bias"]) and torch.equal(
        in_proj[w:], trunk["attn_pool.kv.bias"]
    )


def test_unconvertible_trunks_are_refused(open_clip_dir):
    t = tower("open_clip", open_clip_dir)
    scaled = copy.deepcopy(t.model)
    scaled.trunk.blocks[0].ls1 = LayerScale(WIDTH)
    with pytest.raises(ValueError, match="ls1"):
        open_clip_to_hf_siglip_vision(scaled)
    projected = copy.deepcopy(t.model)
    projected.head.add_module("proj", torch.nn.Linear(WIDTH, WIDTH))
    with pytest.raises(ValueError, match="timm_proj"):
        open_clip_to_hf_siglip_vision(projected)
    with pytest.raises(ValueError, match="not an open_clip timm ViT"):
        open_clip_to_hf_siglip_vision(torch.nn.Linear(2, 2))


def random_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = ((37, 23), (23, 37), (61, 40), (32, 32), (300, 170), (9, 70))  # (width, height)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def test_preprocessing_equals_siglip_image_processor(hf_dir, open_clip_dir):
    """image_aspect resize is SigLIP's own preprocessing: transformers' SiglipImageProcessor (PIL backend) for
    an hf folder, open_clip's squash transform for an open_clip one, pixel for pixel."""
    hf_tower = tower("hf", hf_dir, image_aspect="resize")
    assert (hf_tower.processor.mean, hf_tower.processor.std) == (SIGLIP_MEAN, SIGLIP_STD)
    reference = AutoImageProcessor.from_pretrained(hf_dir, backend="pil")
    assert type(reference).__name__ == "SiglipImageProcessorPil"
    oc_tower = tower("open_clip", open_clip_dir, image_aspect="resize")
    assert oc_tower.processor == hf_tower.processor
    oc_transform = image_transform_v2(PreprocessCfg(**oc_tower.model.preprocess_cfg), is_train=False)
    for image in random_images():
        want = reference(images=image, return_tensors="pt")["pixel_values"][0]
        assert float((hf_tower.processor(image) - want).abs().max()) < 1e-6, image.size
        assert float((oc_tower.processor(image) - oc_transform(image)).abs().max()) < 1e-6, image.size


def test_whole_siglip_model_folder(tmp_path, capfd, caplog):
    """Published SigLIP checkpoints are whole SiglipModels: the vision tower loads from them, and the text
    tower's keys are expected there, so no load report lists them."""
    folder = write_tiny_hf_siglip(
        tmp_path, image_size=IMAGE, patch_size=PATCH, layers=2, text_config=TINY_TEXT
    )
    with caplog.at_level(logging.WARNING):
        t = tower("hf", folder)
    whole = SiglipModel.from_pretrained(folder).eval()
    pixels = torch.randn(1, 3, IMAGE, IMAGE)
    with torch.no_grad():
        expected = hf_block_outputs(whole.vision_model, pixels)[-2]
        torch.testing.assert_close(t(pixels), expected, atol=1e-5, rtol=0)
    assert tokens_per_image(VisionSection("hf", str(folder))) == t.num_tokens == GRID**2
    printed = capfd.readouterr()
    assert "text_model" not in printed.out + printed.err + caplog.text
    assert "logit_bias" not in caplog.text


def test_other_hf_model_types_are_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "siglip2_vision_model"}')
    with pytest.raises(ValueError, match="model_type 'siglip2_vision_model'.*CLIP and SigLIP"):
        tower("hf", tmp_path)


def test_token_counts_of_published_siglip_towers_from_config_files(tmp_path):
    """SO400M-14 at 384 px: 27x27 = 729 tokens (the convolution leaves 6 px out), no CLS; with anyres the
    geometry uses that tile and grid. Only config files are read (no weights file exists)."""
    named = VisionSection(
        "open_clip", "ViT-SO400M-14-SigLIP-384", pretrained=str(tmp_path / "absent.safetensors")
    )
    SiglipVisionConfig(image_size=384, patch_size=14, hidden_size=32, num_attention_heads=2).save_pretrained(
        tmp_path / "hf"
    )
    folder = VisionSection("hf", str(tmp_path / "hf"))
    for cfg in (named, folder):
        assert tokens_per_image(cfg) == image_token_rule(cfg) == 27**2
        cfg.anyres = AnyresSection(max_tiles=4)
        assert image_token_rule(cfg) == AnyresGeometry.build(384, 27, max_tiles=4)


def test_named_siglip_with_a_weights_file_gets_its_published_preprocessing():
    """open_clip gives a model name + local weights file CLIP's default mean/std; llava_ft takes the published
    tags' preprocessing instead (SigLIP's 0.5 and squash; CLIP's values are open_clip's defaults)."""
    siglip = _published_preprocess("ViT-SO400M-14-SigLIP-384")
    assert siglip == {
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "interpolation": "bicubic",
        "resize_mode": "squash",
    }
    clip = _published_preprocess("ViT-L-14-336-quickgelu")
    defaults = PreprocessCfg()
    assert clip == {
        "mean": defaults.mean,
        "std": defaults.std,
        "interpolation": defaults.interpolation,
        "resize_mode": defaults.resize_mode,
    }
    assert _published_preprocess("llava-ft-no-such-model") is None
    assert "ViT-SO400M-14-SigLIP-384" in open_clip.list_models()


@pytest.mark.parametrize("backend", ["open_clip", "hf"])
@pytest.mark.parametrize("feature_layer", [-2, 1])
def test_trainable_parts_are_those_that_reach_the_features(open_clip_dir, hf_dir, backend, feature_layer):
    """LoRA targets and a fully trained tower stop at the block whose output is used: later blocks, the final
    norm and the attention-pool head never reach the loss."""
    from peft import LoraConfig, get_peft_model

    folder = open_clip_dir if backend == "open_clip" else hf_dir
    t = tower(backend, folder, feature_layer=feature_layer)
    targets = vision_lora_targets(t)
    peft_tower = get_peft_model(t, LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    with torch.no_grad():  # B starts at zero, which would leave A without a gradient anywhere
        for name, p in peft_tower.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_tower(torch.randn(1, 3, IMAGE, IMAGE)).square().sum().backward()
    lora = {n: p for n, p in peft_tower.named_parameters() if "lora_" in n}
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values()), [
        n for n, p in lora.items() if p.grad is None or not p.grad.abs().sum()
    ]
    blocks = {int(n.split("blocks." if backend == "open_clip" else "layers.")[1].split(".")[0]) for n in lora}
    assert blocks == set(range(t.block + 1))

    full = tower(backend, folder, feature_layer=feature_layer)
    assert open_used_tower(full) > 0
    full(torch.randn(1, 3, IMAGE, IMAGE)).square().sum().backward()
    for name, p in full.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == p.requires_grad, name


def test_published_so400m_layout_converts_key_for_key():
    """open_clip's ViT-SO400M-14-SigLIP-384, built on the meta device (no weights, no memory): llava_ft's tower
    takes 729 tokens from it and it converts to a SiglipVisionModel of google/siglip-so400m-patch14-384's
    shape, every tensor in place."""
    with torch.device("meta"):
        clip = open_clip.create_model("ViT-SO400M-14-SigLIP-384", pretrained_text=False, device="meta")
    cfg = VisionSection("open_clip", "ViT-SO400M-14-SigLIP-384")
    t = OpenClipTimmVisionTower(cfg, clip.visual, open_clip.get_model_config(cfg.model))
    assert (t.num_tokens, t.hidden_size, t.image_size, t.block, t.select_strategy) == (
        729,
        1152,
        384,
        25,
        "full",
    )
    config, state = open_clip_to_hf_siglip_vision(clip.visual)
    shape = (
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.num_attention_heads,
    )
    assert shape == (1152, 4304, 27, 16) and (config.image_size, config.patch_size) == (384, 14)
    with torch.device("meta"):
        reference = SiglipVisionModel(config).state_dict()
    assert state.keys() == reference.keys()
    assert all(state[k].shape == reference[k].shape for k in reference)


def test_hf_siglip_folder_without_preprocessor_config_normalises_as_siglip(tmp_path, caplog):
    folder = write_tiny_hf_siglip(tmp_path, image_size=IMAGE, patch_size=PATCH, layers=2)
    (folder / "preprocessor_config.json").unlink()
    with caplog.at_level(logging.WARNING):
        t = tower("hf", folder)
    assert "no preprocessor_config.json" in caplog.text
    assert (t.processor.mean, t.processor.std) == (SIGLIP_MEAN, SIGLIP_STD)


def test_open_clip_siglip_preprocess_is_not_warned_about(open_clip_dir, caplog):
    """open_clip's squash resize is image_aspect resize: nothing to warn about."""
    with caplog.at_level(logging.WARNING, logger="llava_ft.model.vision"):
        tower("open_clip", open_clip_dir)
    assert "differs from" not in caplog.text
