"""The tiny demo from data to answers, in one process (torch and transformers are imported once) and, for the
blank-image control, one child process:

    python -m llava_ft.demo.run [--root data/demo] [--out work_dirs/tiny] [--seed 0] [--setting default]
        [--check] [--finetune-epochs N]

Each stage is `llava-ft train configs/tiny/<stage>.yaml` (the command is printed before it runs), through the
same config loading, checks and train() the command line uses. Before them the random tiny tower is pretrained
on its own (`python -m llava_ft.demo.tower`), as real CLIP towers come pretrained; both LLaVA stages then keep
it frozen, as the real recipe keeps CLIP frozen. The blank-image control shares the text, tower and
pretrain stages and repeats the finetune stage on background-only images: whatever it scores above chance
could only come from the questions' text. It trains in a child process beside the real finetune, each with
half the CPU threads: models this small use a second thread poorly, so two runs side by side finish sooner
than one after the other. The demo ends with the held-out table (real vs blank images, seen vs unseen
colour-shape pairs, open-ended vs multiple choice) scored by `llava-ft eval`'s own code.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from llava_ft.cli.main import main as llava_ft
from llava_ft.config import load_config
from llava_ft.constants import IMAGE_TOKEN
from llava_ft.data.images import load_image
from llava_ft.demo import evaluate, tower
from llava_ft.demo.prepare import data_dir, prepare
from llava_ft.demo.shapes import SETTINGS
from llava_ft.inference import load_assistant
from llava_ft.model.vision import LOCAL_DIR
from llava_ft.query import Query

log = logging.getLogger("llava_ft")

# The recipe in this repository, wherever the demo is run from (tests run it in a scratch folder).
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "tiny"


class Clock:
    def __init__(self) -> None:
        self.start = time.time()

    def step(self, title: str) -> None:
        print(f"\n=== {title} ({time.time() - self.start:.0f}s)", flush=True)


def _command(name: str, overrides: dict[str, Any], extra: list[str]) -> list[str]:
    """`train configs/tiny/NAME.yaml --overwrite --key value ...`, printed as the command line spells it."""
    path = CONFIGS / f"{name}.yaml"
    if path.is_relative_to(Path.cwd()):
        path = path.relative_to(Path.cwd())
    flags = [arg for k, v in overrides.items() for arg in (f"--{k}", flag(v))] + extra
    args = ["train", str(path), "--overwrite", *flags]
    print("$ llava-ft " + " ".join(shlex.quote(a) for a in args), flush=True)
    return args


def run_stage(name: str, overrides: dict[str, Any], extra: list[str]) -> Path:
    """`llava-ft train configs/tiny/NAME.yaml --overwrite --key value ...`, in this process."""
    if llava_ft(_command(name, overrides, extra)) != 0:
        raise SystemExit(f"stage {name} failed")
    return _stage_output(name, overrides)


def start_stage(
    name: str, overrides: dict[str, Any], extra: list[str], log: Path, threads: int
) -> Background:
    """The same command in a child process with `threads` CPU threads, its output going to `log`."""
    args = _command(name, overrides, extra)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    # The child imports this checkout's llava_ft, wherever the demo runs from (tests run it in a scratch folder).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CONFIGS.parents[1]), env.get("PYTHONPATH")]))
    with log.open("w") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "llava_ft.cli.main", *args], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    return Background(name, child, log, _stage_output(name, overrides))


class Background:
    """A stage running in a child process."""

    def __init__(self, name: str, child: subprocess.Popen, log: Path, output: Path) -> None:
        self.name, self.child, self.log, self.output = name, child, log, output

    def stop(self) -> None:
        self.child.kill()
        self.child.wait()

    def wait(self) -> Path:
        if self.child.wait() != 0:
            tail = "".join(self.log.read_text(errors="replace").splitlines(keepends=True)[-20:])
            raise SystemExit(f"{tail}\nstage {self.name} failed (its output: {self.log})")
        return self.output


def _stage_output(name: str, overrides: dict[str, Any]) -> Path:
    return Path(overrides.get("train.output_dir", _output_dir(CONFIGS / f"{name}.yaml")))


def _output_dir(path: Path) -> str:
    return load_config(path).train.output_dir


def flag(value: Any) -> str:
    """An override's value as the command line takes it (YAML flow style)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip().removesuffix("\n...")


def _sources(data: Path, kind: str) -> list[dict[str, str]]:
    return [{"path": str(data / f"{kind}.json"), "image_folder": str(data / "images")}]


def main(argv: list[str] | None = None, *, stage_flags: dict[str, list[str]] | None = None) -> int:
    """stage_flags: more command-line flags per stage (text, tower, pretrain, finetune, control), for a quick
    run."""
    more = stage_flags or {}
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="data/demo", help="where the data and tiny checkpoints are made")
    parser.add_argument("--out", default="work_dirs/tiny", help="stage outputs and reports")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--setting", default="default", choices=sorted(SETTINGS))
    parser.add_argument("--check", action="store_true", help="exit 1 if the issue's figures do not hold")
    parser.add_argument(
        "--finetune-epochs",
        type=float,
        help="passes of the finetune stage and of its control (default: configs/tiny/finetune.yaml's); "
        "lettered multiple choice needs many more than the recipe's (README: 'A longer finetune')",
    )
    args = parser.parse_args(argv)
    if args.finetune_epochs is not None and not 0 < args.finetune_epochs < math.inf:
        parser.error(f"--finetune-epochs must be a positive number, got {args.finetune_epochs}")
    clock = Clock()
    out = Path(args.out)

    clock.step("data and tiny checkpoints")
    assets = prepare(args.root, blank=True, seed=args.seed, setting=args.setting)
    data, blank = assets.data.root, data_dir(args.root, args.setting, args.seed, blank=True)
    print(f"data {data} ({assets.data.counts['train_images']} train images), blank control {blank}")
    # Paths follow --root/--out/--seed/--setting; with the defaults these equal the configs' own values.
    seeing = f"{LOCAL_DIR}{out / 'tower'}"
    paths: dict[str, dict[str, Any]] = {
        "text": {"model.llm": str(assets.llm), "train.output_dir": str(out / "text")},
        "pretrain": {
            "model.llm": str(out / "text" / "llm"),
            "model.vision.model": seeing,
            "train.output_dir": str(out / "pretrain"),
        },
        "finetune": {
            "model.llm": str(out / "text" / "llm"),
            "model.vision.model": seeing,
            "train.output_dir": str(out / "finetune"),
            "train.init_from": str(out / "pretrain"),
        },
    }
    defaults = args.root == "data/demo" and args.out == "work_dirs/tiny" and data == Path("data/demo/shapes")

    def over(stage: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        if defaults:
            return dict(extra or {})
        moved = dict(paths[stage])
        kind = {"text": None, "pretrain": "pretrain", "finetune": "finetune"}[stage]
        if kind is None:
            moved["data.train"] = [{"path": str(data / "text.jsonl"), "format": "text"}]
        else:
            moved["data.train"] = _sources(data, kind)
        if stage == "finetune":
            moved["train.eval_benchmark.data"] = str(data / "heldout_vqa.jsonl")
            moved["train.eval_benchmark.images"] = str(data / "images")
        return moved | (extra or {})

    clock.step("stage 0: text pretraining of the tiny LLM (its words, from plain text)")
    run_stage("text", over("text"), more.get("text", []))
    clock.step("stage 0: the tiny tower learns to see (tagging the words of the pretrain captions)")
    # The tower trains the tokens configs/tiny reads (its feature layer and pooling).
    tower_args = ["--data", str(data), "--clip", str(assets.clip), "--out", str(out / "tower")]
    tower_args += more.get("tower", [])
    print("$ python -m llava_ft.demo.tower " + " ".join(shlex.quote(a) for a in tower_args), flush=True)
    tower.main(tower_args)
    clock.step("stage 1: pretrain (image captions)")
    run_stage("pretrain", over("pretrain"), more.get("pretrain", []))
    # The control trains as long as the real finetune, or it would not be a control.
    longer = {} if args.finetune_epochs is None else {"train.epochs": args.finetune_epochs}
    control = longer | {
        "train.output_dir": str(out / "blank" / "finetune"),
        "data.train": _sources(blank, "finetune"),
        "train.eval_benchmark": None,  # scored below, beside the real model
    }
    threads = torch.get_num_threads()
    half = max(1, threads // 2)
    clock.step(f"stage 2: finetune (open and multiple-choice questions), {half} thread(s)")
    print(
        "control: stage 2 again on blank images (from the same stage 1), at the same time in a child process"
    )
    log = out / "blank" / "finetune.log"
    child = start_stage("finetune", over("finetune", control), more.get("control", []), log, half)
    print(f"(the control's output goes to {log})", flush=True)
    torch.set_num_threads(half)
    try:
        real = run_stage("finetune", over("finetune", longer), more.get("finetune", []))
    except BaseException:
        child.stop()
        raise
    finally:
        torch.set_num_threads(threads)
    clock.step("control: waiting for the blank-image finetune")
    control_ckpt = child.wait()

    clock.step("held-out evaluation (the code of `llava-ft eval vqa` and `llava-ft eval mmbench`)")
    failed = evaluate.main(
        [
            "--real", str(real), "--blank", str(control_ckpt), "--data", str(data), "--blank-data", str(blank),
            "--out", str(out / "heldout"), *(["--check"] if args.check else []),
        ]
    )  # fmt: skip

    clock.step("one question about one held-out image")
    record = next(r for r in json.loads((data / "heldout.json").read_text()) if r["combination"] == "unseen")
    image, (question, expected) = (
        data / "images" / record["image"],
        [t["value"] for t in record["conversations"]],
    )
    question = question.removeprefix(IMAGE_TOKEN + "\n")
    answer = load_assistant(str(real)).generate(
        [Query(question=question, image=load_image(image))], max_new_tokens=8
    )
    print(f"image: {image} (a colour-shape pair never seen in training)")
    print(f"Q: {question}\nA: {answer[0]}  (expected {expected})")

    clock.step("done")
    print(f"stage outputs: {out}/{{text,tower,pretrain,finetune}}; control: {out}/blank/finetune")
    print(f"held-out table: {out}/heldout/table.md; reports: {out}/*/report.png, summary.json")
    print(f"chat: llava-ft chat {real} --image {image}")
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
