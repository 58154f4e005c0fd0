"""Any-resolution model side against transformers' LLaVA-NeXT: packing (`pack_image_features`), whole image
features of a LlavaNextModel with the same tower and projector weights, placement in the LLM's input with the
count checks, the dummy image reaching the newline, and the newline saved and loaded with the projector."""

from __future__ import annotations

import copy
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM, LlavaNextConfig, LlavaNextModel

from llava_ft.config import AnyresSection, ModelSection, VisionSection
from llava_ft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_ft.data.anyres import AnyresGeometry, AnyresImageProcessor, pixel_inputs
from llava_ft.data.collate import Collator, PackedCollator
from llava_ft.data.conversation import DataError, Message
from llava_ft.data.templates import get_template
from llava_ft.inference import Assistant
from llava_ft.model.anyres import pack_image
from llava_ft.model.build import build_model, build_vision
from llava_ft.model.llava import LlavaModel
from llava_ft.model.projector import build_projector
from llava_ft.model.vision import image_token_rule
from llava_ft.query import Query
from llava_ft.stage import load_stage, save_stage_output
from llava_ft.testing.tiny_llava import tiny_config
from llava_ft.testing.tiny_vision import write_tiny_hf_clip, write_tiny_hf_siglip, write_tiny_open_clip

HIDDEN, VOCAB = 32, 50
# (height, width) tiled to every canvas of LLaVA-NeXT's grids, with odd margins and images below one tile.
SIZES = [(40, 90), (90, 40), (70, 70), (100, 30), (30, 100), (5, 7), (33, 64), (64, 65), (400, 300), (60, 32)]


def _sizes(n: int = 60) -> list[tuple[int, int]]:
    rng = random.Random(0)
    return SIZES + [(rng.randint(4, 900), rng.randint(4, 900)) for _ in range(n)]


def _stub(geometry: AnyresGeometry, patch: int) -> SimpleNamespace:
    """What LlavaNextModel.pack_image_features reads from its model: the config."""
    vision = SimpleNamespace(image_size=geometry.tile, patch_size=patch)
    pinpoints = [list(p) for p in geometry.pinpoints]
    return SimpleNamespace(config=SimpleNamespace(vision_config=vision, image_grid_pinpoints=pinpoints))


@pytest.mark.parametrize(
    ("geometry", "patch"),
    [(AnyresGeometry.build(32, 4), 8), (AnyresGeometry.build(48, 3, [[48, 96], [144, 48], [96, 96]]), 16)],
)
def test_packing_equals_llava_next_pack_image_features(geometry: AnyresGeometry, patch: int) -> None:
    g = torch.Generator().manual_seed(0)
    newline = torch.randn(HIDDEN, generator=g)
    sizes = _sizes()
    views = [
        torch.randn(geometry.num_views(h, w), geometry.patch_grid**2, HIDDEN, generator=g) for h, w in sizes
    ]
    want, lengths = LlavaNextModel.pack_image_features(
        _stub(geometry, patch), views, torch.tensor(sizes), "default", image_newline=newline
    )
    for v, (h, w), reference, n in zip(views, sizes, want, lengths.tolist(), strict=True):
        got = pack_image(v, geometry, h, w, newline)
        assert torch.equal(got, reference), (h, w)
        assert n == got.shape[0] == geometry.num_tokens(h, w)
    with pytest.raises(ValueError, match=f"needs {views[0].shape[0]} views of"):
        pack_image(views[0][:2], geometry, *sizes[0], newline)


def noise(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return write_tiny_hf_clip(tmp_path_factory.mktemp("clip") / "clip", image_size=32, patch_size=8, width=32)


def anyres_llava(clip_folder, pinpoints=None) -> LlavaModel:
    """A tiny any-resolution LlavaModel on the transformers tower in `clip_folder` (CLIP or SigLIP)."""
    torch.manual_seed(0)
    section = AnyresSection(grid_pinpoints=pinpoints)
    tower = build_vision(
        ModelSection(vision=VisionSection(backend="hf", model=str(clip_folder), anyres=section))
    )
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
        )
    )
    projector = build_projector("mlp2x_gelu", tower.hidden_size, HIDDEN, newline=True)
    return LlavaModel(llm, tower, projector).eval()


def llava_next_twin(model: LlavaModel, strategy: str = "default") -> LlavaNextModel:
    """transformers' LlavaNextModel with `model`'s tower, projector and newline; `strategy`: "default" drops
    CLIP's CLS token, "full" keeps every token (SigLIP has no CLS)."""
    geometry = model.image_tokens
    config = LlavaNextConfig(
        vision_config=model.vision_tower.model.config.to_dict(),
        text_config=model.llm.config.to_dict(),
        image_grid_pinpoints=[list(p) for p in geometry.pinpoints],
        vision_feature_layer=model.vision_tower.cfg.feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
    )
    twin = LlavaNextModel(config).eval()
    twin.vision_tower.load_state_dict(model.vision_tower.model.state_dict())
    twin.multi_modal_projector.load_state_dict(
        {k: v for k, v in model.projector.state_dict().items() if k.startswith("linear_")}
    )
    with torch.no_grad():
        twin.image_newline.copy_(model.projector.image_newline)
    return twin


@pytest.mark.parametrize("pinpoints", [None, [[32, 96], [64, 64], [96, 32], [64, 96]]])
def test_image_features_equal_llava_next_model(clip_folder, pinpoints) -> None:
    """Same tower, projector and newline: the features of images tiled to several canvases are LlavaNext's."""
    model = anyres_llava(clip_folder, pinpoints)
    geometry = model.image_tokens
    assert isinstance(model.vision_tower.processor, AnyresImageProcessor)
    assert geometry == image_token_rule(model.vision_tower.cfg)
    images = [noise(h, w, k) for k, (h, w) in enumerate(SIZES)]
    assert len({geometry.best_resolution(img.height, img.width) for img in images}) == len(geometry.pinpoints)
    inputs = pixel_inputs(model.vision_tower.processor, images)
    with torch.no_grad():
        got = model.image_features(inputs["pixel_values"], inputs["image_sizes"])
        want = llava_next_twin(model).get_image_features(**inputs).pooler_output
    assert len(got) == len(want) == len(images)
    for img, ours, reference in zip(images, got, want):
        assert ours.shape[0] == geometry.num_tokens(img.height, img.width)
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_build_vision_wraps_the_processor_of_either_backend(clip_folder, tmp_path) -> None:
    open_clip_folder = write_tiny_open_clip(tmp_path / "oc", image_size=32, patch_size=8, width=32)
    for vision in (
        VisionSection(backend="hf", model=str(clip_folder), image_aspect="resize"),
        VisionSection(backend="open_clip", model=f"local-dir:{open_clip_folder}", image_aspect="crop"),
    ):
        fixed = build_vision(ModelSection(vision=vision)).processor
        vision.anyres = AnyresSection(grid_pinpoints=[[32, 64], [64, 32]])
        processor = build_vision(ModelSection(vision=vision)).processor
        assert isinstance(processor, AnyresImageProcessor)
        assert (processor.mean, processor.std, processor.base_aspect) == (fixed.mean, fixed.std, fixed.aspect)
        assert processor.geometry == AnyresGeometry(32, 4, ((32, 64), (64, 32)))
        assert processor.matches_llava_next == (vision.image_aspect == "resize")


def test_siglip_image_features_equal_llava_next_model(tmp_path) -> None:
    """A SigLIP tower whose patches leave pixels out (30 px, 8-px patches: a 3x3 grid) packs as LlavaNext with
    vision_feature_select_strategy "full"."""
    folder = write_tiny_hf_siglip(tmp_path / "siglip", image_size=30, patch_size=8, width=32)
    model = anyres_llava(folder)
    geometry = model.image_tokens
    assert (geometry.tile, geometry.patch_grid) == (30, 3)
    images = [noise(h, w, k) for k, (h, w) in enumerate([(40, 90), (90, 40), (70, 70), (5, 7)])]
    inputs = pixel_inputs(model.vision_tower.processor, images)
    with torch.no_grad():
        got = model.image_features(inputs["pixel_values"], inputs["image_sizes"])
        want = llava_next_twin(model, "full").get_image_features(**inputs).pooler_output
    for img, ours, reference in zip(images, got, want, strict=True):
        assert ours.shape[0] == geometry.num_tokens(img.height, img.width)
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def item(model: LlavaModel, seed: int, spans: list) -> dict:
    """An encoder output: an int n = n text tokens, an (height, width) = one image of that size, its
    placeholder repeated by its token count."""
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    images = []
    for span in spans:
        if isinstance(span, tuple):
            images.append(noise(*span, seed=seed + len(images)))
            ids += [IMAGE_TOKEN_INDEX] * model.image_tokens.num_tokens(*span)
        else:
            ids += torch.randint(1, VOCAB, (span,), generator=g).tolist()
    labels = [IGNORE_INDEX if t == IMAGE_TOKEN_INDEX else t for t in ids]
    # "images" (the PIL images) is not read by the collators.
    pixels = pixel_inputs(model.vision_tower.processor, images)
    return {"input_ids": ids, "labels": labels, "images": images, **pixels}


def test_embed_places_each_images_tokens_and_checks_counts(clip_folder) -> None:
    model = anyres_llava(clip_folder)
    items = [
        item(model, 1, [3, (40, 90), 4]),
        item(model, 2, [5]),
        item(model, 3, [(90, 40), 2, (70, 70), 3]),
    ]
    batch = Collator(pad_token_id=0)(items)
    assert batch["image_counts"].tolist() == [1, 0, 2] and batch["image_sizes"].shape == (3, 2)
    with torch.no_grad():
        got = model.embed(
            batch["input_ids"], batch["pixel_values"], batch["image_counts"], batch["image_sizes"]
        )
        features = model.image_features(batch["pixel_values"], batch["image_sizes"])
    table = model.input_embeddings().weight
    k = 0
    for r, row_items in enumerate(items):
        ids = batch["input_ids"][r]
        spans = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten()
        n = len(row_items["input_ids"])
        text = (ids != IMAGE_TOKEN_INDEX) & (torch.arange(len(ids)) < n)
        assert torch.equal(got[r, text], table[ids[text]].detach())
        own = features[k : k + int(batch["image_counts"][r])]
        k += len(own)
        assert torch.equal(got[r, spans], torch.cat(own) if own else got[r, spans])
    # Packed rows put the same features at the same samples' positions, and forward takes image_sizes.
    packed = PackedCollator(pad_token_id=0, row_length=512)([[items[2], items[1]], [items[0]]])
    with torch.no_grad():
        got_packed = model.embed(
            packed["input_ids"], packed["pixel_values"], packed["image_counts"], packed["image_sizes"]
        )
        assert model(**batch).logits.shape[:2] == batch["input_ids"].shape
    n2, n1, n0 = (len(x["input_ids"]) for x in items[::-1])
    assert torch.equal(got_packed[0, :n2], got[2, :n2]) and torch.equal(got_packed[1, :n0], got[0, :n0])

    args = (batch["pixel_values"], batch["image_counts"], batch["image_sizes"])
    one_short = batch["input_ids"].clone()
    one_short[0, (one_short[0] == IMAGE_TOKEN_INDEX).nonzero()[0]] = 5
    counts = [f.shape[0] for f in features]
    with pytest.raises(
        ValueError, match=rf"3 image\(s\) of {counts[0]} \+ {counts[1]} \+ {counts[2]} tokens"
    ):
        model.embed(one_short, *args)
    with pytest.raises(
        ValueError, match=rf"batch row 0 holds {counts[0]} image positions but 2 image\(s\) of"
    ):
        model.embed(batch["input_ids"], args[0], torch.tensor([2, 0, 1]), args[2])
    with pytest.raises(ValueError, match="pixel_values hold .* views but the 3 image"):
        model.embed(batch["input_ids"], args[0][1:], *args[1:])
    with pytest.raises(ValueError, match="image_sizes are needed"):
        model.embed(batch["input_ids"], args[0], args[1])


def test_dummy_image_reaches_the_newline(clip_folder) -> None:
    """A text-only training batch runs a blank tower-sized image through the tower, projector and packing, so
    every projector parameter (the newline too) is in the graph with a zero gradient."""
    model = anyres_llava(clip_folder).train()
    calls: list[int] = []
    model.vision_tower.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    batch = Collator(pad_token_id=0)([item(model, 4, [6]), item(model, 5, [3])])
    assert "pixel_values" not in batch
    model(**batch).loss.backward()
    assert calls == [model.image_tokens.num_views(32, 32)]
    grads = dict(model.projector.named_parameters())
    assert "image_newline" in grads
    assert all(p.grad is not None and not p.grad.any() for p in grads.values())


@pytest.fixture(scope="module")
def tiny_anyres(tmp_path_factory):
    """(config, tokenizer, model) of a tiny any-resolution LLaVA built from its config."""
    cfg = tiny_config(tmp_path_factory.mktemp("tiny"), vision_backend="hf", llm_mode="frozen")
    cfg.model.vision.anyres = AnyresSection(max_tiles=2)
    tokenizer, model = build_model(cfg)
    return cfg, tokenizer, model


def test_build_gives_anyres_processor_and_newline_saved_and_loaded(tiny_anyres, tmp_path) -> None:
    cfg, tokenizer, model = tiny_anyres
    cfg = copy.deepcopy(cfg)
    processor = model.vision_tower.processor
    assert (
        isinstance(processor, AnyresImageProcessor) and processor.base_aspect == cfg.model.vision.image_aspect
    )
    assert model.image_tokens == image_token_rule(cfg.model.vision) and len(model.image_tokens.pinpoints) == 2
    assert model.projector.image_newline.shape == (model.llm.config.hidden_size,)
    with torch.no_grad():
        model.projector.image_newline.uniform_(-1, 1)
    cfg.train.output_dir = str(tmp_path / "stage")
    save_stage_output(model, cfg, tokenizer, get_template(cfg.data.template, tokenizer), tmp_path / "stage")
    loaded = load_stage(tmp_path / "stage").model
    assert torch.equal(loaded.projector.image_newline, model.projector.image_newline)
    assert loaded.image_tokens == model.image_tokens
    # Without anyres the projector has no newline and the tower keeps its fixed processor.
    cfg.model.vision.anyres = None
    _, fixed = build_model(cfg, tokenizer=tokenizer)
    assert not hasattr(fixed.projector, "image_newline")
    assert not getattr(fixed.vision_tower.processor, "anyres", False) and fixed.image_tokens == 16


def test_assistant_encodes_views_and_passes_image_sizes(tiny_anyres) -> None:
    """Left-padded generation inputs hold each image's packed features where a training batch has them."""
    cfg, tokenizer, model = tiny_anyres
    assistant = Assistant(model, tokenizer, get_template(cfg.data.template, tokenizer))
    items = [item(model, 6, [2, (30, 100), 3, (64, 20)]), item(model, 7, [4]), item(model, 8, [(50, 40), 1])]
    got = assistant._left_padded([x["input_ids"] for x in items], [x["images"] for x in items])
    batch = Collator(pad_token_id=0)(items)
    with torch.no_grad():
        want = model.embed(
            batch["input_ids"], batch["pixel_values"], batch["image_counts"], batch["image_sizes"]
        )
    width = got["inputs_embeds"].shape[1]
    for r, x in enumerate(items):
        n = len(x["input_ids"])
        assert torch.equal(got["inputs_embeds"][r, width - n :], want[r, :n])


def test_newline_is_a_projector_parameter_and_fixed_weights_load(caplog) -> None:
    """Initialised as LlavaNext's (std 1/sqrt(hidden)); a projector trained without anyres loads into an anyres
    one (LLaVA-NeXT's pretrain-then-tile recipe) with the newline left as initialised."""
    torch.manual_seed(0)
    anyres = build_projector("mlp2x_gelu", 16, 1024, newline=True)
    assert "image_newline" in dict(anyres.named_parameters())
    assert abs(float(anyres.image_newline.std()) * 32 - 1) < 0.1
    fixed = build_projector("mlp2x_gelu", 16, 1024)
    newline = anyres.image_newline.detach().clone()
    with caplog.at_level("WARNING", logger="llava_ft"):
        anyres.load_state_dict(fixed.state_dict())
    assert "without image_newline" in caplog.text
    assert torch.equal(anyres.linear_2.weight, fixed.linear_2.weight) and torch.equal(
        anyres.image_newline, newline
    )
    other = build_projector("mlp2x_gelu", 16, 1024, newline=True)
    anyres.load_state_dict(other.state_dict())
    assert torch.equal(anyres.image_newline, other.image_newline)
    with pytest.raises(RuntimeError, match="image_newline"):
        anyres.load_state_dict({"linear_9.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="image_newline"):
        fixed.load_state_dict(other.state_dict())  # a fixed projector refuses the newline


def test_assistant_counts_each_images_tokens_by_its_size(tiny_anyres) -> None:
    """Prompts expand each image by its own count (its size under the model's geometry), and chat, option
    scoring and generation run on them; a bare image count is refused."""
    cfg, tokenizer, model = tiny_anyres
    assistant = Assistant(model, tokenizer, get_template(cfg.data.template, tokenizer))
    images = [noise(30, 100, 1), noise(64, 20, 2)]
    messages = [Message("user", "<image>\nand <image>: which is wider?")]
    ids = assistant.prompt_ids(messages, images)
    geometry = model.image_tokens
    assert ids.count(IMAGE_TOKEN_INDEX) == sum(geometry.num_tokens(i.height, i.width) for i in images)
    prompt, answer = assistant.answer_start_ids(messages, images, "the first")
    assert prompt == ids and answer
    answers = assistant.generate_messages(
        [(messages, images), ([Message("user", "hi")], [])], max_new_tokens=2
    )
    assert len(answers) == 2
    assert assistant.prompt_logits([(messages, images)]).shape == (1, model.llm.config.vocab_size)
    query = Query(question="What is it?", image=images[0])
    assert len(assistant.option_logprobs([query], ["yes", "no"])[0]) == 2
    with pytest.raises(DataError, match="depend on each image's size"):
        assistant.prompt_ids(messages, 2)
