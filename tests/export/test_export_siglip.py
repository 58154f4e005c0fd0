"""hf-llava with a SigLIP tower (open_clip's timm trunk converted, or a transformers SiglipVisionModel folder):
transformers' Llava reloads it with a SiglipVisionModel and the "full" feature strategy, its processor expands
<image> to every patch and gives llava_ft's pixels, and the logits equal llava_ft's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration, SiglipVisionModel

from llava_ft.constants import IMAGE_TOKEN_INDEX
from llava_ft.export import export_checkpoint
from llava_ft.exported import load_export
from llava_ft.model.build import build_model
from llava_ft.model.vision import HFSiglipVisionTower, build_vision_tower
from llava_ft.stage import apply_stage_weights, read_stage_config
from llava_ft.testing.tiny_llava import save_random_stage, tiny_config, tiny_siglip_vision

MAX_DIFF = 1e-4  # fp32 on CPU: only summation order differs
IMAGE, PATCH = 32, 8


def siglip_stage(root: Path, out: Path, backend: str, aspect: str, vision_mode: str = "frozen") -> Path:
    """A stage output with a tiny SigLIP tower and random non-zero trained weights (LoRA LLM, projector)."""
    cfg = tiny_config(root, llm_mode="lora", vision_mode=vision_mode)
    cfg.model.vision = tiny_siglip_vision(
        root, backend, image_size=IMAGE, patch_size=PATCH, image_aspect=aspect
    )
    return save_random_stage(cfg, out, seed=7)


@torch.no_grad()
def reference(
    ckpt: Path, hf_ids: list[int], image_id: int, image: Image.Image
) -> tuple[torch.Tensor, torch.Tensor]:
    """llava_ft's pixels and logits (adapters applied, unmerged) for the export's prompt ids, its <image> tokens
    as llava_ft's placeholders (the export checks itself that the ids are training's)."""
    tokenizer, model = build_model(read_stage_config(ckpt), load_in_4bit=False)
    apply_stage_weights(model, ckpt, adapters="load")
    model.eval()
    ids = [IMAGE_TOKEN_INDEX if t == image_id else t for t in hf_ids]
    pixels = model.vision_tower.processor(image).unsqueeze(0)
    ids_t = torch.tensor([ids])
    return pixels, model.llm(inputs_embeds=model.embed(ids_t, pixels), use_cache=False).logits.float()


def reference_processor(ckpt: Path):
    return build_vision_tower(read_stage_config(ckpt).model.vision).processor


@pytest.mark.parametrize(
    ("backend", "aspect", "vision_mode"),
    [("open_clip", "resize", "frozen"), ("hf", "pad", "frozen"), ("open_clip", "pad", "full")],
)
def test_hf_llava_with_a_siglip_tower(root, tmp_path, backend, aspect, vision_mode):
    ckpt = siglip_stage(
        root, root / f"stage_siglip_{backend}_{aspect}_{vision_mode}", backend, aspect, vision_mode
    )
    out = tmp_path / "llava"
    result = export_checkpoint(ckpt, out, fmt="hf-llava")  # its own verification: ids, pixels, logits
    print(f"siglip {backend} {aspect} {vision_mode}: export max |logit diff| {result.export_max_diff:.3g}")
    assert result.export_max_diff < MAX_DIFF

    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "siglip_vision_model"
    assert config["vision_feature_select_strategy"] == "full"
    assert config["image_seq_length"] == (IMAGE // PATCH) ** 2
    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert isinstance(model.model.vision_tower, SiglipVisionModel)

    image = Image.fromarray(np.random.RandomState(3).randint(0, 255, (20, 44, 3), dtype=np.uint8))
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    image_id = model.config.image_token_index
    hf_ids = inputs["input_ids"][0].tolist()
    assert hf_ids.count(image_id) == (IMAGE // PATCH) ** 2  # every patch, no CLS
    pixels, ref = reference(ckpt, hf_ids, image_id, image)
    assert float((inputs["pixel_values"] - pixels).abs().max()) < 1e-6
    with torch.no_grad():
        got = model(**inputs).logits
    diff = float((ref - got[..., : ref.shape[-1]]).abs().max())
    print(f"siglip {backend} {aspect}: processor + Llava vs llava_ft max |logit diff| {diff:.3g}")
    assert got.shape[1] == ref.shape[1] and diff < MAX_DIFF

    # llava_ft opens the export (chat, serve, eval on it) with the same tower, pixels and logits.
    loaded = load_export(out).model
    assert isinstance(loaded.vision_tower, HFSiglipVisionTower)
    assert loaded.vision_tower.processor == reference_processor(ckpt)
    ids = torch.tensor([[IMAGE_TOKEN_INDEX if t == image_id else t for t in hf_ids]])
    with torch.no_grad():
        again = loaded.llm(inputs_embeds=loaded.embed(ids, pixels), use_cache=False).logits.float()
    assert float((ref - again[..., : ref.shape[-1]]).abs().max()) < MAX_DIFF
