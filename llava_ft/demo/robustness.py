"""The demo over several data seeds and generator settings, with the same configs/tiny recipe:

    python -m llava_ft.demo.robustness [--runs default:0 default:1 default:2 alt:0] [--out work_dirs/tiny_runs]

Each run is the whole demo (llava_ft.demo.run) on its own data (ROOT/shapes_<setting>_<seed>) into
OUT/<setting>_<seed>; the summary gives each run's headline cells, then the min and max over the runs of each
setting, to OUT/summary.md and OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from llava_ft.demo import run as demo_run
from llava_ft.eval.report import markdown_table

# (row, split, column) of the demo's table.json shown per run.
CELLS = (
    ("real", "seen", "open"),
    ("real", "unseen", "open"),
    ("real", "seen", "single"),
    ("real", "seen", "circular"),
    ("real", "unseen", "circular"),
    ("blank", "all", "open"),
    ("blank", "all", "circular"),
)


def summarise(tables: dict[str, dict], seconds: dict[str, float]) -> tuple[str, dict]:
    """tables: run name ("setting:seed") -> its table.json. Rows per run, then min/max per setting."""
    headers = ["run", *(f"{r} {s} {c}" for r, s, c in CELLS), "chance open", "wall s"]
    rows, values = [], {}
    for name, table in tables.items():
        cells = [table["rows"][r][s][c]["accuracy"] for r, s, c in CELLS]
        values[name] = cells
        chance = table["chance"]["all"]["open"]
        rows.append([name, *(f"{v:.3f}" for v in cells), f"{chance:.3f}", f"{seconds[name]:.0f}"])
    settings = sorted({name.split(":")[0] for name in tables})
    ranges = {}
    for setting in settings:
        runs = [v for name, v in values.items() if name.split(":")[0] == setting]
        low = [min(col) for col in zip(*runs)]
        high = [max(col) for col in zip(*runs)]
        ranges[setting] = {"min": low, "max": high, "runs": len(runs)}
        rows.append(
            [f"{setting} min..max ({len(runs)})", *(f"{a:.3f}..{b:.3f}" for a, b in zip(low, high)), "", ""]
        )
    summary = {"cells": [list(c) for c in CELLS], "runs": values, "ranges": ranges, "seconds": seconds}
    return markdown_table(headers, rows), summary


def main(argv: list[str] | None = None, *, stage_flags: dict[str, list[str]] | None = None) -> int:
    """stage_flags: passed to each demo run (more command-line flags per stage, for a quick run)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", nargs="+", default=["default:0", "default:1", "default:2", "alt:0"])
    parser.add_argument("--root", default="data/demo")
    parser.add_argument("--out", type=Path, default=Path("work_dirs/tiny_runs"))
    args = parser.parse_args(argv)
    tables, seconds = {}, {}
    for name in args.runs:
        setting, _, seed = name.partition(":")
        out = args.out / f"{setting}_{seed or 0}"
        started = time.time()
        argv = ["--root", args.root, "--out", str(out), "--seed", seed or "0", "--setting", setting]
        demo_run.main(argv, stage_flags=stage_flags)
        seconds[name] = time.time() - started
        tables[name] = json.loads((out / "heldout" / "table.json").read_text())
    text, summary = summarise(tables, seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text(text + "\n")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
