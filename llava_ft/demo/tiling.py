"""Does tiling pay on the tiny default? The same two-stage recipe (configs/tiny_tiling) trained twice on the
detail task (llava_ft.demo.detail: the shape of small marks in a 256-px image), at fixed resolution and with
any-resolution tiling, plus the blank-image control, then the held-out accuracies side by side:

    python -m llava_ft.demo.tiling [--root data/demo/tiling] [--out work_dirs/tiny_tiling] [--check]

The two runs differ by one override, fixed being `--model.vision.anyres null`, and train for the same steps.
Each stage is `llava-ft train configs/tiny_tiling/<stage>.yaml` in this process (the command is printed before
it runs). The control repeats the any-resolution stage 2 on mark-free images; whatever it scores above chance
could only come from the questions' text. Scores come from `llava-ft eval vqa`'s code (open-ended), with 95% Wilson intervals.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_ft.cli.main import main as llava_ft
from llava_ft.demo import evaluate
from llava_ft.demo.detail import DetailDataset, corpus_texts, generate_detail_dataset, vocab_words
from llava_ft.demo.prepare import write_eval_files
from llava_ft.demo.run import Clock, flag
from llava_ft.demo.tokenizer import build_tiny_tokenizer
from llava_ft.eval.report import markdown_table
from llava_ft.eval.vqa import run_vqa
from llava_ft.files import atomic_write_text
from llava_ft.testing.tiny_llm import write_tiny_internlm2
from llava_ft.testing.tiny_vision import write_tiny_open_clip

log = logging.getLogger("llava_ft")

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "tiny_tiling"
# A 64-px tower with 16-px patches: 16 tokens per view, so a 4x4 tiling costs 288 tokens, not 1000+. Tower and
# LLM are half the shapes demo's width: 17 views and 288 image tokens a sample on 2 CPU cores, one-word answers.
CLIP_SHAPE = {"image_size": 64, "patch_size": 16, "width": 64, "layers": 3, "heads": 2}
LLM_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}
N_TRAIN_IMAGES = 1000
N_HELDOUT_IMAGES = 200
IMAGE_SIZE = 256
RUNS = ("fixed", "anyres", "blank")
# What --check asks: tiling far above fixed resolution, which stays near chance as the control does.
TARGETS = {"anyres_open_min": 0.8, "fixed_open_max": 0.5, "gain_min": 0.3, "blank_open_from_chance_max": 0.1}


@dataclass
class TilingAssets:
    data: DetailDataset
    blank: DetailDataset
    llm: Path
    clip: Path


def _made(folder: Path, params: dict) -> bool:
    try:
        return json.loads((folder / ".llava_ft_made.json").read_text()) == params
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def prepare(root: str | Path = "data/demo/tiling", *, seed: int = 0) -> TilingAssets:
    """Data (real and blank), a tokenizer of its words, a tiny random LLM and tower; each part skipped when a
    complete copy with the same parameters is there."""
    root = Path(root)
    sizes = {"n_train_images": N_TRAIN_IMAGES, "n_heldout_images": N_HELDOUT_IMAGES, "image_size": IMAGE_SIZE}
    # Open-ended questions only: letters and options are more for a tiny random LLM to learn in a few minutes.
    sizes["mc_fraction"] = 0.0
    data = generate_detail_dataset(root / "detail", seed=seed, **sizes)
    blank = generate_detail_dataset(root / "detail_blank", seed=seed, blank=True, **sizes)
    for d in (data, blank):
        write_eval_files(d)

    llm = root / "models" / "llm"
    params = {"llm": LLM_SHAPE, "words": list(vocab_words())}
    if not _made(llm, params):
        tok = build_tiny_tokenizer(root / "models" / "tokenizer", [*params["words"], *corpus_texts(data)])
        write_tiny_internlm2(llm, tokenizer_model=tok, **LLM_SHAPE)
        atomic_write_text(llm / ".llava_ft_made.json", json.dumps(params))
        log.info("tiny InternLM2-layout LLM written to %s", llm)
    clip = root / "models" / "clip"
    if not _made(clip, CLIP_SHAPE):
        write_tiny_open_clip(clip, **CLIP_SHAPE)
        atomic_write_text(clip / ".llava_ft_made.json", json.dumps(CLIP_SHAPE))
        log.info("tiny open_clip tower written to %s", clip)
    return TilingAssets(data, blank, llm, clip)


def run_stage(stage: str, overrides: dict[str, Any], extra: list[str]) -> Path:
    """`llava-ft train configs/tiny_tiling/STAGE.yaml --overwrite --key value ...`, in this process."""
    path = CONFIGS / f"{stage}.yaml"
    if path.is_relative_to(Path.cwd()):
        path = path.relative_to(Path.cwd())
    args = [
        str(path),
        "--overwrite",
        *(a for k, v in overrides.items() for a in (f"--{k}", flag(v))),
        *extra,
    ]
    print("$ llava-ft train " + shlex.join(args), flush=True)
    if llava_ft(["train", *args]) != 0:
        raise SystemExit(f"stage {stage} failed")
    return Path(overrides["train.output_dir"])


def stage_overrides(assets: TilingAssets, out: Path, run: str, stage: str) -> dict[str, Any]:
    """The paths of one run's stage (following --root/--out), and for the fixed run no tiling."""
    data = assets.blank if run == "blank" else assets.data
    kind = "pretrain" if stage == "pretrain" else "finetune"
    over: dict[str, Any] = {
        "model.llm": str(assets.llm),
        "model.vision.model": f"local-dir:{assets.clip}",
        "data.train": [
            {"path": str(getattr(data, kind)), "format": "llava", "image_folder": str(data.images_dir)}
        ],
        "train.output_dir": str(out / run / stage),
    }
    if stage == "finetune":  # the control starts from the any-resolution stage 1, as the demo's control does
        start = out / ("anyres" if run == "blank" else run) / "pretrain"
        over["model.llm"], over["train.init_from"] = str(start / "llm"), str(start)
    if run == "fixed":
        over["model.vision.anyres"] = None
    return over


def score(checkpoint: Path, data: Path, out: Path, batch_size: int) -> list[evaluate.Scored]:
    """The held-out open-ended questions answered by the checkpoint as `llava-ft eval vqa` runs them (prompt
    suffix ""), into a fresh out/vqa; each question's outcome read back from its predictions file."""
    shutil.rmtree(out / "vqa", ignore_errors=True)
    predictor = evaluate.load_predictor(str(checkpoint), batch_size)
    run_vqa(data / "heldout_vqa.jsonl", data / "images", out / "vqa", predictor=predictor, suffix="")
    return evaluate.open_outcomes(data, out / "vqa")


def side_by_side(runs: dict[str, list[evaluate.Scored]]) -> dict:
    """Per run, the open-ended accuracy with its Wilson interval and n, and chance."""
    return {
        "level": evaluate.LEVEL,
        "interval": "Wilson score",
        "rows": {run: evaluate.cell(scored, "open") for run, scored in runs.items()},
        "chance": evaluate.chance(next(iter(runs.values())), "open"),
    }


def table_markdown(table: dict) -> str:
    rows = [[run, evaluate.fmt_cell(c)] for run, c in table["rows"].items()]
    rows.append(["chance", f"{table['chance']:.3f}"])
    return markdown_table(["held-out: the marks' shape (95% Wilson CI)", "open-ended accuracy"], rows)


def check(table: dict, targets: dict[str, float] = TARGETS) -> list[str]:
    """One line per target missed (open-ended accuracy)."""
    acc = {run: c["accuracy"] for run, c in table["rows"].items()}
    misses = []
    if not acc["anyres"] >= targets["anyres_open_min"]:
        misses.append(f"anyres open-ended: {acc['anyres']:.3f} < {targets['anyres_open_min']}")
    if not acc["fixed"] <= targets["fixed_open_max"]:
        misses.append(f"fixed open-ended: {acc['fixed']:.3f} > {targets['fixed_open_max']}")
    if not acc["anyres"] - acc["fixed"] >= targets["gain_min"]:
        misses.append(
            f"anyres - fixed open-ended: {acc['anyres'] - acc['fixed']:.3f} < {targets['gain_min']}"
        )
    gap = abs(acc["blank"] - table["chance"])
    if not gap <= targets["blank_open_from_chance_max"]:
        misses.append(f"blank open-ended: {gap:.3f} from chance > {targets['blank_open_from_chance_max']}")
    return misses


def main(argv: list[str] | None = None, *, stage_flags: dict[str, list[str]] | None = None) -> int:
    """stage_flags: more command-line flags per stage (pretrain, finetune), for a quick run."""
    more = stage_flags or {}
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root", default="data/demo/tiling", help="where the data and tiny checkpoints are made"
    )
    parser.add_argument("--out", default="work_dirs/tiny_tiling", help="stage outputs and the table")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target of TARGETS is missed")
    args = parser.parse_args(argv)
    clock = Clock()
    out = Path(args.out)

    clock.step("data and tiny checkpoints")
    assets = prepare(args.root, seed=args.seed)
    print(f"data {assets.data.root} ({assets.data.counts['train_images']} train images of {IMAGE_SIZE} px), "
          f"blank control {assets.blank.root}")  # fmt: skip
    checkpoints = {}
    for run in RUNS:
        for stage in ("finetune",) if run == "blank" else ("pretrain", "finetune"):
            mode = "fixed resolution" if run == "fixed" else "any-resolution tiling"
            clock.step(f"{run}: {stage} ({mode}{', blank images' if run == 'blank' else ''})")
            checkpoints[run] = run_stage(stage, stage_overrides(assets, out, run, stage), more.get(stage, []))

    clock.step("held-out evaluation (the code of `llava-ft eval vqa`)")
    runs = {}
    for run, checkpoint in checkpoints.items():
        data = (assets.blank if run == "blank" else assets.data).root
        runs[run] = score(checkpoint, data, out / "heldout" / run, args.batch_size)
    table = side_by_side(runs)
    table["checkpoints"] = {run: str(c) for run, c in checkpoints.items()}
    table["seconds"] = round(time.time() - clock.start)
    text = table_markdown(table)
    (out / "heldout").mkdir(parents=True, exist_ok=True)
    (out / "heldout" / "table.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    (out / "heldout" / "table.md").write_text(text + "\n", encoding="utf-8")
    clock.step("done")
    print(text)
    print(f"table: {out}/heldout/table.md, table.json; wall time {table['seconds']} s")
    if args.check:
        misses = check(table)
        for miss in misses:
            print(f"target missed: {miss}")
        return 1 if misses else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
