"""Make the embedded tiny default once: synthetic shapes data, a tiny tokenizer, a tiny InternLM2-layout LLM
and a tiny open_clip tower, all written in the real on-disk formats the real recipe reads.

    python -m llava_ft.demo.prepare [--root data/demo] [--blank]

Idempotent: each part is skipped when a complete copy with the same parameters is already there.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from llava_ft.demo.shapes import ShapesDataset, corpus_texts, generate_shapes_dataset, heldout_rows
from llava_ft.demo.tokenizer import build_tiny_tokenizer
from llava_ft.eval.mmbench import write_mmbench_tsv
from llava_ft.files import atomic_write_text
from llava_ft.testing.tiny_llm import write_tiny_internlm2
from llava_ft.testing.tiny_vision import write_tiny_open_clip

log = logging.getLogger("llava_ft")

# Big enough to learn the task, small enough to train on 2 CPU cores.
LLM_SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}
CLIP_SHAPE = {"image_size": 64, "patch_size": 8, "width": 128, "layers": 2, "heads": 4}
N_TRAIN_IMAGES = 4000
N_HELDOUT_IMAGES = 400


@dataclass
class TinyAssets:
    data: ShapesDataset
    llm: Path
    clip: Path


def _done(folder: Path, params: dict) -> bool:
    try:
        return json.loads((folder / ".llava_ft_made.json").read_text()) == params
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def _mark(folder: Path, params: dict) -> None:
    atomic_write_text(folder / ".llava_ft_made.json", json.dumps(params))


def prepare(root: str | Path = "data/demo", *, blank: bool = False) -> TinyAssets:
    root = Path(root)
    data = generate_shapes_dataset(
        root / "shapes", n_train_images=N_TRAIN_IMAGES, n_heldout_images=N_HELDOUT_IMAGES, seed=0
    )
    if blank:  # the control: the same records over background-only images
        generate_shapes_dataset(
            root / "shapes_blank",
            n_train_images=N_TRAIN_IMAGES,
            n_heldout_images=N_HELDOUT_IMAGES,
            seed=0,
            blank=True,
        )

    llm = root / "models" / "llm"
    params = {"llm": LLM_SHAPE, "data": data.params | {"blank": False}, "version": 1}
    if not _done(llm, params):
        tok = build_tiny_tokenizer(root / "models" / "tokenizer", corpus_texts(data))
        write_tiny_internlm2(llm, tokenizer_model=tok, **LLM_SHAPE)
        _mark(llm, params)
        log.info("tiny InternLM2-layout LLM written to %s", llm)

    tsv = data.root / "heldout_mmbench.tsv"
    if not tsv.is_file() or tsv.stat().st_mtime < data.manifest.stat().st_mtime:
        # The held-out split as an MMBench file (4 options, circular rotations), for eval/mmbench.py.
        write_mmbench_tsv(heldout_rows(data), tsv, circular=True)
    vqa = data.root / "heldout_vqa.jsonl"
    if not vqa.is_file() or vqa.stat().st_mtime < data.manifest.stat().st_mtime:
        # ...and in VQA form (open-ended, the way the tiny model was trained), for eval/vqa.py.
        write_heldout_vqa(data, vqa)

    clip = root / "models" / "clip"
    if not _done(clip, CLIP_SHAPE):
        write_tiny_open_clip(clip, **CLIP_SHAPE)
        _mark(clip, CLIP_SHAPE)
        log.info("tiny open_clip tower written to %s", clip)
    return TinyAssets(data, llm, clip)


def write_heldout_vqa(data: ShapesDataset, path: Path) -> Path:
    """The held-out split as VQA records (the one answer given ten times, as VQAv2's ten human answers)."""
    records = json.loads(data.heldout.read_text())
    lines = [
        {
            "question_id": r["id"],
            "image": r["image"],
            "question": r["conversations"][0]["value"].removeprefix("<image>\n"),
            "answers": [r["conversations"][1]["value"]] * 10,
            "answer_type": r["qtype"],
        }
        for r in records
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="data/demo")
    parser.add_argument("--blank", action="store_true", help="also write the blank-image control dataset")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    assets = prepare(args.root, blank=args.blank)
    print(f"tiny assets: data {assets.data.root}, llm {assets.llm}, clip {assets.clip}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
