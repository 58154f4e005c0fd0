"""A stage's training report as one picture: report.png beside summary.json.

Panels: training (and eval) loss, learning rate and grad norm over optimiser steps, and evaluation accuracy
(logged `eval_*accuracy*` values such as train.eval_benchmark's, or a finished evaluation stored under "eval" in
the summary, next to chance).

    python -m llava_ft.report STAGE_DIR   # redraw it from summary.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

REPORT_NAME = "report.png"
PLOTTED = ("loss", "learning_rate", "grad_norm")  # plus eval_* metrics


def series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in the Trainer's log history; rows without it, or with a non-finite value, are
    skipped (a NaN loss would otherwise blank the whole axis)."""
    steps, values = [], []
    for row in log_history:
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(int(row.get("step", len(steps))))
            values.append(float(value))
    return steps, values


def accuracy_keys(log_history: list[dict]) -> list[str]:
    """Logged evaluation accuracies, e.g. eval_accuracy, eval_colour_accuracy."""
    keys = {k for row in log_history for k in row if k.startswith("eval_") and "accuracy" in k}
    return sorted(keys)


def header(summary: dict) -> str:
    params = summary.get("params") or {}
    trainable = sum(p.get("trainable", 0) for p in params.values())
    total = sum(p.get("total", 0) for p in params.values())
    parts = [str(summary.get("name", "stage")), f"{summary.get('steps', '?')} steps"]
    tokens = summary.get("tokens", summary.get("tokens_seen"))  # real (non-padding) tokens; older summaries
    if tokens is not None:
        parts.append(f"{tokens:,} tokens")
    if summary.get("tokens_per_s"):
        parts.append(f"{summary['tokens_per_s']:,.0f} tokens/s")
    if summary.get("peak_memory_mb") is not None:
        parts.append(f"peak {summary['peak_memory_mb'] / 1024:.2f} GiB")
    if total:
        parts.append(f"{trainable:,} trainable / {total - trainable:,} frozen params")
    if summary.get("wall_s") is not None:
        parts.append(f"{summary['wall_s']:.0f} s wall")
    return ", ".join(parts)


def _line(ax, log_history: list[dict], key: str, label: str, **style) -> bool:
    steps, values = series(log_history, key)
    if not values:
        return False
    ax.plot(steps, values, label=label, marker="." if len(values) < 30 else None, **style)
    return True


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _eval_panel(ax, log_history: list[dict], summary: dict) -> None:
    keys = accuracy_keys(log_history)
    result = summary.get("eval")
    if keys:
        for key in keys:
            _line(ax, log_history, key, key.removeprefix("eval_"))
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8)
        ax.set_title("evaluation accuracy")
    elif isinstance(result, dict) and "accuracy" in result:
        per_type = result.get("per_type") or {}
        names = ["all", *per_type]
        acc = [result["accuracy"], *(v["accuracy"] for v in per_type.values())]
        chance = [result.get("chance"), *(v.get("chance") for v in per_type.values())]
        bars = ax.bar(names, acc, color="tab:green")
        ax.bar_label(bars, labels=[f"{a:.2f}" for a in acc], fontsize=8)
        known = [(i, c) for i, c in enumerate(chance) if c is not None]
        if known:
            xs = [i for i, _ in known]
            ys = [c for _, c in known]
            ax.hlines(
                ys,
                [x - 0.4 for x in xs],
                [x + 0.4 for x in xs],
                colors="black",
                linestyles="dashed",
                label="chance",
            )
            ax.legend(fontsize=8)
        ax.set_ylim(0, 1.1)
        ax.set_title(f"evaluation accuracy (n={result.get('n', '?')})")
    else:
        # summary.json's "eval" of a run with an eval set but no benchmark (train.eval_benchmark) holds a loss.
        loss_only = isinstance(result, dict) and result.get("loss") is not None
        _empty(
            ax, "no benchmark in this stage (eval loss: left)" if loss_only else "no evaluation in this stage"
        )
        ax.set_title("evaluation accuracy")


def draw_report(log_history: list[dict], summary: dict) -> Figure:
    fig = Figure(figsize=(11, 7), dpi=100, layout="constrained")
    (loss_ax, lr_ax), (grad_ax, eval_ax) = fig.subplots(2, 2)
    fig.suptitle(header(summary), fontsize=10)

    drew = _line(loss_ax, log_history, "loss", "train")
    drew |= _line(loss_ax, log_history, "eval_loss", "eval")
    if drew:
        loss_ax.set_xlabel("step")
        loss_ax.legend(fontsize=8)
    else:
        _empty(loss_ax, "no loss logged")
    loss_ax.set_title("loss")

    for ax, key, title in ((lr_ax, "learning_rate", "learning rate"), (grad_ax, "grad_norm", "grad norm")):
        if _line(ax, log_history, key, key):
            ax.set_xlabel("step")
        else:
            _empty(ax, f"no {title} logged")
        ax.set_title(title)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _eval_panel(eval_ax, log_history, summary)
    return fig


def write_report(out_dir: str | Path, log_history: list[dict], summary: dict) -> Path:
    """Draw report.png into out_dir from the Trainer's `state.log_history` and the stage summary; returns its path."""
    path = Path(out_dir) / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = draw_report(log_history, summary)
    FigureCanvasAgg(fig)  # Agg without touching pyplot's global backend
    fig.savefig(path)
    return path


def compact_log_history(log_history: list[dict]) -> list[dict]:
    """The rows of the Trainer's log history a report draws, with only the plotted keys and eval metrics: what
    summary.json keeps, since a default run keeps no checkpoint-N/trainer_state.json to redraw from."""
    rows = []
    for row in log_history:
        kept = {
            k: v
            for k, v in row.items()
            if k in PLOTTED or (k.startswith("eval_") and not k.endswith(("_runtime", "_per_second")))
        }
        if kept:
            rows.append({"step": row.get("step"), **kept})
    return rows


def saved_log_history(stage_dir: str | Path) -> list[dict]:
    """The log history kept in summary.json; for a summary without one, the log history of the newest
    checkpoint-N/trainer_state.json in stage_dir, else the summary's loss history (loss only)."""
    stage_dir = Path(stage_dir)
    summary = json.loads((stage_dir / "summary.json").read_text())
    # Preferred over a checkpoint: it holds the whole run, a kept checkpoint may predate the last steps.
    if summary.get("log_history") is not None:
        return summary["log_history"]
    states = sorted(
        stage_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[-1])
    )
    if states:
        return json.loads(states[-1].read_text())["log_history"]
    return summary.get("loss_history") or []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stage_dir", help="a stage output folder with summary.json")
    args = parser.parse_args(argv)
    stage = Path(args.stage_dir)
    if not (stage / "summary.json").is_file():
        parser.error(f"{stage}: no summary.json (not a finished stage output)")
    summary = json.loads((stage / "summary.json").read_text())
    print(write_report(stage, saved_log_history(stage), summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
