"""Synthetic shapes data for the tiny end-to-end demo (image -> projector -> tiny LLM on 2 CPU cores).

Each image holds 1-4 shapes of one colour and one kind, one per quadrant, each with its own size and rotation,
over a varied pale background (flat, gradient, stripes, split tones or noise). Questions come in several
phrasings and two styles, as LLaVA-665K mixes them: open-ended (one-word answers from a closed set, so accuracy
compares with chance) and lettered multiple choice in LLaVA's MMBench prompt (2-4 shuffled options). Some
colour-shape combinations never appear in training (captions, questions, text lines); the held-out split asks
about seen and unseen combinations alike. `blank=True` writes the same records over background-only images:
the control that must stay near chance.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from llava_ft.constants import IMAGE_TOKEN
from llava_ft.files import atomic_path

# Bump when the generated content changes, so cached datasets written by older code are regenerated.
FORMAT_VERSION = 6

QTYPES = ("colour", "shape", "count", "position")
# LLaVA's MMBench instruction, the text the evaluation appends (llava_ft.eval.mmbench.EN_INSTRUCTION).
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCD"


@dataclass(frozen=True)
class Setting:
    """The vocabulary of one generator setting: what can be drawn and how questions are phrased."""

    name: str
    colours: dict[str, tuple[int, int, int]]
    """Saturated colours, each far from the pale backgrounds (some channel <= 130, backgrounds >= 175)."""
    shapes: tuple[str, ...]
    plurals: dict[str, str]
    positions: tuple[str, str, str, str]
    """Quadrant names; quadrant k is row k // 2, column k % 2."""
    counts: tuple[str, str, str, str]
    questions: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Phrasings per question type; position questions are asked about single-shape images only."""
    text_chats: tuple[tuple[str, str], ...] = ()
    """Text-only chat mixed into the finetune set."""

    def choices(self, qtype: str) -> tuple[str, ...]:
        return {
            "colour": tuple(self.colours),
            "shape": self.shapes,
            "count": self.counts,
            "position": self.positions,
        }[qtype]


def _chats(colours: Any, shapes: Any, counts: Any, plurals: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return (
        ("What colours are there?", " ".join(colours)),
        ("What shapes are there?", " ".join(shapes)),
        ("Count to four.", " ".join(counts)),
        *((f"What comes after {a}?", b) for a, b in zip(counts, counts[1:])),
        *((f"What is the plural of {s}?", plurals[s]) for s in shapes),
    )


_DEFAULT_COLOURS = {
    "red": (215, 40, 40),
    "blue": (40, 80, 215),
    "green": (40, 160, 60),
    "yellow": (235, 195, 20),
    "purple": (145, 60, 190),
}
_DEFAULT_SHAPES = ("circle", "square", "triangle", "cross", "star")
_DEFAULT_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses",
                    "star": "stars"}  # fmt: skip
_DEFAULT_COUNTS = ("one", "two", "three", "four")
_ALT_COLOURS = {
    "orange": (240, 120, 15),
    "pink": (230, 70, 160),
    "cyan": (10, 170, 200),
    "brown": (120, 70, 30),
    "black": (25, 25, 25),
}
_ALT_SHAPES = ("ring", "diamond", "bar", "crescent", "arrow")
_ALT_PLURALS = {
    "ring": "rings",
    "diamond": "diamonds",
    "bar": "bars",
    "crescent": "crescents",
    "arrow": "arrows",
}
_ALT_COUNTS = ("1", "2", "3", "4")

SETTINGS: dict[str, Setting] = {
    "default": Setting(
        name="default",
        colours=_DEFAULT_COLOURS,
        shapes=_DEFAULT_SHAPES,
        plurals=_DEFAULT_PLURALS,
        positions=("top left", "top right", "bottom left", "bottom right"),
        counts=_DEFAULT_COUNTS,
        questions={
            "colour": (
                "What colour is the shape?",
                "What colour are the shapes?",
                "Which colour do you see?",
            ),
            "shape": ("What shape is it?", "What shape are they?", "Name the shape."),
            "count": ("How many shapes are there?", "How many objects can you see?", "Count the shapes."),
            "position": ("Where is the shape?", "In which corner is the shape?"),
        },
        text_chats=_chats(_DEFAULT_COLOURS, _DEFAULT_SHAPES, _DEFAULT_COUNTS, _DEFAULT_PLURALS),
    ),
    # Other colours, shapes, counts written as digits and other phrasings: the recipe must not depend on one set.
    "alt": Setting(
        name="alt",
        colours=_ALT_COLOURS,
        shapes=_ALT_SHAPES,
        plurals=_ALT_PLURALS,
        positions=("upper left", "upper right", "lower left", "lower right"),
        counts=_ALT_COUNTS,
        questions={
            "colour": ("Which color is the object?", "Tell me the color.", "What color do the objects have?"),
            "shape": ("Which kind of object is this?", "What is drawn here?", "Identify the object."),
            "count": ("How many objects are in the picture?", "What is the number of objects?"),
            "position": ("Which corner is the object in?", "Where in the picture is the object?"),
        },
        text_chats=_chats(_ALT_COLOURS, _ALT_SHAPES, _ALT_COUNTS, _ALT_PLURALS),
    ),
}

# Rotation of each shape, uniform in [-ROTATION, ROTATION] degrees: tilted as in photos (turned all the way
# round, a tiny tower trained for a minute cannot tell a turned square from a circle).
ROTATION = 20.0

BACKGROUNDS = ("flat", "gradient", "stripes", "split", "noise")

_FILES = {
    "pretrain": "pretrain.json",
    "finetune": "finetune.json",
    "heldout": "heldout.json",
    "text": "text.jsonl",
}
MANIFEST = "manifest.json"


def mc_prompt(question: str, options: list[str]) -> str:
    """LLaVA's MMBench prompt: the question, lettered options one per line, then the instruction."""
    return f"{question}\n" + "".join(f"{LETTERS[i]}. {o}\n" for i, o in enumerate(options)) + MC_INSTRUCTION


def unseen_combinations(setting: Setting, seed: int) -> list[tuple[str, str]]:
    """The colour-shape pairs kept out of training: one per colour and at most one more per shape than any
    other, so every colour and every shape is still seen with others. Drawn from the seed."""
    rng = random.Random(f"shapes/{setting.name}/{seed}/unseen")
    shapes = list(setting.shapes)
    rng.shuffle(shapes)
    return sorted((c, shapes[i % len(shapes)]) for i, c in enumerate(setting.colours))


@dataclass(frozen=True)
class ShapeImage:
    """What one image shows; it is rendered from this alone."""

    colour: str
    shape: str
    quadrants: tuple[int, ...]
    sizes: tuple[int, ...]  # half-size of each shape, in pixels
    angles: tuple[float, ...]  # rotation of each shape, in degrees
    offsets: tuple[tuple[int, int], ...]  # jitter of each shape's centre from its quadrant centre
    background: tuple[Any, ...]  # (kind, parameters...)
    tint: tuple[int, int, int]  # small shift of the shapes' colour
    noise_seed: int

    @property
    def count(self) -> int:
        return len(self.quadrants)

    def answer(self, qtype: str, setting: Setting) -> str:
        if qtype == "colour":
            return self.colour
        if qtype == "shape":
            return self.shape
        if qtype == "count":
            return setting.counts[self.count - 1]
        if qtype == "position":
            if self.count != 1:
                raise ValueError(f"position question on an image with {self.count} shapes")
            return setting.positions[self.quadrants[0]]
        raise ValueError(f"unknown question type {qtype!r}")

    def caption(self, setting: Setting) -> str:
        places = [setting.positions[k] for k in self.quadrants]
        where = places[0] if len(places) == 1 else ", ".join(places[:-1]) + " and " + places[-1]
        if self.count == 1:
            return f"a {self.colour} {self.shape} at the {where}"
        return f"{setting.counts[self.count - 1]} {self.colour} {setting.plurals[self.shape]} at the {where}"

    def sentences(self, setting: Setting) -> str:
        """Caption and answers as plain sentences, for text-only incremental pretraining."""
        if self.count == 1:
            facts = [
                f"the shape is {self.colour}",
                f"it is a {self.shape}",
                f"there is {setting.counts[0]} shape",
            ]
        else:
            n = setting.counts[self.count - 1]
            facts = [f"the shapes are {self.colour}", f"they are {setting.plurals[self.shape]}",
                     f"there are {n} shapes"]  # fmt: skip
        return ". ".join([self.caption(setting), *facts]) + "."

    def render(self, image_size: int, setting: Setting, blank: bool = False) -> Image.Image:
        image = _background(self.background, image_size)
        if not blank:
            mask = Image.new("L", (image_size, image_size), 0)
            draw = ImageDraw.Draw(mask)
            q = image_size // 2
            for k, r, angle, (dx, dy) in zip(self.quadrants, self.sizes, self.angles, self.offsets):
                x0, y0 = (k % 2) * q, (k // 2) * q
                (lo_x, hi_x), (lo_y, hi_y) = _extent(self.shape, r, angle)
                # Kept a pixel inside its quadrant: shapes in neighbouring quadrants never touch.
                cx = min(max(x0 + q / 2 + dx, x0 + 1 - lo_x), x0 + q - 2 - hi_x)
                cy = min(max(y0 + q / 2 + dy, y0 + 1 - lo_y), y0 + q - 2 - hi_y)
                _draw(draw, self.shape, cx, cy, r, angle)
            fill = tuple(min(255, max(0, c + t)) for c, t in zip(setting.colours[self.colour], self.tint))
            image.paste(fill, (0, 0), mask)
        # Sensor noise on every image, blank ones too; the "noise" background is stronger.
        sigma = self.background[2] if self.background[0] == "noise" else 3.0
        noise = np.random.default_rng(self.noise_seed).normal(0, sigma, (image_size, image_size, 1))
        pixels = np.asarray(image, dtype=np.float32) + noise
        return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def _pale(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randint(185, 250), rng.randint(185, 250), rng.randint(185, 250))


def _sample_background(rng: random.Random) -> tuple[Any, ...]:
    kind = rng.choice(BACKGROUNDS)
    if kind == "flat":
        return (kind, _pale(rng))
    if kind == "noise":
        return (kind, _pale(rng), rng.uniform(6, 12))
    if kind == "stripes":
        return (kind, _pale(rng), _pale(rng), rng.randint(3, 8), rng.choice((0, 45, 90, 135)))
    return (kind, _pale(rng), _pale(rng), rng.uniform(0, 360))  # gradient or split, at an angle


def _background(bg: tuple[Any, ...], size: int) -> Image.Image:
    kind = bg[0]
    if kind in ("flat", "noise"):
        return Image.new("RGB", (size, size), bg[1])
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) - (size - 1) / 2
    a, b = np.array(bg[1], np.float32), np.array(bg[2], np.float32)
    if kind == "stripes":
        theta = math.radians(bg[4])
        band = ((x * math.cos(theta) + y * math.sin(theta) + size) // bg[3]) % 2
        mix = band[..., None]
    else:
        theta = math.radians(bg[3])
        along = x * math.cos(theta) + y * math.sin(theta)
        if kind == "split":
            mix = (along > 0).astype(np.float32)[..., None]
        else:
            mix = ((along - along.min()) / (along.max() - along.min()))[..., None]
    return Image.fromarray((a * (1 - mix) + b * mix).round().astype(np.uint8))


def _polygon(points: list[tuple[float, float]], cx: float, cy: float, r: float, angle: float) -> list:
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + r * (px * c - py * s), cy + r * (px * s + py * c)) for px, py in points]


def _star(n: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    pts = []
    for i in range(2 * n):
        rad = 1.0 if i % 2 == 0 else inner
        t = math.pi * i / n - math.pi / 2
        pts.append((rad * math.cos(t), rad * math.sin(t)))
    return pts


# Unit outlines (radius 1) of the polygon shapes; circle, ring and crescent are drawn as ellipses.
_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0, -1), (-0.95, 0.75), (0.95, 0.75)],
    "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
              (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
    "star": _star(),
    "diamond": [(0, -1), (0.55, 0), (0, 1), (-0.55, 0)],
    "bar": [(-1, -0.28), (1, -0.28), (1, 0.28), (-1, 0.28)],
    "arrow": [(-1, -0.22), (0.2, -0.22), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.22), (-1, 0.22)],
}  # fmt: skip


def _extent(shape: str, r: int, angle: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """(min, max) of x and of y over a shape drawn at (0, 0)."""
    if shape not in _OUTLINES:  # circle, ring, crescent: inside their circle
        return (-r, r), (-r, r)
    xs, ys = zip(*_polygon(_OUTLINES[shape], 0, 0, r, angle))
    return (min(xs), max(xs)), (min(ys), max(ys))


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: int, angle: float) -> None:
    """Draw one shape into a mask (255 = shape)."""
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, outline=255, width=max(2, round(r * 0.4)))
    elif shape == "crescent":
        draw.ellipse(box, fill=255)
        t = math.radians(angle)
        bx, by, br = cx + 0.55 * r * math.cos(t), cy + 0.55 * r * math.sin(t), 0.85 * r
        draw.ellipse((bx - br, by - br, bx + br, by + br), fill=0)  # the bite
    else:
        draw.polygon(_polygon(_OUTLINES[shape], cx, cy, r, angle), fill=255)


@dataclass(frozen=True)
class ShapesDataset:
    root: Path
    images_dir: Path
    pretrain: Path  # LLaVA JSON: <image> -> caption ("plain" template pretraining)
    finetune: Path  # LLaVA JSON: open and multiple-choice image questions (3 turns) + text-only chat
    heldout: Path  # LLaVA JSON, one question per record, with qtype, style, combination, choices/options
    text: Path  # JSONL {"text": ...}: text-only incremental pretraining
    manifest: Path
    params: dict[str, Any]
    counts: dict[str, int]

    @property
    def setting(self) -> Setting:
        return SETTINGS[self.params["setting"]]

    @classmethod
    def _at(cls, root: Path, params: dict[str, Any], counts: dict[str, int]) -> ShapesDataset:
        files = {key: root / name for key, name in _FILES.items()}
        return cls(root, root / "images", **files, manifest=root / MANIFEST, params=params, counts=counts)


def chance_levels(setting: Setting | str = "default") -> dict[str, float]:
    """Accuracy of guessing per question type in open-ended evaluation (held-out multiple choice has 4
    options: 0.25 for one pass, 0.25**4 for all four circular passes)."""
    s = SETTINGS[setting] if isinstance(setting, str) else setting
    return {qtype: 1 / len(s.choices(qtype)) for qtype in QTYPES}


def generate_shapes_dataset(
    out_dir: str | Path,
    *,
    n_train_images: int = 4000,
    n_heldout_images: int = 400,
    image_size: int = 64,
    seed: int = 0,
    blank: bool = False,
    setting: str = "default",
    mc_fraction: float = 0.5,
) -> ShapesDataset:
    """Write the dataset under out_dir, or return it as is if out_dir already holds one with these parameters.

    Deterministic: the same parameters give byte-identical files. The manifest is written last (atomically),
    so an interrupted run is regenerated rather than reused. Held-out images alternate between seen and
    unseen colour-shape combinations; each carries one open-ended and one multiple-choice question.
    """
    if n_train_images < 1 or n_heldout_images < 1:
        raise ValueError(
            f"need at least one train and one held-out image, got {n_train_images}/{n_heldout_images}"
        )
    if image_size < 32 or image_size % 2:
        raise ValueError(
            f"image_size must be even and >= 32 (shapes need room in a quadrant), got {image_size}"
        )
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose from {sorted(SETTINGS)}")
    if not 0 <= mc_fraction <= 1:
        raise ValueError(f"mc_fraction must be in [0, 1], got {mc_fraction}")
    s = SETTINGS[setting]
    root = Path(out_dir)
    params = {
        "format_version": FORMAT_VERSION,
        "setting": setting,
        "n_train_images": n_train_images,
        "n_heldout_images": n_heldout_images,
        "image_size": image_size,
        "seed": seed,
        "blank": blank,
        "mc_fraction": mc_fraction,
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

    unseen = unseen_combinations(s, seed)
    seen = [(c, sh) for c in s.colours for sh in s.shapes if (c, sh) not in unseen]
    drawn: set[ShapeImage] = set()
    rng = random.Random(f"shapes/{setting}/{seed}/train")
    plans = [_plan(i, rng, mc_fraction) for i in range(n_train_images)]
    train = list(_train_images(rng, plans, seen, image_size, drawn))
    hrng = random.Random(f"shapes/{setting}/{seed}/heldout")
    heldout = list(_heldout_images(hrng, n_heldout_images, seen, unseen, image_size, drawn))
    names = [f"{i:05d}.png" for i in range(n_total)]
    for name, spec in zip(names, [*train, *(h[0] for h in heldout)]):
        spec.render(image_size, s, blank).save(images_dir / name, format="PNG", compress_level=1)

    pretrain = [
        {"id": f"pretrain-{i:05d}", "image": names[i], "conversations": _turns([(IMAGE_TOKEN, x.caption(s))])}
        for i, x in enumerate(train)
    ]
    finetune, asked = _finetune_records(train, plans, names, s, random.Random(f"shapes/{setting}/{seed}/mc"))
    held = []
    # The answer's letter cycles per question type and combination, so no letter is a better guess for any.
    letter_turn: Counter[tuple[str, str]] = Counter()
    for i, (spec, combo, open_q, mc_q) in enumerate(heldout):
        image = names[n_train_images + i]
        question = hrng.choice(s.questions[open_q])
        held.append(_heldout_record(f"heldout-{i:05d}-open", image, spec, s, open_q, combo, question, None))
        letter = letter_turn[mc_q, combo] % 4
        letter_turn[mc_q, combo] += 1
        options = _options(hrng, s.choices(mc_q), spec.answer(mc_q, s), 4, letter=letter)
        question = hrng.choice(s.questions[mc_q])
        held.append(_heldout_record(f"heldout-{i:05d}-mc", image, spec, s, mc_q, combo, question, options))
    texts = [x.sentences(s) for x in train] + [f"{q} {a}." for q, a in s.text_chats]
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
        **{f"finetune_questions_{key}": n for key, n in sorted(asked.items())},
        "heldout_questions": len(held),
        "heldout_unseen_images": sum(h[1] == "unseen" for h in heldout),
        "text_lines": len(texts),
    }
    with atomic_path(root / MANIFEST) as tmp:
        _write_json(tmp, {"params": params, "counts": counts, "unseen_combinations": unseen})
    return ShapesDataset._at(root, params, counts)


def _heldout_record(
    rid: str,
    image: str,
    spec: ShapeImage,
    s: Setting,
    qtype: str,
    combo: str,
    question: str,
    options: list[str] | None,
) -> dict[str, Any]:
    answer = spec.answer(qtype, s)
    record: dict[str, Any] = {"id": rid, "image": image}
    if options is None:
        record["conversations"] = _turns([(f"{IMAGE_TOKEN}\n{question}", answer)])
        record.update(style="open", choices=list(s.choices(qtype)))
    else:
        letter = LETTERS[options.index(answer)]
        record["conversations"] = _turns([(f"{IMAGE_TOKEN}\n{mc_prompt(question, options)}", letter)])
        record.update(style="mc", question=question, options=options, answer_text=answer)
    record.update(qtype=qtype, combination=combo, colour=spec.colour, shape=spec.shape)
    return record


def corpus_texts(dataset: ShapesDataset) -> list[str]:
    """Every distinct text of the dataset (captions, questions, answers, sentences), in file order."""
    texts: list[str] = []
    for path in (dataset.pretrain, dataset.finetune, dataset.heldout):
        for record in json.loads(path.read_text(encoding="utf-8")):
            texts.extend(turn["value"] for turn in record["conversations"])
            texts.extend(record.get("options", []))
    with dataset.text.open(encoding="utf-8") as f:
        texts.extend(json.loads(line)["text"] for line in f)
    return list(dict.fromkeys(texts))


def vocab_words(setting: Setting | str = "default") -> tuple[str, ...]:
    """Every word the generated texts of a setting use (letters and digits)."""
    s = SETTINGS[setting] if isinstance(setting, str) else setting
    parts = [
        "a at the and there is are shape shapes it they",
        MC_INSTRUCTION,
        *LETTERS,
        *(q for qs in s.questions.values() for q in qs),
        *(c for qtype in QTYPES for c in s.choices(qtype)),
        *s.plurals.values(),
        *(q + " " + a for q, a in s.text_chats),
    ]
    return tuple(sorted(set(re.findall(r"[A-Za-z0-9']+", " ".join(parts)))))


def heldout_rows(dataset: ShapesDataset) -> list[dict[str, Any]]:
    """The held-out multiple-choice questions as MMBench rows: category = question type, l2-category = seen
    or unseen combination. The answer's letter cycles A-D, so no letter bias can pass."""
    rows = []
    records = json.loads(dataset.heldout.read_text(encoding="utf-8"))
    for record in (r for r in records if r["style"] == "mc"):
        with Image.open(dataset.images_dir / record["image"]) as image:
            pil = image.convert("RGB")
        rows.append(
            {
                "index": len(rows),
                "question": record["question"],
                "options": record["options"],
                "answer": record["conversations"][1]["value"],
                "category": record["qtype"],
                "l2-category": record["combination"],
                "image": pil,
            }
        )
    return rows


def load_shapes_dataset(root: str | Path) -> ShapesDataset:
    """The complete dataset generate_shapes_dataset wrote at root, with the parameters its manifest records."""
    dataset = _complete_dataset(Path(root), None)
    if dataset is None:
        raise FileNotFoundError(
            f"{root}: no complete shapes dataset (make one with python -m llava_ft.demo.prepare)"
        )
    return dataset


def _complete_dataset(root: Path, params: dict[str, Any] | None) -> ShapesDataset | None:
    """The dataset at root if its manifest records `params` (None: whatever parameters it records) and every
    file it lists is there."""
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    params = manifest.get("params") if params is None else params
    if not isinstance(params, dict) or manifest.get("params") != params or "counts" not in manifest:
        return None
    dataset = ShapesDataset._at(root, params, manifest["counts"])
    n_images = params["n_train_images"] + params["n_heldout_images"]
    files = [dataset.pretrain, dataset.finetune, dataset.heldout, dataset.text]
    files += [dataset.images_dir / f"{i:05d}.png" for i in range(n_images)]
    return dataset if all(f.is_file() for f in files) else None


def _sample_image(
    rng: random.Random, colour: str, shape: str, count: int, image_size: int, drawn: set[ShapeImage]
) -> ShapeImage:
    """A new random layout, distinct from every image drawn before (train and held-out never coincide)."""
    q = image_size // 2
    jitter = max(1, q // 16)
    while True:
        quadrants = tuple(sorted(rng.sample(range(4), count)))
        spec = ShapeImage(
            colour=colour,
            shape=shape,
            quadrants=quadrants,
            sizes=tuple(rng.randint(round(q * 0.3), round(q * 0.42)) for _ in quadrants),
            angles=tuple(round(rng.uniform(-ROTATION, ROTATION), 1) for _ in quadrants),
            offsets=tuple((rng.randint(-jitter, jitter), rng.randint(-jitter, jitter)) for _ in quadrants),
            background=_sample_background(rng),
            tint=(rng.randint(-20, 20), rng.randint(-20, 20), rng.randint(-20, 20)),
            noise_seed=rng.getrandbits(32),
        )
        if spec not in drawn:
            drawn.add(spec)
            return spec


def _plan(i: int, rng: random.Random, mc_fraction: float) -> list[tuple[str, bool]]:
    """The questions asked about train image i: (type, multiple choice?), every question that fits the image in
    shuffled order, as LLaVA-665K asks several questions about one image (each answer trains on the same image
    tokens, so one image teaches more). One image in four is asked where its shape is; it holds one shape, so it
    is not asked its count (the answer would always be one)."""
    types = ["colour", "shape", "position" if i % 4 == 3 else "count"]
    rng.shuffle(types)
    return [(t, rng.random() < mc_fraction) for t in types]


def _train_images(
    rng: random.Random,
    plans: list[list[tuple[str, bool]]],
    combos: list[tuple[str, str]],
    image_size: int,
    drawn: set[ShapeImage],
) -> Iterator[ShapeImage]:
    """Seen combinations in shuffled rounds, so each appears equally often; an image asked where its shape
    is holds a single shape, the others 1-4 (uniform, so count answers are balanced)."""
    combos = list(combos)
    for i, plan in enumerate(plans):
        if i % len(combos) == 0:
            rng.shuffle(combos)
        colour, shape = combos[i % len(combos)]
        count = 1 if any(t == "position" for t, _ in plan) else rng.randint(1, 4)
        yield _sample_image(rng, colour, shape, count, image_size, drawn)


def _heldout_images(
    rng: random.Random,
    n: int,
    seen: list[tuple[str, str]],
    unseen: list[tuple[str, str]],
    image_size: int,
    drawn: set[ShapeImage],
) -> Iterator[tuple[ShapeImage, str, str, str]]:
    """(image, seen|unseen, open question type, multiple-choice question type); the two types differ and
    each rotates through every type."""
    for i in range(n):
        combo = "unseen" if i % 2 else "seen"
        k = i // 2
        open_q, mc_q = QTYPES[k % 4], QTYPES[(k + 1 + (k // 4) % 3) % 4]
        colour, shape = rng.choice(unseen if combo == "unseen" else seen)
        count = 1 if "position" in (open_q, mc_q) else rng.randint(1, 4)
        yield _sample_image(rng, colour, shape, count, image_size, drawn), combo, open_q, mc_q


def _options(rng: random.Random, choices: tuple[str, ...], answer: str, n: int, letter: int) -> list[str]:
    """n options holding the answer at index `letter`, the distractors drawn from the other choices."""
    options = rng.sample([c for c in choices if c != answer], min(n, len(choices)) - 1)
    options.insert(letter, answer)
    return options


def _finetune_records(
    train: list[ShapeImage],
    plans: list[list[tuple[str, bool]]],
    names: list[str],
    s: Setting,
    rng: random.Random,
) -> tuple[list[dict], Counter[str]]:
    """One record per train image (its planned questions), a text-only chat after every 20 images.
    Multiple-choice questions have 2-4 options; the answer's letter cycles through the letters there are,
    so each letter is the answer equally often."""
    records: list[dict] = []
    asked: Counter[str] = Counter()
    letter_turn: Counter[int] = Counter()
    for i, (spec, plan) in enumerate(zip(train, plans)):
        pairs = []
        for qtype, mc in plan:
            question = rng.choice(s.questions[qtype])
            answer = spec.answer(qtype, s)
            if mc:
                n = rng.choice((2, 3, 4, 4))
                letter = letter_turn[n] % n
                letter_turn[n] += 1
                options = _options(rng, s.choices(qtype), answer, n, letter)
                pairs.append((mc_prompt(question, options), LETTERS[letter]))
            else:
                pairs.append((question, answer))
            asked[f"{qtype}_{'mc' if mc else 'open'}"] += 1
        pairs[0] = (f"{IMAGE_TOKEN}\n{pairs[0][0]}", pairs[0][1])
        records.append({"id": f"finetune-{i:05d}", "image": names[i], "conversations": _turns(pairs)})
        if (i + 1) % 20 == 0:
            k = (i + 1) // 20 - 1
            question, answer = s.text_chats[k % len(s.text_chats)]
            records.append({"id": f"text-{k:05d}", "conversations": _turns([(question, answer)])})
    return records, asked


def _turns(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [turn for q, a in pairs for turn in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
