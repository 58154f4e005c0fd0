"""Synthetic shapes data for the tiny end-to-end demo (image -> projector -> tiny LLM on 2 CPU cores).

Each 64x64 image holds 1-4 identical shapes (5 colours x 4 shapes) in distinct quadrants. Questions have a
fixed phrasing per type and answers from a closed set, so held-out accuracy compares with chance;
`blank=True` writes the same records over background-only images, the control that must stay near chance.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from llava_ft.constants import IMAGE_TOKEN
from llava_ft.files import atomic_path

# Bump when the generated content changes, so cached datasets written by older code are regenerated.
FORMAT_VERSION = 1

# Saturated colours: every shape colour has a channel <= 60, every background channel is >= 200.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "blue": (40, 80, 215),
    "green": (40, 160, 60),
    "yellow": (235, 195, 20),
    "purple": (145, 60, 190),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # quadrant k: row k // 2, column k % 2
COUNT_WORDS = ("one", "two", "three", "four")

QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is it?",
    "position": "Where is the shape?",
    "count": "How many shapes are there?",
}
QTYPES = tuple(QUESTIONS)
CHOICES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "position": POSITIONS,
    "count": COUNT_WORDS,
}

# Text-only chat mixed into the finetune set, so batches mix image and text-only samples.
TEXT_CHATS: tuple[tuple[str, str], ...] = (
    ("What colours are there?", " ".join(COLOURS)),
    ("What shapes are there?", " ".join(SHAPES)),
    ("Where can a shape be?", "top left, top right, bottom left or bottom right"),
    ("Count to four.", " ".join(COUNT_WORDS)),
    *((f"What comes after {a}?", b) for a, b in zip(COUNT_WORDS, COUNT_WORDS[1:])),
    *((f"What is the plural of {s}?", PLURALS[s]) for s in SHAPES),
)
TEXT_CHAT_EVERY = 20  # one text-only record after every 20 image records

# Sentence frames of captions and text.jsonl; their words are part of VOCAB_WORDS.
_FRAMES = ("a at the and", "the shape is", "the shapes are", "it is a", "they are", "there is one shape")
VOCAB_WORDS: tuple[str, ...] = tuple(
    sorted(
        set(
            re.findall(
                r"[A-Za-z]+",
                " ".join(
                    [
                        *_FRAMES,
                        *QUESTIONS.values(),
                        *(c for choices in CHOICES.values() for c in choices),
                        *PLURALS.values(),
                        *(q + " " + a for q, a in TEXT_CHATS),
                    ]
                ),
            )
        )
    )
)
"""Every word the generated texts use (letters only; punctuation is `?`, `.` and `,`)."""

_FILES = {
    "pretrain": "pretrain.json",
    "finetune": "finetune.json",
    "heldout": "heldout.json",
    "text": "text.jsonl",
}
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ShapeImage:
    """What one image shows; it is rendered from this alone."""

    colour: str
    shape: str
    quadrants: tuple[int, ...]
    half_size: int
    offsets: tuple[tuple[int, int], ...]  # jitter of each shape's centre from its quadrant centre
    background: tuple[int, int, int]

    @property
    def count(self) -> int:
        return len(self.quadrants)

    def answer(self, qtype: str) -> str:
        if qtype == "colour":
            return self.colour
        if qtype == "shape":
            return self.shape
        if qtype == "count":
            return COUNT_WORDS[self.count - 1]
        if qtype == "position":
            if self.count != 1:
                raise ValueError(f"position question on an image with {self.count} shapes")
            return POSITIONS[self.quadrants[0]]
        raise ValueError(f"unknown question type {qtype!r}")

    def caption(self) -> str:
        places = [POSITIONS[k] for k in self.quadrants]
        where = places[0] if len(places) == 1 else ", ".join(places[:-1]) + " and " + places[-1]
        if self.count == 1:
            return f"a {self.colour} {self.shape} at the {where}"
        return f"{COUNT_WORDS[self.count - 1]} {self.colour} {PLURALS[self.shape]} at the {where}"

    def sentences(self) -> str:
        """Caption and answers as plain sentences, for text-only incremental pretraining."""
        if self.count == 1:
            facts = [f"the shape is {self.colour}", f"it is a {self.shape}", "there is one shape"]
        else:
            facts = [
                f"the shapes are {self.colour}",
                f"they are {PLURALS[self.shape]}",
                f"there are {COUNT_WORDS[self.count - 1]} shapes",
            ]
        return ". ".join([self.caption(), *facts]) + "."

    def render(self, image_size: int, blank: bool = False) -> Image.Image:
        image = Image.new("RGB", (image_size, image_size), self.background)
        if blank:
            return image
        draw = ImageDraw.Draw(image)
        q, r, fill = image_size // 2, self.half_size, COLOURS[self.colour]
        arm = max(2, r // 3)  # half-width of a cross's bars
        for k, (dx, dy) in zip(self.quadrants, self.offsets):
            cx, cy = (k % 2) * q + q // 2 + dx, (k // 2) * q + q // 2 + dy
            if self.shape == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            elif self.shape == "square":
                draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
            elif self.shape == "triangle":
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
            else:
                draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)
                draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
        return image


@dataclass(frozen=True)
class ShapesDataset:
    root: Path
    images_dir: Path
    pretrain: Path  # LLaVA JSON: <image> -> caption ("plain" template pretraining)
    finetune: Path  # LLaVA JSON: image questions (1-2 turns) + text-only chat
    heldout: Path  # LLaVA JSON, one question per record, with "qtype" and "choices"
    text: Path  # JSONL {"text": ...}: text-only incremental pretraining
    manifest: Path
    params: dict[str, Any]
    counts: dict[str, int]

    @classmethod
    def _at(cls, root: Path, params: dict[str, Any], counts: dict[str, int]) -> ShapesDataset:
        files = {key: root / name for key, name in _FILES.items()}
        return cls(root, root / "images", **files, manifest=root / MANIFEST, params=params, counts=counts)


def chance_levels() -> dict[str, float]:
    """Accuracy of guessing per question type in open-ended evaluation (MMBench rows have 4 options: 0.25)."""
    return {qtype: 1 / len(choices) for qtype, choices in CHOICES.items()}


def generate_shapes_dataset(
    out_dir: str | Path,
    *,
    n_train_images: int = 4000,
    n_heldout_images: int = 400,
    image_size: int = 64,
    seed: int = 0,
    blank: bool = False,
) -> ShapesDataset:
    """Write the dataset under out_dir, or return it as is if out_dir already holds one with these parameters.

    Deterministic: the same parameters give byte-identical files. The manifest is written last (atomically),
    so an interrupted run is regenerated rather than reused.
    """
    if n_train_images < 1 or n_heldout_images < 1:
        raise ValueError(
            f"need at least one train and one held-out image, got {n_train_images}/{n_heldout_images}"
        )
    if image_size < 32 or image_size % 2:
        raise ValueError(
            f"image_size must be even and >= 32 (shapes need room in a quadrant), got {image_size}"
        )
    root = Path(out_dir)
    params = {
        "format_version": FORMAT_VERSION,
        "n_train_images": n_train_images,
        "n_heldout_images": n_heldout_images,
        "image_size": image_size,
        "seed": seed,
        "blank": blank,
    }
    existing = _complete_dataset(root, params)
    if existing is not None:
        return existing

    (root / MANIFEST).unlink(missing_ok=True)  # the old dataset stops being complete before anything changes
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    n_total = n_train_images + n_heldout_images
    for stale in images_dir.glob("*.png"):  # left over from a larger dataset in the same folder
        if not stale.stem.isdigit() or int(stale.stem) >= n_total:
            stale.unlink()

    seen_specs: set[ShapeImage] = set()
    train = list(_train_images(random.Random(f"shapes/{seed}/train"), n_train_images, image_size, seen_specs))
    train_combos = sorted({(s.colour, s.shape) for s in train})
    heldout = list(
        _heldout_images(
            random.Random(f"shapes/{seed}/heldout"), n_heldout_images, image_size, train_combos, seen_specs
        )
    )
    names = [f"{i:05d}.png" for i in range(n_total)]
    for name, spec in zip(names, [*train, *(spec for spec, _ in heldout)]):
        spec.render(image_size, blank).save(images_dir / name, format="PNG")

    pretrain = [
        {"id": f"pretrain-{i:05d}", "image": names[i], "conversations": _turns([(IMAGE_TOKEN, s.caption())])}
        for i, s in enumerate(train)
    ]
    finetune, asked = _finetune_records(train, names)
    held = [
        {
            "id": f"heldout-{i:05d}",
            "image": names[n_train_images + i],
            "conversations": _turns([(f"{IMAGE_TOKEN}\n{QUESTIONS[qtype]}", spec.answer(qtype))]),
            "qtype": qtype,
            "choices": list(CHOICES[qtype]),
        }
        for i, (spec, qtype) in enumerate(heldout)
    ]
    texts = [s.sentences() for s in train] + [f"{q} {a}." for q, a in TEXT_CHATS]
    _write_json(root / _FILES["pretrain"], pretrain)
    _write_json(root / _FILES["finetune"], finetune)
    _write_json(root / _FILES["heldout"], held)
    (root / _FILES["text"]).write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8"
    )

    counts = {
        "train_images": n_train_images,
        "heldout_images": n_heldout_images,
        "pretrain_records": len(pretrain),
        "finetune_records": len(finetune),
        "finetune_text_only_records": sum("image" not in r for r in finetune),
        **{f"finetune_questions_{qtype}": asked[qtype] for qtype in QTYPES},
        **{f"heldout_questions_{qtype}": sum(q == qtype for _, q in heldout) for qtype in QTYPES},
        "text_lines": len(texts),
    }
    with atomic_path(root / MANIFEST) as tmp:
        _write_json(tmp, {"params": params, "counts": counts})
    return ShapesDataset._at(root, params, counts)


def corpus_texts(dataset: ShapesDataset) -> list[str]:
    """Every distinct text of the dataset (captions, questions, answers, sentences), in file order."""
    texts: list[str] = []
    for path in (dataset.pretrain, dataset.finetune, dataset.heldout):
        for record in json.loads(path.read_text(encoding="utf-8")):
            texts.extend(turn["value"] for turn in record["conversations"])
    with dataset.text.open(encoding="utf-8") as f:
        texts.extend(json.loads(line)["text"] for line in f)
    return list(dict.fromkeys(texts))


def heldout_rows(dataset: ShapesDataset) -> list[dict[str, Any]]:
    """MMBench-style rows for the held-out split: the answer plus 3 distractors from its closed set.

    The answer's letter cycles A-D within each question type (no letter bias a constant answer could exploit);
    distractors and their order are fixed by the dataset seed and the row index.
    """
    rows = []
    records = json.loads(dataset.heldout.read_text(encoding="utf-8"))
    for index, record in enumerate(records):
        question, answer = (turn["value"] for turn in record["conversations"])
        rng = random.Random(f"shapes/{dataset.params['seed']}/options/{index}")
        options = rng.sample([c for c in record["choices"] if c != answer], 3)
        letter_at = (index // len(QTYPES)) % 4
        options.insert(letter_at, answer)
        with Image.open(dataset.images_dir / record["image"]) as image:
            pil = image.convert("RGB")
        rows.append(
            {
                "index": index,
                "question": question.removeprefix(IMAGE_TOKEN + "\n"),
                "options": options,
                "answer": "ABCD"[letter_at],
                "category": record["qtype"],
                "l2-category": "shapes",
                "image": pil,
            }
        )
    return rows


def _complete_dataset(root: Path, params: dict[str, Any]) -> ShapesDataset | None:
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if manifest.get("params") != params or "counts" not in manifest:
        return None
    dataset = ShapesDataset._at(root, params, manifest["counts"])
    n_images = params["n_train_images"] + params["n_heldout_images"]
    files = [dataset.pretrain, dataset.finetune, dataset.heldout, dataset.text]
    files += [dataset.images_dir / f"{i:05d}.png" for i in range(n_images)]
    return dataset if all(f.is_file() for f in files) else None


def _sample_image(
    rng: random.Random, colour: str, shape: str, count: int, image_size: int, seen: set[ShapeImage]
) -> ShapeImage:
    """A new random layout, distinct from every image drawn before (train and held-out never coincide)."""
    q = image_size // 2
    jitter = max(1, q // 16)  # with half_size <= 3q/8 the shape stays 2+ pixels inside its quadrant
    while True:
        quadrants = tuple(sorted(rng.sample(range(4), count)))
        spec = ShapeImage(
            colour=colour,
            shape=shape,
            quadrants=quadrants,
            half_size=rng.randint(q // 4, 3 * q // 8),
            offsets=tuple((rng.randint(-jitter, jitter), rng.randint(-jitter, jitter)) for _ in quadrants),
            background=(rng.randint(200, 250), rng.randint(200, 250), rng.randint(200, 250)),
        )
        if spec not in seen:
            seen.add(spec)
            return spec


def _train_images(rng: random.Random, n: int, image_size: int, seen: set[ShapeImage]) -> Iterator[ShapeImage]:
    """Colour-shape combinations in shuffled rounds (every one appears once n >= 20); image i's first
    question will be of type QTYPES[i % 4], so position images (i % 4 == 2) hold a single shape. Question
    types are asked evenly: under-sampled, position questions take a tiny model much longer to learn."""
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    for i in range(n):
        if i % len(combos) == 0:
            rng.shuffle(combos)
        colour, shape = combos[i % len(combos)]
        count = 1 if QTYPES[i % len(QTYPES)] == "position" else rng.randint(1, 4)
        yield _sample_image(rng, colour, shape, count, image_size, seen)


def _heldout_images(
    rng: random.Random, n: int, image_size: int, combos: list[tuple[str, str]], seen: set[ShapeImage]
) -> Iterator[tuple[ShapeImage, str]]:
    """One question per image, types in rotation; only colour-shape combinations seen in training."""
    for i in range(n):
        qtype = QTYPES[i % len(QTYPES)]
        colour, shape = rng.choice(combos)
        count = 1 if qtype == "position" else rng.randint(1, 4)
        yield _sample_image(rng, colour, shape, count, image_size, seen), qtype


def _finetune_records(train: list[ShapeImage], names: list[str]) -> tuple[list[dict], Counter[str]]:
    """One record per train image, with a text-only chat record after every TEXT_CHAT_EVERY of them.

    The first question's type rotates; a second turn is added when one of the least-asked types applies
    to the image, which keeps the types balanced although only single-shape images allow position questions.
    """
    records: list[dict] = []
    asked: Counter[str] = Counter({qtype: 0 for qtype in QTYPES})
    given: Counter[tuple[str, str]] = Counter({(t, a): 0 for t in QTYPES for a in CHOICES[t]})

    def ask(qtype: str) -> None:
        asked[qtype] += 1
        given[qtype, spec.answer(qtype)] += 1

    def helps_balance(qtype: str) -> bool:
        # Among the least-asked types, and its answer here among that type's least-given answers (otherwise
        # count questions, added to the many single-shape images, would mostly be answered "one").
        if qtype == "position" and spec.count != 1 or asked[qtype] != min(asked.values()):
            return False
        return given[qtype, spec.answer(qtype)] == min(given[qtype, a] for a in CHOICES[qtype])

    for i, spec in enumerate(train):
        qtypes = [QTYPES[i % len(QTYPES)]]
        ask(qtypes[0])
        second = [t for t in QTYPES if t != qtypes[0] and helps_balance(t)]
        if second:
            qtypes.append(second[0])
            ask(second[0])
        pairs = [(QUESTIONS[t], spec.answer(t)) for t in qtypes]
        pairs[0] = (f"{IMAGE_TOKEN}\n{pairs[0][0]}", pairs[0][1])
        records.append({"id": f"finetune-{i:05d}", "image": names[i], "conversations": _turns(pairs)})
        if (i + 1) % TEXT_CHAT_EVERY == 0:
            k = (i + 1) // TEXT_CHAT_EVERY - 1
            question, answer = TEXT_CHATS[k % len(TEXT_CHATS)]
            records.append({"id": f"text-{k:05d}", "conversations": _turns([(question, answer)])})
    return records, asked


def _turns(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [turn for q, a in pairs for turn in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
