"""report.png: what the picture plots is what the Trainer logged (read back from its own trainer_state.json),
and the header holds the summary's figures."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_ft.config import DataSource
from llava_ft.report import draw_report, header, main, saved_log_history, write_report
from llava_ft.testing.tiny_llava import tiny_config
from llava_ft.train.run import train

STEPS = 6


def run_stage(root: Path, steps: int, logging_steps: int, save_steps: int) -> Path:
    """A real tiny text stage (LoRA)."""
    data = root / "chat.jsonl"
    lines = [
        {"messages": [{"role": "user", "content": f"Count to {n}."}, {"role": "assistant", "content": " ".join(map(str, range(1, n + 1)))}]}
        for n in range(1, 9)
    ]  # fmt: skip
    data.write_text("\n".join(json.dumps(r) for r in lines))
    cfg = tiny_config(root, vision_backend=None, llm_mode="lora")
    cfg.data.train = [DataSource(path=str(data), format="openai")]
    cfg.data.max_length = 64
    t = cfg.train
    t.output_dir, t.max_steps, t.batch_size, t.lr = str(root / "stage"), steps, 4, 1e-3
    t.logging_steps, t.save_steps, t.report_to = logging_steps, save_steps, "none"
    return train(cfg).output_dir


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> Path:
    """6 steps, logging every step, keeping its last checkpoint."""
    return run_stage(tmp_path_factory.mktemp("report"), STEPS, logging_steps=1, save_steps=STEPS)


def trainer_log(stage: Path) -> list[dict]:
    return json.loads((stage / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]


def axis(fig, title: str):
    (ax,) = [a for a in fig.axes if a.get_title() == title]
    return ax


def line_data(ax) -> dict[str, tuple[list[float], list[float]]]:
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}


def test_cli_draws_what_the_trainer_logged(stage):
    assert main([str(stage)]) == 0
    png = stage / "report.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (1100, 700)

    log = [row for row in trainer_log(stage) if "loss" in row]
    assert len(log) == STEPS
    fig = draw_report(trainer_log(stage), json.loads((stage / "summary.json").read_text()))
    steps = [row["step"] for row in log]
    assert line_data(axis(fig, "loss"))["train"] == (steps, [row["loss"] for row in log])
    assert line_data(axis(fig, "learning rate"))["learning_rate"] == (
        steps,
        [row["learning_rate"] for row in log],
    )
    assert line_data(axis(fig, "grad norm"))["grad_norm"] == (steps, [row["grad_norm"] for row in log])
    assert [t.get_text() for t in axis(fig, "evaluation accuracy").texts] == ["no evaluation in this stage"]


def test_header_holds_the_summary_figures(stage):
    summary = json.loads((stage / "summary.json").read_text())
    trainable = sum(p["trainable"] for p in summary["params"].values())
    frozen = sum(p["total"] for p in summary["params"].values()) - trainable
    text = header(summary)
    assert text.startswith(f"{summary['name']}, {STEPS} steps, {summary['tokens']:,} tokens, ")
    assert f"{trainable:,} trainable / {frozen:,} frozen params" in text
    assert trainable > 0 and frozen > 0  # LoRA: both kinds present


def test_eval_accuracy_logged_over_steps_and_non_finite_values_skipped(tmp_path):
    log = [
        {"step": 1, "loss": 2.0, "learning_rate": 1e-3, "grad_norm": 1.5},
        {"step": 2, "loss": float("nan"), "learning_rate": 9e-4, "grad_norm": float("inf")},
        {"step": 2, "eval_loss": 1.9, "eval_accuracy": 0.25, "eval_colour_accuracy": 0.5},
        {"step": 3, "loss": 1.0, "learning_rate": 8e-4, "grad_norm": 0.5},
        {"step": 4, "eval_loss": 1.1, "eval_accuracy": 0.75, "eval_colour_accuracy": 1.0},
    ]
    fig = draw_report(log, {"name": "x", "steps": 3})
    assert line_data(axis(fig, "loss")) == {"train": ([1, 3], [2.0, 1.0]), "eval": ([2, 4], [1.9, 1.1])}
    assert line_data(axis(fig, "grad norm"))["grad_norm"] == ([1, 3], [1.5, 0.5])
    assert line_data(axis(fig, "evaluation accuracy")) == {
        "accuracy": ([2, 4], [0.25, 0.75]),
        "colour_accuracy": ([2, 4], [0.5, 1.0]),
    }
    assert write_report(tmp_path / "new", log, {}).is_file()


def test_finished_evaluation_in_summary_is_drawn_per_type(tmp_path):
    result = {
        "accuracy": 0.6,
        "chance": 0.25,
        "n": 8,
        "per_type": {"colour": {"accuracy": 0.75, "chance": 0.2, "n": 4}, "shape": {"accuracy": 0.5, "chance": 0.3, "n": 4}},
    }  # fmt: skip
    fig = draw_report([], {"eval": result})
    ax = axis(fig, "evaluation accuracy (n=8)")
    bars = [(p.get_x() + p.get_width() / 2, p.get_height()) for p in ax.patches]
    assert [h for _, h in bars] == [0.6, 0.75, 0.5]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["all", "colour", "shape"]
    (chance,) = ax.collections
    assert [seg[0][1] for seg in chance.get_segments()] == [0.25, 0.2, 0.3]
    for title in ("loss", "learning rate", "grad norm"):
        assert axis(fig, title).texts[0].get_text().startswith("no ")
    assert not any(math.isnan(h) for _, h in bars)


def pixels(png: Path) -> np.ndarray:
    with Image.open(png) as im:
        return np.asarray(im.convert("RGB"))


def test_redraw_of_a_stage_without_checkpoints_equals_the_training_report(stage, tmp_path):
    """A default run keeps no checkpoint-N: the redraw used to read summary.json's loss history alone and
    overwrote the report with empty learning rate and grad norm panels."""
    copy = tmp_path / "stage"
    shutil.copytree(stage, copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    written = pixels(copy / "report.png")
    assert main([str(copy)]) == 0
    assert np.array_equal(pixels(copy / "report.png"), written), "the redraw differs from the training report"

    kept = json.loads((copy / "summary.json").read_text())["log_history"]
    plotted = [
        {k: row[k] for k in ("step", "loss", "learning_rate", "grad_norm")}
        for row in trainer_log(stage)
        if "loss" in row
    ]
    assert kept == plotted  # fmt: skip


def test_a_summary_without_a_log_history_still_redraws_its_loss(stage, tmp_path):
    """summary.json written before it kept the log history: the loss history is drawn, the rest is said to be
    missing."""
    copy = tmp_path / "old"
    shutil.copytree(stage, copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    summary = json.loads((copy / "summary.json").read_text())
    del summary["log_history"]
    (copy / "summary.json").write_text(json.dumps(summary, indent=2))
    assert main([str(copy)]) == 0
    fig = draw_report(saved_log_history(copy), summary)
    assert line_data(axis(fig, "loss"))["train"][0] == list(range(1, STEPS + 1))
    assert axis(fig, "learning rate").texts[0].get_text() == "no learning rate logged"


def test_a_run_shorter_than_logging_steps_says_so(tmp_path, caplog):
    """max_steps 2 < logging_steps 10: the Trainer logs no loss, and the summary line said "loss None -> None"."""
    with caplog.at_level(logging.INFO, logger="llava_ft"):
        out = run_stage(tmp_path, steps=2, logging_steps=10, save_steps=0)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("summary:")]
    assert "no loss logged (logging_steps 10 > 2 steps)" in line and "None" not in line, line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["first_loss"] is None and summary["log_history"] == []
    assert main([str(out)]) == 0
    fig = draw_report(saved_log_history(out), summary)
    assert axis(fig, "loss").texts[0].get_text() == "no loss logged"
