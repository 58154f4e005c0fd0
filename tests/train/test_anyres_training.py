"""Any-resolution images through a real training run: records with several images of different sizes; at every
step each image's span holds as many positions as its size gives under the geometry and, there, that image's
packed features (the file encoded alone by the model being trained). Plain and packed rows; the stage output
then answers about an image through the Assistant."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from llava_ft.config import AnyresSection, DataSource
from llava_ft.constants import IMAGE_TOKEN_INDEX
from llava_ft.data.anyres import pixel_inputs
from llava_ft.data.conversation import Message
from llava_ft.data.images import load_image
from llava_ft.data.tokenizer import load_tokenizer
from llava_ft.inference import load_assistant
from llava_ft.model.llava import LlavaModel
from llava_ft.testing.tiny_llava import tiny_config
from llava_ft.train.run import train

TAG = re.compile(r"record (\d+)\b")
# (height, width) of each image file: every canvas of LLaVA-NeXT's grids at the tiny tower's 32 px.
SIZES = {"a": (40, 90), "b": (90, 40), "c": (70, 70), "d": (100, 30), "e": (30, 100), "f": (20, 25)}
RECORDS = [
    (["a", "b"], [("record 0: <image> and <image>, which is taller?", "the second")]),
    (["c", "d", "e"], [("record 1: <image>", "a square"), ("now <image><image>", "two strips")]),
    (["f"], [("record 2: what is <image>?", "noise")]),
    (["e", "a"], [("record 3: first", "ok"), ("<image> then <image>", "seen")]),
]


@pytest.fixture(scope="module")
def anyres_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("anyres_data")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in SIZES.items():
        pixels = rng.integers(0, 256, (h, w, 3)) * rng.uniform(0.3, 1.0)
        Image.fromarray(pixels.astype(np.uint8)).save(images / f"{name}.png")
    records = [
        {
            "id": i,
            "image": [f"{f}.png" for f in files],
            "conversations": [
                {"from": who, "value": text}
                for user, answer in turns
                for who, text in (("human", user), ("gpt", answer))
            ],
        }
        for i, (files, turns) in enumerate(RECORDS)
    ]
    data = root / "anyres.json"
    data.write_text(json.dumps(records))
    return data, images


REAL_EMBED = LlavaModel.embed


def spans_hold_their_images(model, input_ids, embeds, tokenizer, folder) -> list[int]:
    """The records of each row (one sample, or several packed); each image's span, in order, has its own
    length and that image's features."""
    seen = []
    geometry = model.image_tokens
    for row_ids, row_embeds in zip(input_ids, embeds):
        text = tokenizer.decode(row_ids[row_ids != IMAGE_TOKEN_INDEX].clamp(min=0).tolist())
        records = [int(n) for n in TAG.findall(text)]
        files = [f for r in records for f in RECORDS[r][0]]
        positions = (row_ids == IMAGE_TOKEN_INDEX).nonzero().flatten()
        assert len(positions) == sum(geometry.num_tokens(*SIZES[f]) for f in files), records
        start = 0
        for name in files:
            inputs = pixel_inputs(model.vision_tower.processor, [load_image(folder / f"{name}.png")])
            alone = model.image_features(inputs["pixel_values"].to(embeds.device), inputs["image_sizes"])[0]
            at_marker = row_embeds[positions[start : start + len(alone)]]
            torch.testing.assert_close(at_marker, alone.to(at_marker.dtype), rtol=1e-4, atol=1e-5)
            start += len(alone)
        seen += records
    return seen


@pytest.mark.parametrize("packing", [False, True])
def test_anyres_training_places_each_images_features(packing, tiny_root, anyres_data, tmp_path, monkeypatch):
    data, folder = anyres_data
    cfg = tiny_config(tiny_root, llm_mode="lora")
    cfg.model.vision.anyres = AnyresSection()
    tokenizer = load_tokenizer(cfg.model.llm)
    checked: list[int] = []

    def spy(self, input_ids, pixel_values=None, *args, **kwargs):
        embeds = REAL_EMBED(self, input_ids, pixel_values, *args, **kwargs)
        if self.training:
            with torch.no_grad():
                checked.extend(spans_hold_their_images(self, input_ids, embeds, tokenizer, folder))
        return embeds

    monkeypatch.setattr(LlavaModel, "embed", spy)
    cfg.data.train = [DataSource(path=str(data), format="llava", image_folder=str(folder))]
    cfg.data.max_length = 512
    cfg.data.packing, cfg.data.pack_length = packing, 512
    t = cfg.train
    t.output_dir, t.batch_size, t.max_steps, t.lr, t.logging_steps, t.report_to = (
        str(tmp_path / "out"), 2, 2, 1e-2, 1, "none"
    )  # fmt: skip
    result = train(cfg)
    losses = [h["loss"] for h in result.summary["loss_history"]]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert set(checked) == set(range(len(RECORDS)))
    if packing:
        return
    monkeypatch.undo()
    assistant = load_assistant(str(tmp_path / "out"), device="cpu")
    images = [load_image(folder / "a.png"), load_image(folder / "d.png")]
    ids = assistant.prompt_ids([Message("user", "<image> or <image>?")], images)
    assert ids.count(IMAGE_TOKEN_INDEX) == sum(
        assistant.model.image_tokens.num_tokens(*SIZES[f]) for f in "ad"
    )
    answer = assistant.generate_messages(
        [([Message("user", "<image> or <image>?")], images)], max_new_tokens=3
    )
    assert len(answer) == 1


def test_anyres_stage_starts_from_a_fixed_resolution_projector(tiny_root, anyres_data, tmp_path, caplog):
    """LLaVA-NeXT's recipe: a stage at one view per image trains the projector, the next tiles images starting
    from it (init_from); its newline starts new, then trains and is saved with the projector."""
    data, folder = anyres_data
    outs = []
    for anyres in (None, AnyresSection()):
        cfg = tiny_config(tiny_root, llm_mode="frozen")
        cfg.model.vision.anyres = anyres
        cfg.data.train = [DataSource(path=str(data), format="llava", image_folder=str(folder))]
        cfg.data.max_length = 512
        t = cfg.train
        t.output_dir, t.batch_size, t.max_steps, t.lr, t.logging_steps, t.report_to = (
            str(tmp_path / f"stage{len(outs)}"), 2, 2, 1e-2, 1, "none"
        )  # fmt: skip
        t.init_from = str(outs[-1]) if outs else None
        with caplog.at_level("WARNING", logger="llava_ft"):
            train(cfg)
        outs.append(tmp_path / f"stage{len(outs)}")
    assert "without image_newline" in caplog.text
    fixed, tiled = (load_file(str(out / "projector.safetensors")) for out in outs)
    assert "image_newline" not in fixed and "image_newline" in tiled
    assert fixed.keys() == tiled.keys() - {"image_newline"}
