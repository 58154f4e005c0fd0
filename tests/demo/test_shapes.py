"""The shapes dataset: determinism, caching, balance, and texts that agree with the pixels.

Image content is read back with a naive pixel classifier written here (colour by channel dominance, shape by
the geometry of its pixel mask), independent of the generator's colour table and drawing code.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_ft.demo.shapes import (
    CHOICES,
    QTYPES,
    QUESTIONS,
    VOCAB_WORDS,
    ShapesDataset,
    chance_levels,
    corpus_texts,
    generate_shapes_dataset,
    heldout_rows,
)

N_TRAIN, N_HELDOUT = 160, 48
QTYPE_OF = {q: t for t, q in QUESTIONS.items()}
QUADRANT_NAMES = ("top left", "top right", "bottom left", "bottom right")
COUNT_NAMES = ("one", "two", "three", "four")


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> ShapesDataset:
    return generate_shapes_dataset(
        tmp_path_factory.mktemp("shapes"), n_train_images=N_TRAIN, n_heldout_images=N_HELDOUT
    )


@pytest.fixture(scope="module")
def blank_ds(tmp_path_factory) -> ShapesDataset:
    return generate_shapes_dataset(
        tmp_path_factory.mktemp("blank"), n_train_images=N_TRAIN, n_heldout_images=N_HELDOUT, blank=True
    )


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def qa_pairs(record: dict) -> list[tuple[str, str]]:
    turns = record["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    return [(h["value"].removeprefix("<image>\n"), g["value"]) for h, g in zip(turns[::2], turns[1::2])]


# --- a naive reader of the images -------------------------------------------------------------------------


def colour_name(rgb: np.ndarray) -> str:
    r, g, b = (int(v) for v in rgb)
    if r > 150 and g > 150 and b < 100:
        return "yellow"
    if r > 150 and g < 100 and b < 100:
        return "red"
    if g > max(r, b) + 50:
        return "green"
    if b > max(r, g) + 50 and r < 100:
        return "blue"
    if r > 100 and b > 150 and g < 100:
        return "purple"
    raise AssertionError(f"unnamed colour {rgb}")


def shape_name(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = box.shape
    fill = box.mean()
    if fill == 1.0:
        return "square"
    if box[-1].all() and box[0].sum() <= 3:
        return "triangle"
    corners_empty = not (box[0, 0] or box[0, -1] or box[-1, 0] or box[-1, -1])
    if corners_empty and box[h // 2].all() and box[:, w // 2].all():
        return "cross" if fill < 0.68 else "circle"
    raise AssertionError(f"unrecognised shape, fill {fill:.2f}")


def read_image(path: Path) -> tuple[str, str, list[str]]:
    """(colour, shape, positions) seen in the pixels."""
    a = np.asarray(Image.open(path).convert("RGB"))
    background = a[0, 0]
    q = a.shape[0] // 2
    found = []
    for k, name in enumerate(QUADRANT_NAMES):
        quad = a[(k // 2) * q : (k // 2 + 1) * q, (k % 2) * q : (k % 2 + 1) * q]
        mask = (quad != background).any(-1)
        if mask.any():
            pixels = np.unique(quad[mask], axis=0)
            assert len(pixels) == 1, f"{path.name}: shape of several colours {pixels}"
            found.append((name, colour_name(pixels[0]), shape_name(mask)))
    assert found, f"{path.name}: no shape"
    assert len({(c, s) for _, c, s in found}) == 1, f"{path.name}: shapes differ {found}"
    return found[0][1], found[0][2], [name for name, _, _ in found]


def parse_caption(caption: str) -> tuple[str, str, list[str]]:
    m = re.fullmatch(r"(a|two|three|four) (\w+) (\w+) at the (.+)", caption)
    assert m, caption
    det, colour, noun, where = m.groups()
    positions = re.findall(r"(?:top|bottom) (?:left|right)", where)
    assert len(positions) == ("a", "two", "three", "four").index(det) + 1, caption
    shape = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross"}.get(
        noun, noun
    )
    return colour, shape, positions


def expected_answer(label: tuple[str, str, list[str]], qtype: str) -> str:
    colour, shape, positions = label
    return {
        "colour": colour,
        "shape": shape,
        "position": positions[0] if len(positions) == 1 else None,
        "count": COUNT_NAMES[len(positions) - 1],
    }[qtype]


# --- tests ------------------------------------------------------------------------------------------------


def test_files_and_counts(ds):
    pretrain, finetune, heldout = load(ds.pretrain), load(ds.finetune), load(ds.heldout)
    assert len(pretrain) == ds.counts["pretrain_records"] == N_TRAIN
    assert len(heldout) == N_HELDOUT
    assert len(finetune) == ds.counts["finetune_records"]
    assert sorted(p.name for p in ds.images_dir.iterdir()) == [
        f"{i:05d}.png" for i in range(N_TRAIN + N_HELDOUT)
    ]
    for r in pretrain:
        turns = r["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] and turns[0]["value"] == "<image>"
    lines = ds.text.read_text().splitlines()
    assert len(lines) == ds.counts["text_lines"] and all(json.loads(line)["text"] for line in lines)


def test_deterministic_bytes(ds, tmp_path):
    again = generate_shapes_dataset(tmp_path / "a", n_train_images=N_TRAIN, n_heldout_images=N_HELDOUT)
    assert tree_hash(again.root) == tree_hash(ds.root)
    other = generate_shapes_dataset(
        tmp_path / "b", n_train_images=N_TRAIN, n_heldout_images=N_HELDOUT, seed=1
    )
    assert tree_hash(other.root) != tree_hash(ds.root)


def test_idempotent_and_regenerates_when_incomplete_or_changed(tmp_path):
    first = generate_shapes_dataset(tmp_path, n_train_images=24, n_heldout_images=8)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert generate_shapes_dataset(tmp_path, n_train_images=24, n_heldout_images=8) == first
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == stamps  # nothing rewritten
    reference = tree_hash(tmp_path)

    (first.images_dir / "00003.png").unlink()  # incomplete: regenerated, same bytes
    generate_shapes_dataset(tmp_path, n_train_images=24, n_heldout_images=8)
    assert tree_hash(tmp_path) == reference

    first.finetune.write_text("[]")  # interrupted mid-write: no manifest, so regenerated
    first.manifest.unlink()
    generate_shapes_dataset(tmp_path, n_train_images=24, n_heldout_images=8)
    assert tree_hash(tmp_path) == reference

    smaller = generate_shapes_dataset(tmp_path, n_train_images=12, n_heldout_images=4)  # other params
    assert json.loads(smaller.manifest.read_text())["params"]["n_train_images"] == 12
    assert len(list(smaller.images_dir.iterdir())) == 16  # stale images of the larger dataset removed
    assert len(load(smaller.pretrain)) == 12


def test_question_types_balanced(ds):
    finetune = load(ds.finetune)
    asked = Counter(QTYPE_OF[q] for r in finetune if "image" in r for q, _ in qa_pairs(r))
    mean = sum(asked.values()) / len(QTYPES)
    assert set(asked) == set(QTYPES)
    assert all(abs(n - mean) <= 0.1 * mean for n in asked.values()), asked
    assert any(len(r["conversations"]) > 2 for r in finetune), "no multi-turn records"
    held = Counter(r["qtype"] for r in load(ds.heldout))
    assert all(abs(n - N_HELDOUT / 4) <= 0.1 * N_HELDOUT / 4 for n in held.values()) and len(held) == 4


def test_answers_balanced_within_each_type(tmp_path):
    # Count questions on the many single-shape images could all be "one": answers are balanced too.
    ds = generate_shapes_dataset(tmp_path, n_train_images=800, n_heldout_images=4)
    given = Counter((QTYPE_OF[q], a) for r in load(ds.finetune) if "image" in r for q, a in qa_pairs(r))
    for qtype, choices in CHOICES.items():
        counts = [given[qtype, a] for a in choices]
        assert max(counts) <= 1.25 * min(counts), (qtype, counts)


def test_answers_in_closed_sets_and_text_only_records(ds):
    finetune = load(ds.finetune)
    for r in finetune:
        pairs = qa_pairs(r)
        if "image" in r:
            assert r["conversations"][0]["value"].startswith("<image>\n")
            assert all(a in CHOICES[QTYPE_OF[q]] for q, a in pairs), r
        else:
            assert "<image>" not in json.dumps(r)
    text_only = [r for r in finetune if "image" not in r]
    assert len(text_only) == ds.counts["finetune_text_only_records"] > 0
    for r in load(ds.heldout):
        ((q, a),) = qa_pairs(r)
        assert QTYPE_OF[q] == r["qtype"] and r["choices"] == list(CHOICES[r["qtype"]]) and a in r["choices"]


def test_texts_agree_with_pixels(ds):
    labels = {}
    for r in load(ds.pretrain):
        label = read_image(ds.images_dir / r["image"])
        assert parse_caption(r["conversations"][1]["value"]) == label, r
        labels[r["image"]] = label
    for r in load(ds.finetune):
        if "image" in r:
            for q, a in qa_pairs(r):
                assert a == expected_answer(labels[r["image"]], QTYPE_OF[q]), (r, labels[r["image"]])
    for r in load(ds.heldout):
        ((_, a),) = qa_pairs(r)
        assert a == expected_answer(read_image(ds.images_dir / r["image"]), r["qtype"]), r
    lines = [json.loads(line)["text"] for line in ds.text.read_text().splitlines()]
    assert [line.split(".")[0] for line in lines[:N_TRAIN]] == [
        r["conversations"][1]["value"] for r in load(ds.pretrain)
    ]


@pytest.mark.parametrize("n_train", [8, N_TRAIN])
def test_heldout_images_new_but_combinations_seen(ds, tmp_path, n_train):
    # 8 train images show only 8 of the 20 colour-shape combinations: held-out must keep to those.
    d = ds if n_train == N_TRAIN else generate_shapes_dataset(tmp_path, n_train_images=8, n_heldout_images=40)
    train_names = {r["image"] for r in load(d.pretrain)} | {
        r["image"] for r in load(d.finetune) if "image" in r
    }
    held_names = {r["image"] for r in load(d.heldout)}
    assert not train_names & held_names

    def pixels(names):
        return {hashlib.sha256(np.asarray(Image.open(d.images_dir / n)).tobytes()).hexdigest() for n in names}

    assert not pixels(train_names) & pixels(held_names)
    train_combos = {read_image(d.images_dir / n)[:2] for n in train_names}
    held_combos = {read_image(d.images_dir / n)[:2] for n in held_names}
    assert held_combos <= train_combos
    assert len(train_combos) == min(n_train, 20)


def test_blank_variant_same_records_constant_images(ds, blank_ds):
    for name in ("pretrain", "finetune", "heldout", "text"):
        assert getattr(blank_ds, name).read_bytes() == getattr(ds, name).read_bytes()
    for path in blank_ds.images_dir.iterdir():
        a = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
        colours = np.unique(a, axis=0)
        assert len(colours) == 1 and colours.min() >= 200, (path.name, colours)


def test_heldout_rows(ds):
    rows = heldout_rows(ds)
    records = load(ds.heldout)
    assert len(rows) == len(records)
    letters = Counter()
    for i, (row, r) in enumerate(zip(rows, records)):
        ((question, answer),) = qa_pairs(r)
        assert row["index"] == i and row["question"] == question and row["category"] == r["qtype"]
        assert row["l2-category"] == "shapes"
        assert len(row["options"]) == 4 == len(set(row["options"])) and set(row["options"]) <= set(
            r["choices"]
        )
        assert row["options"]["ABCD".index(row["answer"])] == answer
        expected = np.asarray(Image.open(ds.images_dir / r["image"]).convert("RGB"))
        assert np.array_equal(np.asarray(row["image"]), expected)
        letters[row["category"], row["answer"]] += 1
    for qtype in QTYPES:  # 12 rows per type: each letter 3 times
        assert [letters[qtype, x] for x in "ABCD"] == [N_HELDOUT // 16] * 4
    again = heldout_rows(ds)
    assert [(r["options"], r["answer"]) for r in again] == [(r["options"], r["answer"]) for r in rows]


def test_chance_levels_match_choices(ds):
    levels = chance_levels()
    for r in load(ds.heldout):
        assert levels[r["qtype"]] == pytest.approx(1 / len(r["choices"]))
    assert max(levels.values()) <= 0.25


def test_vocab_words_are_exactly_the_corpus_words(ds):
    texts = corpus_texts(ds)
    words = {w for t in texts for w in re.findall(r"[A-Za-z]+", t)} - {"image"}  # "image" only in "<image>"
    assert words == set(VOCAB_WORDS)
    assert len(texts) == len(set(texts))


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"n_train_images": 0}, "at least one"),
        ({"image_size": 31}, "image_size"),
        ({"image_size": 16}, "image_size"),
    ],
)
def test_bad_parameters(tmp_path, kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        generate_shapes_dataset(tmp_path, **{"n_train_images": 4, "n_heldout_images": 4, **kwargs})
