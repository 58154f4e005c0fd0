"""open_clip image tower -> transformers CLIPVisionModel: the converted model computes the same features."""

from __future__ import annotations

import open_clip
import pytest
import torch
from transformers import CLIPVisionModel

from llava_ft.config import VisionSection
from llava_ft.model.clip_convert import open_clip_to_hf_clip_vision, save_hf_clip_vision
from llava_ft.model.vision import build_vision_tower
from llava_ft.testing.tiny_vision import write_tiny_open_clip

LAYERS = 3


def open_clip_tower(tmp_path, quick_gelu: bool, feature_layer: int = -2):
    folder = write_tiny_open_clip(
        tmp_path / "oc", image_size=32, width=64, layers=LAYERS, quick_gelu=quick_gelu
    )
    return build_vision_tower(VisionSection("open_clip", f"local-dir:{folder}", feature_layer=feature_layer))


def open_clip_final_cls(visual, pixels: torch.Tensor) -> torch.Tensor:
    """ln_post of the final CLS token, computed block by block (checks ln_post -> post_layernorm)."""
    x = visual._embeds(pixels)
    for block in visual.transformer.resblocks:
        x = block(x)
    return visual.ln_post(x[:, 0])


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_converted_hf_model_matches_open_clip(tmp_path, quick_gelu):
    tower = open_clip_tower(tmp_path, quick_gelu)
    out = save_hf_clip_vision(tower.model, tower.open_clip_cfg, tmp_path / "hf", processor=tower.processor)
    hf, info = CLIPVisionModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert hf.config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    assert hf.config.num_hidden_layers == LAYERS and hf.config.num_attention_heads == 2

    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hf_out = hf(pixel_values=pixels, output_hidden_states=True)
        ours = tower(pixels)
        diff = (hf_out.hidden_states[-2][:, 1:] - ours).abs().max().item()
        pooled_diff = (hf_out.pooler_output - open_clip_final_cls(tower.model, pixels)).abs().max().item()
    print(f"quick_gelu={quick_gelu}: penultimate patch tokens max|diff| {diff:.2e}, pooled {pooled_diff:.2e}")
    assert diff < 1e-5 and pooled_diff < 1e-5

    # The folder also serves as the hf backend, with the same processor and the same features.
    hf_tower = build_vision_tower(VisionSection("hf", str(out)))
    assert hf_tower.processor == tower.processor
    with torch.no_grad():
        torch.testing.assert_close(hf_tower(pixels), ours, atol=1e-5, rtol=0)


def test_wrong_activation_is_visible(tmp_path):
    """Negative control: the comparison above is sensitive to QuickGELU vs GELU (a QuickGELU-trained open_clip
    tower loads as GELU unless its config says otherwise)."""
    tower = open_clip_tower(tmp_path, quick_gelu=True)
    config, state = open_clip_to_hf_clip_vision(tower.model, {**tower.open_clip_cfg, "quick_gelu": False})
    hf = CLIPVisionModel(config)
    hf.load_state_dict(state)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        diff = (
            (hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:] - tower(pixels))
            .abs()
            .max()
        )
    assert diff > 1e-3


def test_whole_clip_state_dict_converts_like_the_visual_module(tmp_path):
    folder = write_tiny_open_clip(tmp_path, image_size=32, layers=2)
    clip = open_clip.create_model(f"local-dir:{folder}")
    cfg = open_clip.get_model_config(f"local-dir:{folder}")
    config_a, from_module = open_clip_to_hf_clip_vision(clip.visual, cfg)
    config_b, from_whole = open_clip_to_hf_clip_vision(clip.state_dict(), cfg)
    assert config_a.to_dict() == config_b.to_dict()
    assert from_module.keys() == from_whole.keys() == CLIPVisionModel(config_a).state_dict().keys()
    for key in from_module:
        assert torch.equal(from_module[key], from_whole[key]), key


def test_unsupported_towers_are_refused(tmp_path):
    tower = open_clip_tower(tmp_path, quick_gelu=True)
    cfg = tower.open_clip_cfg
    with pytest.raises(ValueError, match="ls_init_value"):
        open_clip_to_hf_clip_vision(
            tower.model, {**cfg, "vision_cfg": {**cfg["vision_cfg"], "ls_init_value": 0.1}}
        )
    extra = {**tower.model.state_dict(), "transformer.resblocks.0.ls_1.gamma": torch.ones(64)}
    with pytest.raises(ValueError, match="ls_1.gamma"):
        open_clip_to_hf_clip_vision(extra, cfg)
    with pytest.raises(ValueError, match="head_width"):
        open_clip_to_hf_clip_vision(
            tower.model, {**cfg, "vision_cfg": {**cfg["vision_cfg"], "head_width": 48}}
        )
