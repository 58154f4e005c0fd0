"""The tiny demo's final report: real-image and blank-image checkpoints scored on the held-out split, seen and
unseen colour-shape combinations apart, open-ended and multiple choice, each next to chance.

    python -m llava_ft.demo.evaluate --real CKPT --blank CKPT_BLANK [--data data/demo/shapes]
        [--blank-data data/demo/shapes_blank] [--out work_dirs/tiny/heldout] [--batch-size 64] [--check]

Each checkpoint is scored by the code `llava-ft eval vqa` (prompt suffix "") and `llava-ft eval mmbench`
(VLMEvalKit rule, circular and single pass) run, into fresh OUT/{real,blank}/{vqa,mmbench}, so every figure
equals that of a separate `llava-ft eval` run with the same --batch-size. Intervals are 95% Wilson score
intervals. `--check` exits 1 when a target of TARGETS is missed, one line per miss.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

from llava_ft.data.conversation import DataError
from llava_ft.eval import arguments
from llava_ft.eval.mmbench import ROTATION, run_mmbench
from llava_ft.eval.predictions import PREDICTIONS, read_predictions
from llava_ft.eval.report import markdown_table
from llava_ft.eval.runner import Predictor
from llava_ft.eval.vqa import run_vqa

# What the demo must show; `--check` fails on each one missed. "min": the score must reach it, "max": at most.
# real_open_qtype_min holds for every question type (seen and unseen together).
TARGETS: dict[str, float] = {
    "real_open_all_min": 0.97,
    "real_open_qtype_min": 0.95,
    "real_circular_all_min": 0.90,
    "real_single_all_min": 0.95,
    "real_open_unseen_min": 0.85,
    "real_circular_unseen_min": 0.80,
    "blank_open_from_chance_max": 0.05,
    "blank_circular_all_max": 0.05,
}

SPLITS = ("all", "seen", "unseen")
COLUMNS = {"open": "open-ended", "single": "MC single pass", "circular": "MC circular"}
LEVEL = 0.95


def wilson(successes: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score interval of a proportion: the p whose score test does not reject successes / n."""
    if n == 0:
        return (math.nan, math.nan)
    z = NormalDist().inv_cdf((1 + level) / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Scored:
    """One held-out question's outcome: a score in [0, 1] under each column it counts in."""

    qtype: str
    combination: str
    scores: dict[str, float]
    """Column -> score: "open", or "single" and "circular" for a multiple-choice question."""
    chance: dict[str, float]
    """Column -> the score of random guessing."""


def heldout_records(data: Path) -> list[dict]:
    return json.loads((data / "heldout.json").read_text(encoding="utf-8"))


def check_files(data: Path) -> None:
    """The held-out files prepare writes, there before any model loads (seconds each)."""
    for name in ("heldout.json", "heldout_vqa.jsonl", "heldout_mmbench.tsv", "images"):
        if not (data / name).exists():
            raise FileNotFoundError(f"{data / name}: not there (python -m llava_ft.demo.prepare writes it)")


def load_predictor(checkpoint: str, batch_size: int) -> Predictor:
    """The model as `llava-ft eval` loads it, with its defaults (max new tokens, weights fingerprint)."""
    parser = argparse.ArgumentParser()
    arguments.add_common_args(parser)
    argv = ["--checkpoint", checkpoint, "--data", "-", "--output", "-", "--batch-size", str(batch_size)]
    return arguments.predictor_from_args(parser.parse_args(argv))


def score_checkpoint(predictor: Predictor, data: Path, out: Path, command: str = "") -> list[Scored]:
    """Run both benchmarks into fresh out/vqa and out/mmbench (a resume would refuse another model's answers
    left there) and read each question's outcome back from their predictions files."""
    for sub in ("vqa", "mmbench"):
        shutil.rmtree(out / sub, ignore_errors=True)
    vqa = run_vqa(
        data / "heldout_vqa.jsonl",
        data / "images",
        out / "vqa",
        predictor=predictor,
        suffix="",
        command=command,
    )
    mmbench = run_mmbench(
        data / "heldout_mmbench.tsv", out / "mmbench", predictor=predictor, rule="vlmevalkit", command=command
    )
    scored = open_outcomes(data, out / "vqa") + mc_outcomes(data, out / "mmbench")
    # The per-item outcomes must add up to the runs' own headlines, or this table would tell another story.
    _agree(vqa["headline"]["value"], scored, "open", "vqa")
    _agree(mmbench["scores"]["circular"]["value"], scored, "circular", "mmbench")
    _agree(mmbench["scores"]["single_main"]["value"], scored, "single", "mmbench")
    return scored


def _agree(headline: float, scored: list[Scored], column: str, what: str) -> None:
    mean = cell(scored, column)["accuracy"]
    if not math.isclose(headline, mean, abs_tol=1e-9):
        raise RuntimeError(f"{what}: the per-item outcomes average {mean}, its headline is {headline}")


def open_outcomes(data: Path, output: Path) -> list[Scored]:
    """Each open-ended question's soft accuracy (the VQA headline's per-item score)."""
    preds = read_predictions(output / PREDICTIONS, "question_id")
    records = [r for r in heldout_records(data) if r.get("style", "open") == "open"]
    if {str(r["id"]) for r in records} != set(preds):
        raise DataError(str(data / "heldout_vqa.jsonl"), "its questions are not heldout.json's open ones")
    out = []
    for r in records:
        rec = preds[str(r["id"])]
        chance = 1 / len(r["choices"])
        out.append(Scored(r["qtype"], r["combination"], {"open": rec["soft_accuracy"]}, {"open": chance}))
    return out


def mc_outcomes(data: Path, output: Path) -> list[Scored]:
    """Each multiple-choice question's single-pass (main row) and circular (every rotation) outcome. MMBench
    index i is the i-th multiple-choice record of heldout.json, as prepare writes the TSV."""
    preds = read_predictions(output / PREDICTIONS, "index")
    records = [r for r in heldout_records(data) if r.get("style") == "mc"]
    n_questions = sum(int(key) < ROTATION for key in preds)
    if n_questions != len(records):
        raise DataError(
            str(data / "heldout_mmbench.tsv"), f"{n_questions} questions, heldout.json {len(records)}"
        )
    out = []
    for i, r in enumerate(records):
        rec = preds[str(i)]
        if (rec["category"], rec["l2-category"]) != (r["qtype"], r["combination"]):
            raise DataError(
                str(data / "heldout_mmbench.tsv"), f"question {i} is not {r['id']} of heldout.json"
            )
        k = len(r["options"])
        out.append(
            Scored(
                r["qtype"],
                r["combination"],
                {"single": float(rec["correct"]), "circular": float(rec["question_correct"])},
                {"single": 1 / k, "circular": (1 / k) ** k},
            )
        )
    return out


def cell(scored: list[Scored], column: str) -> dict:
    """Accuracy, its Wilson interval and n over the questions that count in `column`."""
    values = [s.scores[column] for s in scored if column in s.scores]
    n = len(values)
    low, high = wilson(sum(values), n)
    return {"accuracy": sum(values) / n if n else math.nan, "low": low, "high": high, "n": n}


def chance(scored: list[Scored], column: str) -> float:
    values = [s.chance[column] for s in scored if column in s.chance]
    return sum(values) / len(values) if values else math.nan


def _split(scored: list[Scored], split: str) -> list[Scored]:
    return [s for s in scored if split == "all" or s.combination == split]


def build_table(runs: dict[str, list[Scored]]) -> dict:
    """runs: "real" / "blank" -> outcomes. Cells per run and split, chance per split (from the real run's
    questions: both runs ask the same ones), and the real run's per-question-type breakdown."""
    reference = runs.get("real") or next(iter(runs.values()))
    table: dict = {
        "level": LEVEL,
        "interval": "Wilson score",
        "rows": {
            run: {split: {c: cell(_split(scored, split), c) for c in COLUMNS} for split in SPLITS}
            for run, scored in runs.items()
        },
        "chance": {split: {c: chance(_split(reference, split), c) for c in COLUMNS} for split in SPLITS},
    }
    if "real" in runs:
        real = runs["real"]
        table["per_type"] = {
            split: {
                q: {
                    c: cell([s for s in _split(real, split) if s.qtype == q], c) for c in ("open", "circular")
                }
                for q in sorted({s.qtype for s in real})
            }
            for split in SPLITS
        }
    return table


def check(table: dict, targets: dict[str, float] = TARGETS) -> list[str]:
    """One line per target missed."""
    rows, t = table["rows"], targets
    real, blank = rows["real"], rows["blank"]
    misses = []

    def at_least(value: float, target: float, what: str) -> None:
        if not value >= target:
            misses.append(f"{what}: {value:.3f} < {target}")

    at_least(real["all"]["open"]["accuracy"], t["real_open_all_min"], "real open-ended, all")
    for q, cells in table["per_type"]["all"].items():
        at_least(cells["open"]["accuracy"], t["real_open_qtype_min"], f"real open-ended, {q}")
    at_least(real["all"]["circular"]["accuracy"], t["real_circular_all_min"], "real MC circular, all")
    at_least(real["all"]["single"]["accuracy"], t["real_single_all_min"], "real MC single pass, all")
    at_least(real["unseen"]["open"]["accuracy"], t["real_open_unseen_min"], "real open-ended, unseen")
    at_least(
        real["unseen"]["circular"]["accuracy"], t["real_circular_unseen_min"], "real MC circular, unseen"
    )
    gap = abs(blank["all"]["open"]["accuracy"] - table["chance"]["all"]["open"])
    if not gap <= t["blank_open_from_chance_max"]:
        misses.append(f"blank open-ended, all: {gap:.3f} from chance > {t['blank_open_from_chance_max']}")
    circular = blank["all"]["circular"]["accuracy"]
    if not circular <= t["blank_circular_all_max"]:
        misses.append(f"blank MC circular, all: {circular:.3f} > {t['blank_circular_all_max']}")
    return misses


def fmt_cell(c: dict) -> str:
    if not c["n"]:
        return "-"
    return f"{c['accuracy']:.3f} [{c['low']:.2f}, {c['high']:.2f}] n={c['n']}"


def _short(c: dict) -> str:
    return f"{c['accuracy']:.2f} n={c['n']}" if c["n"] else "-"


def table_markdown(table: dict) -> str:
    """The table, then the real run's open-ended and circular accuracy per question type."""
    rows = [
        [f"{run} images, {split}", *(fmt_cell(cells[split][c]) for c in COLUMNS)]
        for run, cells in table["rows"].items()
        for split in SPLITS
    ]
    rows.append(["chance", *(f"{table['chance']['all'][c]:.3f}" for c in COLUMNS)])
    lines = [markdown_table(["held-out (95% Wilson CI)", *COLUMNS.values()], rows)]
    if "per_type" in table:
        per_type = table["per_type"]
        pairs = [(split, c) for split in ("seen", "unseen") for c in ("open", "circular")]
        short = [[q, *(_short(per_type[s][q][c]) for s, c in pairs)] for q in per_type["all"]]
        headers = ["real, per type", "seen open", "seen circular", "unseen open", "unseen circular"]
        lines += ["", markdown_table(headers, short)]
    return "\n".join(lines)


def report(
    checkpoints: dict[str, tuple[str, Path]],
    out: Path,
    *,
    batch_size: int = 64,
    load: Callable[[str, int], Predictor] | None = None,
    command: str = "",
) -> dict:
    """checkpoints: "real" / "blank" -> (checkpoint, dataset folder). Each model loads once and answers both
    benchmarks; the table goes to out/table.md and out/table.json."""
    load = load or load_predictor
    for _, data in checkpoints.values():
        check_files(Path(data))
    runs = {}
    for run, (checkpoint, data) in checkpoints.items():
        runs[run] = score_checkpoint(load(checkpoint, batch_size), Path(data), out / run, command)
    table = build_table(runs)
    table["checkpoints"] = {run: {"checkpoint": c, "data": str(d)} for run, (c, d) in checkpoints.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    (out / "table.md").write_text(table_markdown(table) + "\n", encoding="utf-8")
    return table


@arguments.reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--real", required=True, help="checkpoint trained on the real images")
    parser.add_argument("--blank", required=True, help="checkpoint of the control, trained on blank images")
    parser.add_argument("--data", type=Path, default=Path("data/demo/shapes"))
    parser.add_argument("--blank-data", type=Path, default=Path("data/demo/shapes_blank"))
    parser.add_argument("--out", type=Path, default=Path("work_dirs/tiny/heldout"))
    parser.add_argument("--batch-size", type=arguments.positive_int, default=64)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target of TARGETS is missed")
    args = parser.parse_args(argv)
    command = shlex.join(
        ["python", "-m", "llava_ft.demo.evaluate", *(sys.argv[1:] if argv is None else argv)]
    )
    checkpoints = {"real": (args.real, args.data), "blank": (args.blank, args.blank_data)}
    table = report(checkpoints, args.out, batch_size=args.batch_size, command=command)
    print(table_markdown(table))
    print(f"runs: {args.out}/{{real,blank}}/{{vqa,mmbench}}; table: {args.out}/table.md, table.json")
    if args.check:
        misses = check(table)
        for miss in misses:
            print(f"target missed: {miss}")
        return 1 if misses else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
