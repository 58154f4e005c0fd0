"""The detail dataset of the tiling demo: determinism and caching, balanced answers and letters, held-out images
apart from training, the shapes demo's evaluation files, and pixels that agree with the captions (read back
here with a threshold and a bounding box, independent of the drawing code)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_ft.demo.detail import SHAPES, DetailDataset, corpus_texts, generate_detail_dataset, vocab_words
from llava_ft.demo.prepare import write_eval_files
from llava_ft.eval.mmbench import load_mmbench_tsv

N_TRAIN, N_HELDOUT, SIZE = 48, 16, 256
LETTERS = "ABCD"
# The marks' colours, written here rather than read from the generator.
REFERENCE = {"red": (215, 40, 40), "blue": (40, 80, 215), "green": (40, 160, 60), "purple": (145, 60, 190)}


def make(root: Path, **kw) -> DetailDataset:
    return generate_detail_dataset(root, **{"n_train_images": N_TRAIN, "n_heldout_images": N_HELDOUT,
                                            "image_size": SIZE, **kw})  # fmt: skip


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> DetailDataset:
    return make(tmp_path_factory.mktemp("detail"))


@pytest.fixture(scope="module")
def blank(tmp_path_factory) -> DetailDataset:
    return make(tmp_path_factory.mktemp("blank"), blank=True)


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def pixels(ds: DetailDataset, name: str) -> np.ndarray:
    with Image.open(ds.images_dir / name) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_parameters_same_bytes_and_a_rerun_rewrites_nothing(ds, tmp_path):
    again = make(tmp_path / "again")
    assert digest(again.root) == digest(ds.root)
    stamps = {p: p.stat().st_mtime_ns for p in again.root.rglob("*")}
    assert make(tmp_path / "again") == again
    assert {p: p.stat().st_mtime_ns for p in again.root.rglob("*")} == stamps
    other = make(tmp_path / "again", seed=1, n_train_images=N_TRAIN // 2)  # regenerated in place
    assert other.params["seed"] == 1 and len(list(other.images_dir.glob("*.png"))) == N_TRAIN // 2 + N_HELDOUT
    assert digest(other.root) != digest(ds.root)


def test_bad_parameters():
    for kw in ({"n_train_images": 0}, {"image_size": 64}, {"image_size": 255}, {"mc_fraction": 1.5}):
        with pytest.raises(ValueError):
            make(Path("unused"), **kw)


def test_train_records(ds):
    pretrain, finetune = load(ds.pretrain), load(ds.finetune)
    assert len(pretrain) == len(finetune) == N_TRAIN
    assert (
        [r["image"] for r in pretrain]
        == [r["image"] for r in finetune]
        == [f"{i:05d}.png" for i in range(N_TRAIN)]
    )
    shapes = []
    letters: Counter[tuple[int, str]] = Counter()
    plural_of = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
    shape_of = {v: k for k, v in plural_of.items()}
    for p, f in zip(pretrain, finetune):
        assert [t["from"] for t in p["conversations"]] == ["human", "gpt"]
        assert p["conversations"][0]["value"] == "<image>"
        small, colour, plural = p["conversations"][1]["value"].split()
        assert small == "small" and colour in REFERENCE and shape_of[plural] in SHAPES
        shape = shape_of[plural]
        shapes.append(shape)
        question, answer = (t["value"] for t in f["conversations"])
        assert question.startswith("<image>\n")
        if "\nA. " in question:  # multiple choice: the answer is the letter of the caption's shape
            options = [line[3:] for line in question.splitlines() if line[1:3] == ". "]
            assert 2 <= len(options) <= 4 and len(set(options)) == len(options) <= len(SHAPES)
            assert options[LETTERS.index(answer)] == shape
            letters[len(options), answer] += 1
        else:
            assert answer == shape
    assert Counter(shapes) == {s: N_TRAIN // len(SHAPES) for s in SHAPES}
    for n in (2, 3, 4):  # each letter the answer as often (to one), for each number of options
        counts = [letters[n, x] for x in LETTERS[:n]]
        assert max(counts) - min(counts) <= 1
    assert ds.counts["finetune_mc"] == sum(letters.values()) > 0


def test_heldout_records(ds):
    held = load(ds.heldout)
    assert len(held) == 2 * N_HELDOUT
    train_images = {r["image"] for r in load(ds.finetune)}
    for i in range(N_HELDOUT):
        open_q, mc = held[2 * i], held[2 * i + 1]
        assert open_q["image"] == mc["image"] not in train_images
        assert (open_q["style"], mc["style"]) == ("open", "mc")
        assert open_q["conversations"][1]["value"] == mc["answer_text"] == mc["shape"] in SHAPES
        assert sorted(mc["options"]) == sorted(SHAPES) and open_q["choices"] == list(SHAPES)
        assert mc["conversations"][1]["value"] == LETTERS[i % 4]  # the answer's letter cycles
        assert mc["options"][i % 4] == mc["shape"]
    # no held-out image repeats a train image
    train_pixels = {hashlib.sha256(pixels(ds, n).tobytes()).hexdigest() for n in train_images}
    assert not any(hashlib.sha256(pixels(ds, r["image"]).tobytes()).hexdigest() in train_pixels for r in held)


def test_pixels_agree_with_the_captions_and_blank_images_hold_no_mark(ds, blank):
    ink: dict[str, list[float]] = {}
    for record in load(ds.pretrain):
        image, empty = pixels(ds, record["image"]), pixels(blank, record["image"])
        mask = image.min(axis=2) < 120  # every mark colour has a channel far below the pale backgrounds'
        assert not (empty.min(axis=2) < 120).any()
        # the same background and noise: the images differ only on and next to the marks
        near = mask.copy()
        for axis in (0, 1):
            for step in (-1, 1):
                near |= np.roll(mask, step, axis=axis)
        assert not ((image != empty).any(axis=2) & ~near).any()
        _, colour, plural = record["conversations"][1]["value"].split()
        mean = image[mask].mean(axis=0)
        assert min(REFERENCE, key=lambda c: np.abs(mean - REFERENCE[c]).sum()) == colour
        # one mark in each of 50-90% of the 16 x 16 cells of 16 px
        cells = mask.reshape(16, 16, 16, 16).any(axis=(1, 3)).sum()
        assert 0.5 * 256 - 1 <= cells <= 0.9 * 256 + 1
        ink.setdefault(plural, []).append(mask.sum() / cells)
    assert len(ink) == len(SHAPES)
    means = [np.mean(v) for v in ink.values()]
    assert max(means) / min(means) < 1.25, dict(zip(ink, means))  # every shape about as much ink


def test_eval_files_and_words(ds):
    write_eval_files(ds)
    lines = [json.loads(x) for x in (ds.root / "heldout_vqa.jsonl").read_text().splitlines()]
    assert len(lines) == N_HELDOUT and {x["answer_type"] for x in lines} == {"shape"}
    mmbench = load_mmbench_tsv(ds.root / "heldout_mmbench.tsv")
    assert len(mmbench.rows) == 4 * N_HELDOUT and sum(r.is_main for r in mmbench.rows) == N_HELDOUT
    words = set(vocab_words())
    for text in corpus_texts(ds):
        assert set(text.replace("<image>", " ").replace("?", " ").replace(".", " ").split()) <= words, text
