"""Several images per conversation through a real training run: records whose `image` is a list, markers in
different turns (two in one turn, adjacent or apart, one in a later turn). At every training step, the
embeddings at each marker's span are that very image's features: the image file the record names at that
place, encoded on its own by the model being trained; no image position is trained. Plain rows and packed rows
alike."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from llava_ft.config import DataSource
from llava_ft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_ft.data.images import load_image
from llava_ft.data.tokenizer import load_tokenizer
from llava_ft.model.llava import LlavaModel
from llava_ft.testing.tiny_llava import tiny_config
from llava_ft.train.run import train

TAG = re.compile(r"record (\d+)\b")

# (image files, turns as (user, assistant)): the markers of each record, in order, stand for its files.
RECORDS = [
    (
        ["a", "b"],
        [("record 0: <image> and <image>, which is brighter?", "the first"), ("why?", "more white")],
    ),
    (["c", "a", "d"], [("record 1: look at <image>", "a blot"), ("now <image> then <image>", "two blots")]),
    (["d", "b"], [("record 2: <image>\nwhat is it?", "noise"), ("and this: <image>", "noise too")]),
    (["b", "c", "a"], [("record 3: <image><image><image>\ncount them", "three"), ("sure?", "yes")]),
    (["e", "d"], [("record 4: first", "ok"), ("then <image>", "seen"), ("and <image> last", "seen too")]),
    (["a", "e"], [("record 5: <image>", "one"), ("<image>", "two")]),
]


@pytest.fixture(scope="module")
def multi_image_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi_image")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in "abcde":  # noise of different sizes and brightness: each encodes to its own features
        h, w = rng.integers(20, 60, size=2)
        pixels = rng.integers(0, 256, (h, w, 3)) * rng.uniform(0.3, 1.0)
        Image.fromarray(pixels.astype(np.uint8)).save(images / f"{name}.png")
    records = []
    for i, (files, turns) in enumerate(RECORDS):
        assert sum(u.count("<image>") for u, _ in turns) == len(files)
        conversations = [
            {"from": who, "value": text}
            for user, answer in turns
            for who, text in (("human", user), ("gpt", answer))
        ]
        records.append({"id": i, "image": [f"{f}.png" for f in files], "conversations": conversations})
    data = root / "multi.json"
    data.write_text(json.dumps(records))
    return data, images


def spans_match_their_images(model, input_ids, embeds, tokenizer, folder) -> list[int]:
    """Checks every row of a batch (one sample, or several packed) and returns the records it held: the k-th
    image span of a row is the k-th image of its records in order, and its embeddings equal that image's
    features, the image encoded alone (a row of one image span through the same `embed`, same weights)."""
    seen = []
    processor = model.vision_tower.processor
    features = {}
    for row_ids, row_embeds in zip(input_ids, embeds):
        text = tokenizer.decode(row_ids[row_ids != IMAGE_TOKEN_INDEX].clamp(min=0).tolist())
        records = [int(n) for n in TAG.findall(text)]
        files = [f for r in records for f in RECORDS[r][0]]
        positions = (row_ids == IMAGE_TOKEN_INDEX).nonzero().flatten()
        assert records and len(positions) % len(files) == 0, (records, len(positions))
        span = len(positions) // len(files)
        alone = torch.full((1, span), IMAGE_TOKEN_INDEX, device=input_ids.device)
        for name in "abcde":
            pixel_values = processor(load_image(folder / f"{name}.png"))[None].to(embeds.device)
            features[name] = REAL_EMBED(model, alone, pixel_values)[0]
        for k, name in enumerate(files):
            at_marker = row_embeds[positions[k * span : (k + 1) * span]]
            torch.testing.assert_close(at_marker, features[name], rtol=1e-4, atol=1e-5)
            # The check can tell the images apart.
            assert not any(torch.allclose(at_marker, features[o], atol=1e-3) for o in "abcde" if o != name)
        seen += records
    return seen


REAL_EMBED = LlavaModel.embed


@pytest.mark.parametrize("packing", [False, True])
def test_features_land_at_their_markers(packing, tiny_root, multi_image_data, tmp_path, monkeypatch):
    data, folder = multi_image_data
    cfg = tiny_config(tiny_root, llm_mode="lora")
    tokenizer = load_tokenizer(cfg.model.llm)
    checked: list[int] = []
    packed_rows = []

    def spy(self, input_ids, pixel_values=None, *args, **kwargs):
        embeds = REAL_EMBED(self, input_ids, pixel_values, *args, **kwargs)
        if self.training:  # checked now, with the weights of this step
            with torch.no_grad():
                records = spans_match_their_images(self, input_ids, embeds, tokenizer, folder)
            checked.extend(records)
            packed_rows.append(len(records) > input_ids.shape[0])
        return embeds

    image_labels = []
    real_forward = LlavaModel.forward

    def forward_spy(self, input_ids, labels=None, *args, **kwargs):
        image_labels.append(labels[input_ids == IMAGE_TOKEN_INDEX])
        return real_forward(self, input_ids, labels, *args, **kwargs)

    monkeypatch.setattr(LlavaModel, "embed", spy)
    monkeypatch.setattr(LlavaModel, "forward", forward_spy)
    cfg.data.train = [DataSource(path=str(data), format="llava", image_folder=str(folder))]
    cfg.data.max_length = 256
    cfg.data.packing, cfg.data.pack_length = packing, 256
    t = cfg.train
    t.output_dir, t.batch_size, t.max_steps, t.lr, t.logging_steps, t.report_to = (
        str(tmp_path), 2, 3, 1e-2, 1, "none"
    )  # fmt: skip
    result = train(cfg)
    losses = [h["loss"] for h in result.summary["loss_history"]]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert set(checked) == set(range(len(RECORDS))), "every record was trained, its spans checked"
    assert any(packed_rows) == packing
    assert len(image_labels) == 3 and all(x.numel() and (x == IGNORE_INDEX).all() for x in image_labels)
