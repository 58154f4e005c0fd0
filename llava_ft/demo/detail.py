"""Synthetic detail data for the tiling demo: a large image whose lattice cells hold small marks of one shape,
which the questions ask. Shrunk whole to the tiny tower's input (4x smaller), each mark is a blur of 2-3 pixels
that has lost its outline (every shape carries the same ink, so darkness alone does not tell them apart); cut
into tower-sized tiles (any-resolution), the marks keep their outlines. Captions name the marks' colour and shape;
questions ask their shape, open-ended or lettered multiple choice (LLaVA's MMBench prompt), as the shapes demo
asks them. `blank=True` writes the same records over mark-free images: the control that must stay near chance.
The folder layout is the shapes demo's, so its evaluation files and scoring apply unchanged.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from llava_ft.constants import IMAGE_TOKEN
from llava_ft.demo.shapes import (
    LETTERS,
    MC_INSTRUCTION,
    ROTATION,
    _background,
    _draw,
    _options,
    _pale,
    _turns,
    _write_json,
    mc_prompt,
)
from llava_ft.files import atomic_path

# Bump when the generated content changes, so cached datasets written by older code are regenerated.
FORMAT_VERSION = 1

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (215, 40, 40),
    "blue": (40, 80, 215),
    "green": (40, 160, 60),
    "purple": (145, 60, 190),
}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
QUESTIONS = (
    "What shape are the small marks?",
    "Which shape are the marks?",
    "Name the shape of the marks.",
)
QTYPE = "shape"
# A circle mark's radius as a fraction of the image side: 3.5-4.5 px at 256 px, about 1 px once shrunk to
# 64 px; the other shapes are drawn larger, to the circle's area (AREA: a shape's area at radius 1).
RADIUS = (0.0137, 0.0176)
AREA = {"circle": math.pi, "square": 1.6**2, "triangle": 1.9 * 1.75 / 2, "cross": 2 * 2 * 0.6 - 0.6**2}
# The marks sit in the cells of a CELLS x CELLS lattice (16-px cells at 256 px: one tower patch each once the
# image is tiled, the layout of printed symbols), a random FILL of the cells holding one, jittered a pixel.
CELLS = 16
FILL = (0.5, 0.9)
FILES = {"pretrain": "pretrain.json", "finetune": "finetune.json", "heldout": "heldout.json"}
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class DetailImage:
    """What one image shows; it is rendered from this alone."""

    shape: str
    colour: str
    marks: tuple[
        tuple[float, float, float, float], ...
    ]  # (x, y, radius, angle) of each mark, in pixels, degrees
    background: tuple[Any, ...]
    tint: tuple[int, int, int]
    noise_seed: int

    def caption(self) -> str:
        return f"small {self.colour} {PLURALS[self.shape]}"

    def render(self, image_size: int, blank: bool = False) -> Image.Image:
        image = _background(self.background, image_size)
        if not blank:
            mask = Image.new("L", (image_size, image_size), 0)
            draw = ImageDraw.Draw(mask)
            for x, y, radius, angle in self.marks:
                _draw(draw, self.shape, x, y, radius, angle)
            fill = tuple(min(255, max(0, c + t)) for c, t in zip(COLOURS[self.colour], self.tint))
            image.paste(fill, (0, 0), mask)
        # Sensor noise on every image, blank ones too; the "noise" background is stronger.
        sigma = self.background[2] if self.background[0] == "noise" else 3.0
        noise = np.random.default_rng(self.noise_seed).normal(0, sigma, (image_size, image_size, 1))
        pixels = np.asarray(image, dtype=np.float32) + noise
        return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


@dataclass(frozen=True)
class DetailDataset:
    """A generated folder, laid out as the shapes demo's (prepare.write_eval_files reads it)."""

    root: Path
    images_dir: Path
    pretrain: Path
    finetune: Path
    heldout: Path
    manifest: Path
    params: dict[str, Any]
    counts: dict[str, int]

    @classmethod
    def _at(cls, root: Path, params: dict[str, Any], counts: dict[str, int]) -> DetailDataset:
        files = {key: root / name for key, name in FILES.items()}
        return cls(root, root / "images", **files, manifest=root / MANIFEST, params=params, counts=counts)


def vocab_words() -> tuple[str, ...]:
    """Every word the generated texts use."""
    text = " ".join(["small", MC_INSTRUCTION, *LETTERS, *QUESTIONS, *SHAPES, *COLOURS, *PLURALS.values()])
    return tuple(sorted(set(text.replace("?", " ").replace(".", " ").split())))


def chance() -> float:
    """Accuracy of guessing a shape (open-ended); held-out multiple choice offers every shape."""
    return 1 / len(SHAPES)


def generate_detail_dataset(
    out_dir: str | Path,
    *,
    n_train_images: int = 2000,
    n_heldout_images: int = 200,
    image_size: int = 256,
    seed: int = 0,
    blank: bool = False,
    mc_fraction: float = 0.5,
) -> DetailDataset:
    """Write the dataset under out_dir, or return it as is if out_dir already holds one with these parameters.

    Deterministic: the same parameters give byte-identical files; the manifest is written last, so an
    interrupted run is regenerated. Shapes rotate through the images, so each answer is as frequent; every
    held-out image differs from every train image and carries one open-ended and one multiple-choice question.
    """
    if n_train_images < 1 or n_heldout_images < 1:
        raise ValueError(
            f"need at least one train and one held-out image, got {n_train_images}/{n_heldout_images}"
        )
    if image_size < 128 or image_size % 2:
        raise ValueError(f"image_size must be even and >= 128 (a mark of a few pixels), got {image_size}")
    if not 0 <= mc_fraction <= 1:
        raise ValueError(f"mc_fraction must be in [0, 1], got {mc_fraction}")
    root = Path(out_dir)
    params = {
        "format_version": FORMAT_VERSION,
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

    (root / MANIFEST).unlink(missing_ok=True)
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    n_total = n_train_images + n_heldout_images
    for stale in images_dir.glob("*.png"):  # left over from a larger dataset in the same folder
        if not stale.stem.isdigit() or int(stale.stem) >= n_total:
            stale.unlink()

    rng = random.Random(f"detail/{seed}")
    drawn: set[DetailImage] = set()
    specs = [_sample_image(rng, SHAPES[i % len(SHAPES)], image_size, drawn) for i in range(n_total)]
    names = [f"{i:05d}.png" for i in range(n_total)]
    for name, spec in zip(names, specs):
        spec.render(image_size, blank).save(images_dir / name, format="PNG", compress_level=1)

    train, heldout = specs[:n_train_images], specs[n_train_images:]
    pretrain = [
        {"id": f"pretrain-{i:05d}", "image": names[i], "conversations": _turns([(IMAGE_TOKEN, x.caption())])}
        for i, x in enumerate(train)
    ]
    qrng = random.Random(f"detail/{seed}/questions")
    finetune = []
    letter_turn: Counter[int] = Counter()
    n_mc = 0
    for i, spec in enumerate(train):
        question = qrng.choice(QUESTIONS)
        if qrng.random() < mc_fraction:
            n = qrng.choice((2, 3, 4, 4))
            letter = letter_turn[n] % n  # each letter the answer equally often
            letter_turn[n] += 1
            options = _options(qrng, SHAPES, spec.shape, n, letter)
            pair = (mc_prompt(question, options), LETTERS[letter])
            n_mc += 1
        else:
            pair = (question, spec.shape)
        turns = _turns([(f"{IMAGE_TOKEN}\n{pair[0]}", pair[1])])
        finetune.append({"id": f"finetune-{i:05d}", "image": names[i], "conversations": turns})
    held = []
    for i, spec in enumerate(heldout):
        image = names[n_train_images + i]
        held.append(_heldout_record(f"heldout-{i:05d}-open", image, spec, qrng.choice(QUESTIONS), None))
        options = _options(qrng, SHAPES, spec.shape, len(SHAPES), letter=i % len(SHAPES))
        held.append(_heldout_record(f"heldout-{i:05d}-mc", image, spec, qrng.choice(QUESTIONS), options))
    _write_json(root / FILES["pretrain"], pretrain)
    _write_json(root / FILES["finetune"], finetune)
    _write_json(root / FILES["heldout"], held)
    counts = {
        "train_images": n_train_images,
        "heldout_images": n_heldout_images,
        "pretrain_records": len(pretrain),
        "finetune_records": len(finetune),
        "finetune_mc": n_mc,
        "heldout_questions": len(held),
    }
    with atomic_path(root / MANIFEST) as tmp:
        _write_json(tmp, {"params": params, "counts": counts})
    return DetailDataset._at(root, params, counts)


def _heldout_record(
    rid: str, image: str, spec: DetailImage, question: str, options: list[str] | None
) -> dict[str, Any]:
    """A held-out question in the shapes demo's schema (one question type; every combination seen)."""
    record: dict[str, Any] = {"id": rid, "image": image}
    if options is None:
        record["conversations"] = _turns([(f"{IMAGE_TOKEN}\n{question}", spec.shape)])
        record.update(style="open", choices=list(SHAPES))
    else:
        letter = LETTERS[options.index(spec.shape)]
        record["conversations"] = _turns([(f"{IMAGE_TOKEN}\n{mc_prompt(question, options)}", letter)])
        record.update(style="mc", question=question, options=options, answer_text=spec.shape)
    record.update(qtype=QTYPE, combination="seen", colour=spec.colour, shape=spec.shape)
    return record


def corpus_texts(dataset: DetailDataset) -> list[str]:
    """Every distinct text of the dataset (captions, questions, answers, options), in file order."""
    texts: list[str] = []
    for path in (dataset.pretrain, dataset.finetune, dataset.heldout):
        for record in json.loads(path.read_text(encoding="utf-8")):
            texts.extend(turn["value"] for turn in record["conversations"])
            texts.extend(record.get("options", []))
    return list(dict.fromkeys(texts))


def _sample_image(rng: random.Random, shape: str, image_size: int, drawn: set[DetailImage]) -> DetailImage:
    """A new random image: marks of one shape and colour in some cells of the lattice, each its own size and
    turn."""
    scale = math.sqrt(AREA["circle"] / AREA[shape])  # every shape as much ink as a circle of the same radius
    low, high = (f * image_size * scale for f in RADIUS)
    cell = image_size / CELLS
    while True:
        cells = range(CELLS * CELLS)
        chosen = sorted(rng.sample(cells, round(rng.uniform(*FILL) * len(cells))))
        marks = tuple(
            (
                round((k % CELLS + 0.5) * cell + rng.uniform(-1, 1), 1),
                round((k // CELLS + 0.5) * cell + rng.uniform(-1, 1), 1),
                round(rng.uniform(low, high), 1),
                round(rng.uniform(-ROTATION, ROTATION), 1),
            )
            for k in chosen
        )
        # A flat pale colour: the marks are the image's only structure, which the tiny tower learns fastest.
        background = ("flat", _pale(rng))
        spec = DetailImage(
            shape=shape,
            colour=rng.choice(sorted(COLOURS)),
            marks=marks,
            background=background,
            tint=(rng.randint(-20, 20), rng.randint(-20, 20), rng.randint(-20, 20)),
            noise_seed=rng.getrandbits(32),
        )
        if spec not in drawn:
            drawn.add(spec)
            return spec


def _complete_dataset(root: Path, params: dict[str, Any]) -> DetailDataset | None:
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if manifest.get("params") != params or "counts" not in manifest:
        return None
    dataset = DetailDataset._at(root, params, manifest["counts"])
    n_images = params["n_train_images"] + params["n_heldout_images"]
    files = [dataset.pretrain, dataset.finetune, dataset.heldout]
    files += [dataset.images_dir / f"{i:05d}.png" for i in range(n_images)]
    return dataset if all(f.is_file() for f in files) else None
