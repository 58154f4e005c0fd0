"""The shapes dataset: determinism and caching, unseen combinations kept out of training, balanced options and
answers, MMBench prompts as the evaluation builds them, and texts that agree with the pixels.

Captions are parsed and images read back with code written here (word tables, hue ranges, a flood fill),
independent of the generator's colour table and drawing code.
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

from llava_ft.demo.prepare import write_eval_files
from llava_ft.demo.shapes import (
    QTYPES,
    SETTINGS,
    ShapesDataset,
    chance_levels,
    corpus_texts,
    generate_shapes_dataset,
    heldout_rows,
    unseen_combinations,
    vocab_words,
)
from llava_ft.eval.mmbench import MMBenchRow, build_prompt, decode_image, load_mmbench_tsv

N_TRAIN, N_HELDOUT = 240, 96
LETTERS = "ABCD"
INSTRUCTION = "Answer with the option's letter from the given choices directly."
# The words each setting must use, written out here: the test reads captions with these, not the generator's.
WORDS = {
    "default": {
        "colour": ("red", "blue", "green", "yellow", "purple"),
        "shape": ("circle", "square", "triangle", "cross", "star"),
        "plural": ("circles", "squares", "triangles", "crosses", "stars"),
        "count": ("one", "two", "three", "four"),
        "position": ("top left", "top right", "bottom left", "bottom right"),
    },
    "alt": {
        "colour": ("orange", "pink", "cyan", "brown", "black"),
        "shape": ("ring", "diamond", "bar", "crescent", "arrow"),
        "plural": ("rings", "diamonds", "bars", "crescents", "arrows"),
        "count": ("1", "2", "3", "4"),
        "position": ("upper left", "upper right", "lower left", "lower right"),
    },
}
DATASETS = [("default", 0), ("default", 1), ("alt", 0), ("alt", 2)]

Label = tuple[str, str, tuple[str, ...]]  # colour, shape, positions (one per shape, in quadrant order)


def make(root: Path, setting: str = "default", seed: int = 0, **kw) -> ShapesDataset:
    sizes = {"n_train_images": N_TRAIN, "n_heldout_images": N_HELDOUT, **kw}
    return generate_shapes_dataset(root, setting=setting, seed=seed, **sizes)


@pytest.fixture(scope="module", params=DATASETS, ids=[f"{s}-{seed}" for s, seed in DATASETS])
def ds(request, tmp_path_factory) -> ShapesDataset:
    setting, seed = request.param
    return make(tmp_path_factory.mktemp(f"shapes_{setting}_{seed}"), setting, seed)


@pytest.fixture(scope="module")
def blank_ds(tmp_path_factory) -> ShapesDataset:
    return make(tmp_path_factory.mktemp("blank"), blank=True)


@pytest.fixture(scope="module")
def plain_ds(tmp_path_factory) -> ShapesDataset:
    return make(tmp_path_factory.mktemp("plain"))


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


def parse_mc(text: str) -> tuple[str, list[str]] | None:
    """(question, options) of a lettered multiple-choice prompt, None for an open question."""
    lines = text.split("\n")
    if lines[-1] != INSTRUCTION:
        assert "\n" not in text, text
        return None
    options = []
    for i, line in enumerate(lines[1:-1]):
        m = re.fullmatch(r"([A-D])\. (.+)", line)
        assert m and m[1] == LETTERS[i], text
        options.append(m[2])
    return lines[0], options


def qtype_of(setting: str, texts: list[str]) -> str:
    """The question type whose answers are these texts (the types' answer words are disjoint)."""
    (qtype,) = [t for t in QTYPES if set(texts) <= set(WORDS[setting][t])]
    return qtype


def resolved(setting: str, question: str, answer: str) -> tuple[str, str, list[str] | None]:
    """(question type, answer text, options or None) of one question-answer turn."""
    mc = parse_mc(question)
    if mc is None:
        return qtype_of(setting, [answer]), answer, None
    options = mc[1]
    return qtype_of(setting, options), options[LETTERS.index(answer)], options


def parse_caption(setting: str, caption: str) -> Label:
    w = WORDS[setting]
    m = re.fullmatch(r"(\S+) (\w+) (\w+) at the (.+)", caption)
    assert m, caption
    det, colour, noun, where = m.groups()
    count = 1 if det == "a" else w["count"].index(det) + 1
    shape = noun if count == 1 else w["shape"][w["plural"].index(noun)]
    positions = tuple(re.split(r", | and ", where))
    assert colour in w["colour"] and shape in w["shape"], caption
    assert len(positions) == count and all(p in w["position"] for p in positions), caption
    assert list(positions) == sorted(positions, key=w["position"].index), caption
    return colour, shape, positions


def expected_answer(setting: str, label: Label, qtype: str) -> str:
    colour, shape, positions = label
    if qtype == "position":
        assert len(positions) == 1, "position asked about several shapes"
        return positions[0]
    return {"colour": colour, "shape": shape, "count": WORDS[setting]["count"][len(positions) - 1]}[qtype]


def train_labels(ds: ShapesDataset) -> dict[str, Label]:
    setting = ds.params["setting"]
    return {r["image"]: parse_caption(setting, r["conversations"][1]["value"]) for r in load(ds.pretrain)}


# --- a naive reader of the images -------------------------------------------------------------------------

# Backgrounds are pale (every channel high); every shape colour has a dark channel.
DARK = 138
MIN_BLOB = 8  # pixels; a stray noise pixel is no shape


def hue_chroma_value(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = pixels.astype(np.float64)
    r, g, b = p[:, 0], p[:, 1], p[:, 2]
    high, low = p.max(1), p.min(1)
    chroma = high - low
    c = np.where(chroma == 0, 1, chroma)
    hue = np.where(high == r, ((g - b) / c) % 6, np.where(high == g, (b - r) / c + 2, (r - g) / c + 4)) * 60
    return hue, chroma, high


def colour_names(pixels: np.ndarray, setting: str) -> np.ndarray:
    hue, chroma, value = hue_chroma_value(pixels)
    names = np.full(len(pixels), "?", dtype=object)
    if setting == "default":
        vivid = chroma >= 60
        names[vivid & ((hue >= 340) | (hue < 20))] = "red"
        names[vivid & (hue >= 35) & (hue < 70)] = "yellow"
        names[vivid & (hue >= 95) & (hue < 165)] = "green"
        names[vivid & (hue >= 205) & (hue < 245)] = "blue"
        names[vivid & (hue >= 250) & (hue < 305)] = "purple"
    else:
        vivid, warm = chroma >= 45, (chroma >= 45) & (hue < 60)
        names[chroma < 45] = "black"
        names[warm & (value < 180)] = "brown"  # orange's hue, darker
        names[warm & (value >= 180) & (hue >= 12) & (hue < 45)] = "orange"
        names[vivid & (hue >= 300) & (hue < 345)] = "pink"
        names[vivid & (hue >= 170) & (hue < 210)] = "cyan"
    return names


def blobs(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected regions of mask, each as an array of (y, x)."""
    seen = np.zeros_like(mask)
    height, width = mask.shape
    found = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, points = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            points.append((y, x))
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        found.append(np.array(points))
    return found


def read_image(path: Path, setting: str) -> tuple[str, tuple[int, ...]]:
    """(dominant colour of the shape pixels, quadrant of each blob) seen in the pixels."""
    a = np.asarray(Image.open(path).convert("RGB"))
    mask = a.min(-1) < DARK
    assert mask.any(), f"{path.name}: no shape"
    half = a.shape[0] / 2
    # Shapes keep to their quadrants: nothing on the two middle rows and columns.
    assert not mask[:, int(half) - 1 : int(half) + 1].any() and not mask[int(half) - 1 : int(half) + 1].any()
    big = [p for p in blobs(mask) if len(p) >= MIN_BLOB]
    assert sum(len(p) for p in big) >= 0.95 * mask.sum(), f"{path.name}: scattered shape pixels"
    quadrants = sorted(int(p[:, 0].mean() >= half) * 2 + int(p[:, 1].mean() >= half) for p in big)
    (colour, n), *_ = Counter(colour_names(a[mask], setting)).most_common(1)
    assert n >= 0.9 * mask.sum(), f"{path.name}: several colours"
    return colour, tuple(quadrants)


# --- files, determinism, caching, errors ------------------------------------------------------------------


def test_word_tables_are_the_settings():
    for name, words in WORDS.items():
        s = SETTINGS[name]
        for qtype in QTYPES:
            assert tuple(s.choices(qtype)) == words[qtype]
        assert tuple(s.plurals[x] for x in s.shapes) == words["plural"]


def test_files_and_counts(plain_ds):
    ds = plain_ds
    pretrain, finetune, heldout = load(ds.pretrain), load(ds.finetune), load(ds.heldout)
    assert len(pretrain) == ds.counts["pretrain_records"] == N_TRAIN
    assert len(heldout) == ds.counts["heldout_questions"] == 2 * N_HELDOUT
    assert len(finetune) == ds.counts["finetune_records"]
    assert sorted(p.name for p in ds.images_dir.iterdir()) == [
        f"{i:05d}.png" for i in range(N_TRAIN + N_HELDOUT)
    ]
    for r in pretrain:
        turns = r["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] and turns[0]["value"] == "<image>"
    lines = ds.text.read_text().splitlines()
    assert len(lines) == ds.counts["text_lines"] and all(json.loads(line)["text"] for line in lines)
    manifest = json.loads(ds.manifest.read_text())
    assert manifest["params"] == ds.params and manifest["counts"] == ds.counts


def test_deterministic_bytes(plain_ds, tmp_path):
    assert tree_hash(make(tmp_path / "again").root) == tree_hash(plain_ds.root)
    for name, kw in {"seed": {"seed": 1}, "setting": {"setting": "alt"}, "mc": {"mc_fraction": 0.2}}.items():
        assert tree_hash(make(tmp_path / name, **kw).root) != tree_hash(plain_ds.root), name


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
    other = generate_shapes_dataset(tmp_path, n_train_images=12, n_heldout_images=4, setting="alt")
    assert json.loads(other.manifest.read_text())["params"]["setting"] == "alt"
    assert parse_caption("alt", load(other.pretrain)[0]["conversations"][1]["value"])


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"n_train_images": 0}, "at least one"),
        ({"n_heldout_images": 0}, "at least one"),
        ({"image_size": 31}, "image_size"),
        ({"image_size": 16}, "image_size"),
        ({"setting": "other"}, "unknown setting"),
        ({"mc_fraction": 1.5}, "mc_fraction"),
        ({"mc_fraction": -0.1}, "mc_fraction"),
    ],
)
def test_bad_parameters(tmp_path, kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        generate_shapes_dataset(tmp_path, **{"n_train_images": 4, "n_heldout_images": 4, **kwargs})
    assert not (tmp_path / "manifest.json").exists()


# --- unseen combinations ----------------------------------------------------------------------------------


def test_unseen_combinations_truly_absent_from_training(ds):
    setting, seed = ds.params["setting"], ds.params["seed"]
    w = WORDS[setting]
    unseen = {tuple(p) for p in json.loads(ds.manifest.read_text())["unseen_combinations"]}
    assert unseen == set(unseen_combinations(SETTINGS[setting], seed))
    assert sorted(c for c, _ in unseen) == sorted(w["colour"])  # one per colour
    assert len({s for _, s in unseen}) == len(unseen)  # no shape held out twice

    labels = train_labels(ds)
    train_combos = Counter((c, s) for c, s, _ in labels.values())
    # Every colour and every shape is still trained, with every partner but its unseen one.
    assert set(train_combos) == {(c, s) for c in w["colour"] for s in w["shape"]} - unseen
    assert max(train_combos.values()) - min(train_combos.values()) <= 1  # seen combinations equally often

    finetune = load(ds.finetune)
    image_records = [r for r in finetune if "image" in r]
    assert {r["image"] for r in image_records} == set(labels)
    for r in image_records:  # every answer agrees with the caption of the same image
        for question, answer in qa_pairs(r):
            qtype, text, _ = resolved(setting, question, answer)
            assert text == expected_answer(setting, labels[r["image"]], qtype), (r, labels[r["image"]])

    def shows_unseen(text: str) -> bool:
        words = set(re.findall(r"\w+", text))
        return any(c in words and ({s, w["plural"][w["shape"].index(s)]} & words) for c, s in unseen)

    lines = [json.loads(line)["text"] for line in ds.text.read_text().splitlines()]
    assert not [t for t in lines if shows_unseen(t)]
    captions = [r["conversations"][1]["value"] for r in load(ds.pretrain)]
    assert not [t for t in captions if shows_unseen(t)]
    for r in finetune:  # the answers of a record together (a distractor option is no answer)
        answers = [resolved(setting, q, a)[1] if "image" in r else a for q, a in qa_pairs(r)]
        assert not shows_unseen(" ".join(answers)), r
    assert [t.split(". ")[0] for t in lines[: len(captions)]] == captions  # sentences of the train images

    heldout = load(ds.heldout)
    held_names = {r["image"] for r in heldout}
    assert not held_names & set(labels)

    def pixels(names):
        return {hashlib.sha256(Image.open(ds.images_dir / n).tobytes()).hexdigest() for n in names}

    assert not pixels(held_names) & pixels(labels)
    by_combination = {"seen": set(), "unseen": set()}
    for r in heldout:
        by_combination[r["combination"]].add((r["colour"], r["shape"]))
        ((question, answer),) = qa_pairs(r)
        qtype, text, _ = resolved(setting, question, answer)
        assert qtype == r["qtype"]
        if qtype in ("colour", "shape"):
            assert text == r[qtype]
    assert by_combination["unseen"] == unseen
    assert by_combination["seen"] <= set(train_combos)
    assert Counter(r["combination"] for r in heldout) == {"seen": N_HELDOUT, "unseen": N_HELDOUT}


# --- pixels -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["default", "alt"])
def test_texts_agree_with_pixels(tmp_path, setting):
    ds = make(tmp_path, setting, seed=3)
    labels = train_labels(ds)
    positions = WORDS[setting]["position"]
    for name, (colour, _, where) in list(labels.items())[::3]:
        seen_colour, quadrants = read_image(ds.images_dir / name, setting)
        assert (seen_colour, quadrants) == (colour, tuple(positions.index(p) for p in where)), name
    counts = WORDS[setting]["count"]
    for r in load(ds.heldout):
        seen_colour, quadrants = read_image(ds.images_dir / r["image"], setting)
        assert seen_colour == r["colour"], r
        ((question, answer),) = qa_pairs(r)
        qtype, text, _ = resolved(setting, question, answer)
        if qtype == "count":
            assert text == counts[len(quadrants) - 1], r
        if qtype == "position":
            assert quadrants == (positions.index(text),), r


def test_blank_variant_same_records_no_shape_pixels(plain_ds, blank_ds):
    for name in ("pretrain", "finetune", "heldout", "text"):
        assert getattr(blank_ds, name).read_bytes() == getattr(plain_ds, name).read_bytes()
    for path in sorted(blank_ds.images_dir.iterdir()):
        a = np.asarray(Image.open(path).convert("RGB"))
        mask = a.min(-1) < DARK
        assert mask.sum() <= 3 and not [p for p in blobs(mask) if len(p) >= MIN_BLOB], path.name


# --- options and answers ----------------------------------------------------------------------------------


def assert_options(setting: str, qtype: str, options: list[str], answer: str) -> None:
    assert len(set(options)) == len(options) and answer in options
    assert set(options) <= set(WORDS[setting][qtype])


def reference_prompt(question: str, options: list[str]) -> str:
    row = MMBenchRow(index=0, question=question, options=dict(zip(LETTERS, options)), answer="A")
    return build_prompt(row)


def test_finetune_multiple_choice_balanced_and_in_mmbench_prompt(ds):
    setting = ds.params["setting"]
    letters: Counter[tuple[int, str]] = Counter()
    styles: Counter[tuple[str, str]] = Counter()
    for r in load(ds.finetune):
        for question, answer in qa_pairs(r):
            if "image" not in r:
                assert parse_mc(question) is None and "<image>" not in json.dumps(r)
                continue
            qtype, text, options = resolved(setting, question, answer)
            styles[qtype, "open" if options is None else "mc"] += 1
            if options is None:
                continue
            assert_options(setting, qtype, options, text)
            assert question == reference_prompt(parse_mc(question)[0], options)
            assert parse_mc(question)[0] in SETTINGS[setting].questions[qtype]
            letters[len(options), answer] += 1
    for n in (2, 3, 4):
        per_letter = [letters[n, x] for x in LETTERS[:n]]
        assert min(per_letter) > 0 and max(per_letter) - min(per_letter) <= 1, (n, per_letter)
    assert sum(letters.values()) == sum(n for (_, s), n in styles.items() if s == "mc")
    for qtype in QTYPES:  # both styles for every type, neither much rarer (mc_fraction 0.5)
        open_n, mc_n = styles[qtype, "open"], styles[qtype, "mc"]
        assert 0.6 * open_n <= mc_n <= open_n / 0.6, (qtype, open_n, mc_n)
    assert sum(f"finetune_questions_{q}_{s}" in ds.counts for q in QTYPES for s in ("mc", "open")) == 8


def test_heldout_questions_balanced_and_in_mmbench_prompt(ds):
    setting = ds.params["setting"]
    heldout = load(ds.heldout)
    letters: Counter[tuple[str, str, str]] = Counter()
    for open_r, mc_r in zip(heldout[::2], heldout[1::2]):
        assert (open_r["style"], mc_r["style"]) == ("open", "mc") and open_r["image"] == mc_r["image"]
        assert open_r["combination"] == mc_r["combination"] and open_r["qtype"] != mc_r["qtype"]
        ((question, answer),) = qa_pairs(open_r)
        assert parse_mc(question) is None and open_r["choices"] == list(WORDS[setting][open_r["qtype"]])
        assert answer in open_r["choices"] and question in SETTINGS[setting].questions[open_r["qtype"]]
        ((prompt, letter),) = qa_pairs(mc_r)
        qtype, text, options = resolved(setting, prompt, letter)
        assert qtype == mc_r["qtype"] and options == mc_r["options"] and text == mc_r["answer_text"]
        assert len(options) == 4 and prompt == reference_prompt(mc_r["question"], options)
        assert_options(setting, qtype, options, text)
        letters[qtype, mc_r["combination"], letter] += 1
    for qtype in QTYPES:
        for combination in ("seen", "unseen"):
            per_letter = [letters[qtype, combination, x] for x in LETTERS]
            assert max(per_letter) - min(per_letter) <= 1, (qtype, combination, per_letter)
    per_type = Counter(r["qtype"] for r in heldout)
    assert set(per_type) == set(QTYPES) and max(per_type.values()) - min(per_type.values()) <= 4, per_type


def test_heldout_mmbench_tsv_reads_back_as_the_multiple_choice_rows(plain_ds):
    write_eval_files(plain_ds)
    file = load_mmbench_tsv(plain_ds.root / "heldout_mmbench.tsv")
    assert not file.orphans
    mains = [row for row in file.rows if row.is_main]
    mc = [r for r in load(plain_ds.heldout) if r["style"] == "mc"]
    assert len(mains) == len(mc) == N_HELDOUT and len(file.rows) == 4 * N_HELDOUT  # 3 rotations each
    for row, r in zip(mains, mc):
        assert row.question == r["question"] and list(row.options.values()) == r["options"]
        assert row.answer == r["conversations"][1]["value"] and row.options[row.answer] == r["answer_text"]
        assert (row.category, row.l2_category) == (r["qtype"], r["combination"])
        assert "<image>\n" + build_prompt(row) == r["conversations"][0]["value"]
    for row in mains[:4]:
        expected = np.asarray(Image.open(plain_ds.images_dir / mc[row.index]["image"]).convert("RGB"))
        assert np.array_equal(np.asarray(decode_image(row)), expected)
    for row in file.rows:  # every rotation keeps the answer text
        assert row.options[row.answer] == mc[row.group]["answer_text"]


def test_heldout_rows(plain_ds):
    rows = heldout_rows(plain_ds)
    mc = [r for r in load(plain_ds.heldout) if r["style"] == "mc"]
    assert [row["index"] for row in rows] == list(range(len(mc)))
    for row, r in zip(rows[:8], mc):
        expected = np.asarray(Image.open(plain_ds.images_dir / r["image"]).convert("RGB"))
        assert np.array_equal(np.asarray(row["image"]), expected)
    for row, r in zip(rows, mc):
        assert (row["question"], row["options"], row["category"], row["l2-category"]) == (
            r["question"], r["options"], r["qtype"], r["combination"]
        )  # fmt: skip
        assert row["options"][LETTERS.index(row["answer"])] == r["answer_text"]


@pytest.mark.parametrize("setting", ["default", "alt"])
def test_finetune_answers_balanced_within_each_type(tmp_path, setting):
    # Count questions on the single-shape position images could all be "one": answers are balanced too.
    ds = generate_shapes_dataset(tmp_path, n_train_images=1200, n_heldout_images=4, setting=setting)
    labels = train_labels(ds)
    open_answers: Counter[tuple[str, str]] = Counter()
    all_answers: Counter[tuple[str, str]] = Counter()
    for r in load(ds.finetune):
        if "image" in r:
            for question, answer in qa_pairs(r):
                qtype, text, options = resolved(setting, question, answer)
                all_answers[qtype, text] += 1
                open_answers[qtype, text] += options is None
    for qtype in QTYPES:
        for answers, tolerance in ((all_answers, 0.25), (open_answers, 0.4)):
            per_answer = [answers[qtype, a] for a in WORDS[setting][qtype]]
            mean = sum(per_answer) / len(per_answer)
            assert all(abs(n - mean) <= tolerance * mean for n in per_answer), (qtype, per_answer)
    combos = Counter((c, s) for c, s, _ in labels.values())
    assert len(combos) == 20 and max(combos.values()) - min(combos.values()) <= 1
    shape_counts = Counter(len(where) for _, _, where in labels.values())
    assert len(shape_counts) == 4


def test_every_image_is_asked_every_question_that_fits_it(plain_ds):
    # Colour, shape and count of every image, in shuffled order; one image in four (a single shape) is asked
    # its position instead of its count, which would always be one.
    finetune = load(plain_ds.finetune)
    images = [r for r in finetune if "image" in r]
    labels = train_labels(plain_ds)
    types = [[resolved("default", q, a)[0] for q, a in qa_pairs(r)] for r in images]
    assert all(sorted(t) in (["colour", "count", "shape"], ["colour", "position", "shape"]) for t in types)
    with_position = [r for r, t in zip(images, types) if "position" in t]
    assert len(with_position) == len(images) // 4
    assert all(len(labels[r["image"]][2]) == 1 for r in with_position)
    assert len({tuple(t) for t in types}) > 6  # the order varies
    text_only = [r for r in finetune if "image" not in r]
    assert len(text_only) == plain_ds.counts["finetune_text_only_records"] > 0


def test_chance_levels_match_choices():
    for setting in WORDS:
        assert chance_levels(setting) == {t: 1 / len(WORDS[setting][t]) for t in QTYPES}


# --- words ------------------------------------------------------------------------------------------------


def test_alt_setting_shares_no_colour_or_shape_word():
    default, alt = (set(WORDS[s]["colour"] + WORDS[s]["shape"] + WORDS[s]["plural"]) for s in WORDS)
    assert not default & alt
    default_q, alt_q = ({q for qs in SETTINGS[s].questions.values() for q in qs} for s in WORDS)
    assert not default_q & alt_q  # other phrasings too


def test_vocab_words_cover_the_corpus(ds):
    texts = corpus_texts(ds)
    assert len(texts) == len(set(texts))
    # "image" only in "<image>"
    words = {w for t in texts for w in re.findall(r"[A-Za-z0-9']+", t)} - {"image"}
    assert words == set(vocab_words(ds.params["setting"]))
    assert set(WORDS[ds.params["setting"]]["plural"]) <= words
