"""The demo's tower stage: the tiny open_clip tower pretrained by tagging caption words, written as a folder the
LLaVA stages load like any open_clip tower."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from llava_ft.config import VisionSection
from llava_ft.demo import tower
from llava_ft.demo.shapes import generate_shapes_dataset, load_shapes_dataset
from llava_ft.model.vision import LOCAL_DIR, build_vision_tower
from llava_ft.testing.tiny_vision import OPEN_CLIP_WEIGHTS, write_tiny_open_clip

CLIP = {"image_size": 64, "patch_size": 8, "width": 64, "layers": 2, "heads": 2}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train_images=160, n_heldout_images=40)


def test_greyscale_matches_pil_luminance(shapes):
    processor = build_vision_tower(
        VisionSection(model=LOCAL_DIR + str(write_tiny_open_clip(shapes.root.parent / "clip", **CLIP)))
    ).processor
    image = Image.open(shapes.images_dir / "00003.png").convert("RGB")
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (processor.mean, processor.std))
    ours = tower.greyscale(processor(image)[None], mean, std)[0]
    # PIL rounds luminance to whole levels: half a level, normalised, is the tolerance.
    theirs = processor(image.convert("L").convert("RGB"))
    assert torch.allclose(ours, theirs, atol=0.5 / 255 / min(processor.std) + 1e-5)
    assert not torch.allclose(processor(image), theirs)  # the image had colour to lose


def test_caption_words_are_the_tags():
    assert tower.caption_words("Two red stars at the top left and bottom right.") == {
        "two", "red", "stars", "at", "the", "top", "left", "and", "bottom", "right",
    }  # fmt: skip


def test_the_tower_learns_colour_and_is_written_as_an_open_clip_folder(shapes, tmp_path):
    source = write_tiny_open_clip(tmp_path / "random", **CLIP)
    vision = VisionSection(model=LOCAL_DIR + str(source), feature_layer=-2)
    out = tmp_path / "tower"
    summary = tower.pretrain_tower(
        vision, load_shapes_dataset(shapes.root), out, tower.TowerTraining(steps=60)
    )

    written = json.loads((out / tower.SUMMARY).read_text())
    assert written == summary and written["training"]["steps"] == 60
    assert set(written["tags"]) >= set(shapes.setting.colours) | set(shapes.setting.shapes)
    # Colour is what a tower learns first; chance is one in five.
    assert written["heldout_tag_accuracy"]["colour/seen"] >= 0.6, written
    before, after = load_file(str(source / OPEN_CLIP_WEIGHTS)), load_file(str(out / OPEN_CLIP_WEIGHTS))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # The image tower up to the block LLaVA reads trains; the text tower and the last block do not.
    assert (
        "visual.conv1.weight" in changed and "visual.transformer.resblocks.0.attn.in_proj_weight" in changed
    )
    assert all(k.startswith("visual.") for k in changed)
    assert not any(k.startswith("visual.transformer.resblocks.1.") for k in changed)
    # The LLaVA stages load it through the same path as any open_clip tower.
    loaded = build_vision_tower(VisionSection(model=LOCAL_DIR + str(out), feature_layer=-2))
    pixels = loaded.processor(Image.fromarray(np.full((64, 64, 3), 200, np.uint8)))[None]
    assert loaded(pixels).shape == (1, 64, CLIP["width"])


def test_the_command_trains_the_tokens_the_tiny_recipe_reads(shapes, tmp_path):
    source = write_tiny_open_clip(tmp_path / "random", **CLIP)
    out = tmp_path / "tower"
    assert (
        tower.main(["--data", str(shapes.root), "--clip", str(source), "--out", str(out), "--steps", "2"])
        == 0
    )
    recipe = yaml.safe_load(tower.RECIPE.read_text())["model"]["vision"]
    written = json.loads((out / tower.SUMMARY).read_text())
    assert (written["feature_layer"], written["pool"]) == (recipe["feature_layer"], recipe["pool"])


def test_a_missing_dataset_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path}: no complete shapes dataset"):
        load_shapes_dataset(tmp_path)
