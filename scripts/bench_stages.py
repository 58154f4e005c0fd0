"""Throughput of the tiny default's stages on this machine: padded vs length-grouped vs packed batches.

    .venv/bin/python scripts/bench_stages.py [--steps 40]

Runs each stage's real training path (loader, trainability, collator, Trainer) for a fixed number of steps and
prints tokens/s and samples/s (real tokens, padding excluded), the pad share of the batches and peak RSS, from the
summary.json each run writes. Needs the tiny assets (`python -m llava_ft.demo.prepare`), the text stage's LLM
(`llava-ft train configs/tiny/text.yaml`) and the pretrained tiny tower (`python -m llava_ft.demo.tower`); it
makes them if missing.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "padded": {"data.packing": False, "data.group_by_length": False},
    "grouped": {"data.packing": False, "data.group_by_length": True},
    "packed": {"data.packing": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--stages", default="text,pretrain,finetune")
    args = parser.parse_args()
    os.chdir(ROOT)
    logging.basicConfig(level=logging.WARNING)

    from llava_ft.config import load_config
    from llava_ft.demo import tower
    from llava_ft.demo.prepare import prepare
    from llava_ft.train.run import train

    prepare()
    if not (ROOT / "work_dirs/tiny/text/llava_ft.yaml").is_file():
        train(load_config("configs/tiny/text.yaml"))
    if not (ROOT / "work_dirs/tiny/tower/tower.json").is_file():
        tower.main([])

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages.split(","):
            for mode, overrides in MODES.items():
                cfg = load_config(
                    f"configs/tiny/{stage}.yaml",
                    {
                        **overrides,
                        "train.max_steps": args.steps,
                        "train.output_dir": f"{tmp}/{stage}-{mode}",
                        "train.logging_steps": args.steps,
                        "train.report_to": "none",
                        "data.cache": False,
                    },
                )
                s = train(cfg).summary
                rows.append((stage, mode, s))
                print(f"{stage:<9} {mode:<8} done", flush=True)

    print(
        f"\ntiny default, {args.steps} steps per run; batches of train.batch_size samples (packed: rows of max_length)"
    )
    print(
        f"{'stage':<9} {'batches':<8} {'tokens/s':>9} {'samples/s':>10} {'pad share':>10} {'peak RSS MB':>12}"
    )
    for stage, mode, s in rows:
        print(
            f"{stage:<9} {mode:<8} {s['tokens_per_s']:>9.0f} {s['samples_per_s']:>10.1f} "
            f"{s['pad_share']:>10.1%} {s['peak_memory_mb']:>12.0f}"
        )
    by = {(stage, mode): s for stage, mode, s in rows}
    for stage in args.stages.split(","):
        ratio = by[(stage, "packed")]["tokens_per_s"] / by[(stage, "padded")]["tokens_per_s"]
        print(f"{stage}: packed / padded tokens/s = {ratio:.2f}x")


if __name__ == "__main__":
    main()
