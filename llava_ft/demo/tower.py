"""The tiny tower learns to see before LLaVA uses it, as a real CLIP tower comes pretrained:

    python -m llava_ft.demo.tower [--data data/demo/shapes] [--clip data/demo/models/clip] [--out work_dirs/tiny/tower]

The objective is multi-label tagging of caption words (CatLIP, Mehta et al. 2024: classification on image-text
data): the words of each image's pretrain caption are its tags, read from the tower's LLaVA feature layer
through a small head (an MLP on every image token, then the maximum over tokens, so one token that sees a
shape is enough). The head is thrown away. Half of each batch is shown in greyscale with its colour words left out of
the loss: the tower then learns shapes from their outlines, not from the colours they came with in training, so
a colour-shape pair never seen in training still reads as its shape.

The output is an open_clip `local-dir:` folder (the input's config, its weights with the trained image tower),
written atomically, with `tower.json`: the settings and the tags' held-out accuracy (colour and shape, on seen
and unseen pairs), a check on the tower alone before any LLM reads it.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from llava_ft.config import VisionSection, load_config
from llava_ft.data.images import load_image
from llava_ft.demo.shapes import ShapesDataset, load_shapes_dataset
from llava_ft.files import atomic_dir
from llava_ft.model.vision import LOCAL_DIR, build_vision_tower
from llava_ft.testing.tiny_vision import OPEN_CLIP_WEIGHTS

log = logging.getLogger("llava_ft")

SUMMARY = "tower.json"
# The LLaVA stages' tower settings (feature layer, pooling): the tokens this stage trains are the ones they read.
RECIPE = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "pretrain.yaml"
# Luminance weights (ITU-R 601, as PIL's "L" mode).
_LUMA = (0.299, 0.587, 0.114)


@dataclass
class TowerTraining:
    """How the tower is pretrained."""

    steps: int = 800
    """Optimizer steps (batches drawn with replacement from the pretrain images)."""
    batch_size: int = 64
    """Images per step."""
    lr: float = 2.0e-3
    """Peak learning rate (AdamW, weight decay 0.01): linear warm-up over 5% of the steps, then cosine decay."""
    grey_fraction: float = 0.5
    """Share of each batch shown in greyscale, its colour words not trained."""
    head_width: int = 256
    """Width of the tag head's MLP (thrown away after training)."""
    seed: int = 0
    """Seeds the head's initialisation, the batches and which images turn grey."""


def caption_words(text: str, singular: dict[str, str] | None = None) -> set[str]:
    """The tags of one caption: its words, plurals as their singular (one tag per shape, whatever the count)."""
    singular = singular or {}
    return {singular.get(w, w) for w in re.findall(r"[a-z0-9]+", text.lower())}


class TagHead(nn.Module):
    """Image tokens -> an MLP on each -> max over tokens -> one logit per tag."""

    def __init__(self, width: int, hidden: int, n_tags: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.out = nn.Linear(hidden, n_tags)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(tokens).amax(1))


def greyscale(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Normalised [B, 3, H, W] pixels -> the same images in grey, normalised again."""
    raw = pixels * std + mean
    luma = (raw * torch.tensor(_LUMA, dtype=raw.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return (luma.expand_as(raw) - mean) / std


def pretrain_tower(
    vision: VisionSection, data: ShapesDataset, out: str | Path, train: TowerTraining | None = None
) -> dict[str, Any]:
    """Train `vision`'s image tower (an open_clip `local-dir:` folder) on `data`'s pretrain captions and write
    it to `out`; returns what `tower.json` holds."""
    train = train or TowerTraining()
    if vision.backend != "open_clip" or not vision.model.startswith(LOCAL_DIR):
        raise ValueError(
            f"the tiny tower is an open_clip {LOCAL_DIR} folder, got {vision.backend} {vision.model}"
        )
    source = Path(vision.model.removeprefix(LOCAL_DIR))
    start = time.time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train.seed)
        tower = build_vision_tower(vision)
        records = json.loads(data.pretrain.read_text())
        captions = [r["conversations"][-1]["value"] for r in records]
        singular = {plural: shape for shape, plural in data.setting.plurals.items()}
        words = [caption_words(c, singular) for c in captions]
        tags = sorted(set().union(*words))
        pixels = _pixels(tower, data, [r["image"] for r in records])
        targets = torch.tensor([[t in w for t in tags] for w in words], dtype=torch.float32)
        colours = torch.tensor([t in data.setting.colours for t in tags])
        head = TagHead(tower.hidden_size, train.head_width, len(tags))
        losses = _fit(tower, head, pixels, targets, colours, train)
        heldout = tag_accuracy(tower, head, tags, data)
    summary = {
        "source": str(source),
        "feature_layer": vision.feature_layer,
        "pool": vision.pool,
        "training": asdict(train),
        "tags": tags,
        "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4),
        "heldout_tag_accuracy": heldout,
        "wall_s": round(time.time() - start, 1),
    }

    def write(folder: Path) -> None:
        shutil.copy(source / "open_clip_config.json", folder / "open_clip_config.json")
        weights = load_file(str(source / OPEN_CLIP_WEIGHTS))
        weights.update({f"visual.{k}": v.contiguous() for k, v in tower.model.state_dict().items()})
        save_file(weights, str(folder / OPEN_CLIP_WEIGHTS))
        (folder / SUMMARY).write_text(json.dumps(summary, indent=1))

    atomic_dir(Path(out), write)
    return summary


def _pixels(tower: nn.Module, data: ShapesDataset, names: list[str]) -> torch.Tensor:
    return torch.stack([tower.processor(load_image(data.images_dir / n)) for n in names])


def _fit(
    tower: nn.Module,
    head: TagHead,
    pixels: torch.Tensor,
    targets: torch.Tensor,
    colours: torch.Tensor,
    train: TowerTraining,
) -> list[float]:
    processor = tower.processor
    mean, std = (
        torch.tensor(v, dtype=pixels.dtype).view(1, 3, 1, 1) for v in (processor.mean, processor.std)
    )
    params = [p for p in tower.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, max(1, train.steps // 20), train.steps)
    tower.train()
    losses = []
    for step in range(train.steps):
        idx = torch.randint(0, len(pixels), (train.batch_size,))
        x, y = pixels[idx], targets[idx]
        grey = torch.rand(len(idx)) < train.grey_fraction
        x = torch.where(grey.view(-1, 1, 1, 1), greyscale(x, mean, std), x)
        weight = torch.where(grey.view(-1, 1) & colours.view(1, -1), 0.0, 1.0)
        loss = nn.functional.binary_cross_entropy_with_logits(head(tower(x)), y, weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == train.steps - 1:
            log.info("tower step %d/%d: tag loss %.4f", step + 1, train.steps, losses[-1])
    tower.eval()
    return losses


@torch.no_grad()
def tag_accuracy(tower: nn.Module, head: TagHead, tags: list[str], data: ShapesDataset) -> dict[str, float]:
    """Held-out images: is the highest-scoring colour tag the image's colour, and the highest-scoring shape tag
    its shape? Per seen and unseen colour-shape pair."""
    s = data.setting
    images = {r["image"]: r for r in json.loads(data.heldout.read_text())}
    rows = list(images.values())
    logits = torch.cat(
        [
            head(tower(_pixels(tower, data, [r["image"] for r in rows[i : i + 200]])))
            for i in range(0, len(rows), 200)
        ]
    )

    def best(names: tuple[str, ...]) -> list[str]:
        """Per image, the name whose tag scores highest (a name never tagged in training cannot win)."""
        missing = torch.full((len(rows),), -torch.inf)
        scores = torch.stack([logits[:, tags.index(n)] if n in tags else missing for n in names], 1)
        return [names[i] for i in scores.argmax(1).tolist()]

    colour, shape = best(tuple(s.colours)), best(s.shapes)
    result = {}
    for combination in ("seen", "unseen"):
        pick = [i for i, r in enumerate(rows) if r.get("combination", "seen") == combination]
        if pick:
            result[f"colour/{combination}"] = round(
                sum(colour[i] == rows[i]["colour"] for i in pick) / len(pick), 3
            )
            result[f"shape/{combination}"] = round(
                sum(shape[i] == rows[i]["shape"] for i in pick) / len(pick), 3
            )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default="data/demo/shapes", help="a dataset written by llava_ft.demo.prepare"
    )
    parser.add_argument("--clip", default="data/demo/models/clip", help="the random tiny tower to start from")
    parser.add_argument("--out", default="work_dirs/tiny/tower")
    parser.add_argument(
        "--feature-layer", type=int, help="the block LLaVA reads (default: the tiny recipe's)"
    )
    parser.add_argument("--pool", type=int, help="pooling of the patch grid (default: the tiny recipe's)")
    parser.add_argument("--steps", type=int, default=TowerTraining.steps)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    reads = load_config(RECIPE).model.vision
    layer = reads.feature_layer if args.feature_layer is None else args.feature_layer
    pool = reads.pool if args.pool is None else args.pool
    vision = VisionSection(backend="open_clip", model=LOCAL_DIR + args.clip, feature_layer=layer, pool=pool)
    summary = pretrain_tower(
        vision, load_shapes_dataset(args.data), args.out, TowerTraining(steps=args.steps)
    )
    print(
        f"tower written to {args.out} in {summary['wall_s']}s; held-out tags: {summary['heldout_tag_accuracy']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
