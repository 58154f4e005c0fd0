"""Make the embedded tiny default once: synthetic shapes data, a tiny tokenizer, a tiny InternLM2-layout LLM
and a tiny open_clip tower, all written in the real on-disk formats the real recipe reads.

    python -m llava_ft.demo.prepare [--root data/demo] [--blank] [--seed 0] [--setting default]

Idempotent: each part is skipped when a complete copy with the same parameters is already there. The data
goes to ROOT/shapes (ROOT/shapes_blank for the control); another seed or setting goes to
ROOT/shapes_<setting>_<seed>, which the same configs/tiny recipe reads through `--data.train` overrides.
The tokenizer knows the words of every setting, so one set of tiny checkpoints serves them all.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from llava_ft.demo.shapes import (
    SETTINGS,
    ShapesDataset,
    corpus_texts,
    generate_shapes_dataset,
    heldout_rows,
    vocab_words,
)
from llava_ft.demo.tokenizer import build_tiny_tokenizer
from llava_ft.eval.mmbench import write_mmbench_tsv
from llava_ft.files import atomic_write_text
from llava_ft.testing.tiny_llm import write_tiny_internlm2
from llava_ft.testing.tiny_vision import write_tiny_open_clip

log = logging.getLogger("llava_ft")

# Big enough to learn the task, small enough to train on 2 CPU cores. Many narrow heads: reading several facts
# off 16 image tokens at once (colour, shape, count) and matching an answer to its lettered option need heads
# more than width.
LLM_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_layers": 2,
    "num_heads": 16,
    "num_kv_heads": 16,
}
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


def data_dir(root: str | Path, setting: str = "default", seed: int = 0, blank: bool = False) -> Path:
    """Where prepare() writes a dataset: the default one at ROOT/shapes, others beside it."""
    name = "shapes" if (setting, seed) == ("default", 0) else f"shapes_{setting}_{seed}"
    return Path(root) / (name + ("_blank" if blank else ""))


def prepare(
    root: str | Path = "data/demo", *, blank: bool = False, seed: int = 0, setting: str = "default"
) -> TinyAssets:
    root = Path(root)
    sizes = {"n_train_images": N_TRAIN_IMAGES, "n_heldout_images": N_HELDOUT_IMAGES, "seed": seed}
    data = generate_shapes_dataset(data_dir(root, setting, seed), setting=setting, **sizes)
    write_eval_files(data)
    if blank:  # the control: the same records over background-only images
        write_eval_files(
            generate_shapes_dataset(
                data_dir(root, setting, seed, blank=True), setting=setting, blank=True, **sizes
            )
        )

    llm = root / "models" / "llm"
    params = {"llm": LLM_SHAPE, "words": sorted({w for s in SETTINGS for w in vocab_words(s)}), "version": 2}
    if not _done(llm, params):
        # Every setting's words and this dataset's texts: the same checkpoints serve any setting and seed.
        texts = [*params["words"], *corpus_texts(data)]
        tok = build_tiny_tokenizer(root / "models" / "tokenizer", texts)
        write_tiny_internlm2(llm, tokenizer_model=tok, **LLM_SHAPE)
        _mark(llm, params)
        log.info("tiny InternLM2-layout LLM written to %s", llm)

    clip = root / "models" / "clip"
    if not _done(clip, CLIP_SHAPE):
        write_tiny_open_clip(clip, **CLIP_SHAPE)
        _mark(clip, CLIP_SHAPE)
        log.info("tiny open_clip tower written to %s", clip)
    return TinyAssets(data, llm, clip)


def write_eval_files(data: ShapesDataset) -> None:
    """The held-out split as an MMBench file (multiple choice, 4 options; circular rotations added by the
    writer) and as VQA records (open-ended), for `llava-ft eval mmbench|vqa`."""
    tsv = data.root / "heldout_mmbench.tsv"
    if not tsv.is_file() or tsv.stat().st_mtime < data.manifest.stat().st_mtime:
        write_mmbench_tsv(heldout_rows(data), tsv, circular=True)
    vqa = data.root / "heldout_vqa.jsonl"
    if not vqa.is_file() or vqa.stat().st_mtime < data.manifest.stat().st_mtime:
        write_heldout_vqa(data, vqa)


def write_heldout_vqa(data: ShapesDataset, path: Path) -> Path:
    """The open-ended held-out questions as VQA records (the one answer given ten times, as VQAv2's ten
    human answers); answer_type is the question type, with the combination (seen or unseen) beside it."""
    records = [r for r in json.loads(data.heldout.read_text()) if r.get("style", "open") == "open"]
    lines = [
        {
            "question_id": r["id"],
            "image": r["image"],
            "question": r["conversations"][0]["value"].removeprefix("<image>\n"),
            "answers": [r["conversations"][1]["value"]] * 10,
            "answer_type": r["qtype"],
            "combination": r.get("combination", "seen"),
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
    parser.add_argument("--seed", type=int, default=0, help="data seed (images, questions, unseen pairs)")
    parser.add_argument(
        "--setting", default="default", choices=sorted(SETTINGS), help="colours, shapes, words"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    assets = prepare(args.root, blank=args.blank, seed=args.seed, setting=args.setting)
    print(f"tiny assets: data {assets.data.root}, llm {assets.llm}, clip {assets.clip}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
