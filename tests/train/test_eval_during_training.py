"""Validation during training: the eval loss every train.eval_steps (data.eval or data.val_size) and the
benchmark at each epoch end, in the log history, summary.json and tensorboard; the benchmark scores as
`llava-ft eval`'s scripts score the saved stage."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from llava_ft.config import ConfigError, DataSource, EvalBenchmarkSection, load_config, parse_overrides
from llava_ft.data.dataset import SFTDataset
from llava_ft.demo.prepare import write_heldout_vqa
from llava_ft.eval import vqa
from llava_ft.eval.predictions import read_predictions
from llava_ft.report import draw_report, saved_log_history
from llava_ft.testing.callbacks import StopAt
from llava_ft.train.evaluation import BENCHMARK_FOLDER, split_off
from llava_ft.train.run import train


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the tensorboard event files under log_dir: (step, value) per tag."""
    out: dict[str, list[tuple[int, float]]] = {}
    for events in log_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return out


def axis(fig, title: str):
    (ax,) = [a for a in fig.axes if a.get_title() == title]
    return ax


def line_data(ax) -> dict[str, tuple[list[float], list[float]]]:
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}


def test_eval_loss_and_benchmark_reach_history_summary_and_tensorboard(llava_cfg, shapes, tmp_path):
    out = tmp_path / "out"
    cfg = llava_cfg(out, stage="finetune", llm_mode="lora", max_steps=4, eval_steps=2)
    cfg.data.eval = [
        DataSource(path=str(shapes.heldout), format="llava", image_folder=str(shapes.images_dir))
    ]
    cfg.train.report_to = "tensorboard"
    bench_file = write_heldout_vqa(shapes, tmp_path / "heldout_vqa.jsonl")
    cfg.train.eval_benchmark = EvalBenchmarkSection(
        kind="vqa", data=str(bench_file), images=str(shapes.images_dir), limit=3, prompt_suffix=""
    )
    stage = train(cfg)

    history = stage.trainer.state.log_history
    assert [h["step"] for h in history if "eval_loss" in h] == [2, 4]
    bench_rows = [h for h in history if "eval_vqa_accuracy" in h]
    assert [h["step"] for h in bench_rows] == [4]  # max_steps ends the (only) epoch at step 4

    summary = json.loads((out / "summary.json").read_text())
    assert [s["step"] for s in summary["eval"]["steps"]] == [2, 4]
    last_eval = [h["eval_loss"] for h in history if "eval_loss" in h][-1]
    assert summary["eval"]["loss"] == summary["eval"]["steps"][-1]["loss"] == last_eval
    assert summary["eval"]["data"]["samples"] == summary["eval"]["data"]["kept"] > 0  # counted as data.train
    bench = summary["eval"]["benchmark"]
    assert bench["accuracy"] == bench_rows[-1]["eval_vqa_accuracy"]
    assert "eval_vqa_accuracy" in {k for row in summary["log_history"] for k in row}

    # report.png's panels, redrawn from summary.json as `python -m llava_ft.report` does.
    fig = draw_report(saved_log_history(out), summary)
    assert line_data(axis(fig, "loss"))["eval"] == ([2, 4], [s["loss"] for s in summary["eval"]["steps"]])
    assert line_data(axis(fig, "evaluation accuracy"))["vqa_accuracy"] == ([4], [bench["accuracy"]])
    assert (out / "report.png").is_file()

    tags = scalars(out)
    assert [step for step, _ in tags["eval/loss"]] == [2, 4]
    assert tags["eval/vqa_accuracy"] == [(4, pytest.approx(bench["accuracy"]))]

    # The same items scored independently on the saved stage by the eval script: same answers, same score.
    again = tmp_path / "again"
    argv = ["--checkpoint", str(out), "--data", str(bench_file), "--images", str(shapes.images_dir)]
    assert vqa.main([*argv, "--output", str(again), "--limit", "3", "--prompt-suffix", ""]) == 0
    results = json.loads((again / "results.json").read_text())
    assert results["headline"]["value"] == pytest.approx(bench["accuracy"])
    live = read_predictions(out / BENCHMARK_FOLDER / "step-4" / "predictions.jsonl", "question_id")
    saved = read_predictions(again / "predictions.jsonl", "question_id")
    assert {k: r["prediction"] for k, r in live.items()} == {k: r["prediction"] for k, r in saved.items()}


def test_val_size_with_packing_evaluates_at_each_epoch_end(llava_cfg, tmp_path):
    out = tmp_path / "out"
    cfg = llava_cfg(out, stage="pretrain", llm_mode="frozen", max_steps=-1, epochs=2)
    cfg.data.val_size = 0.25
    cfg.data.packing = True
    cfg.data.max_length = 96
    cfg.train.batch_size = 8
    stage = train(cfg)
    steps = [h["step"] for h in stage.trainer.state.log_history if "eval_loss" in h]
    per_epoch = stage.trainer.state.max_steps // 2
    assert steps == [per_epoch, 2 * per_epoch]
    summary = stage.summary
    assert summary["eval"]["data"]["val_size"] == 0.25
    held = summary["eval"]["data"]["samples"]
    assert held > 0
    # Training counts only what it trained on: the held-out samples are not among them.
    assert summary["data"]["kept"] - held == summary["samples"] // 2


def fake_dataset(sizes: list[int]) -> SFTDataset:
    """An SFTDataset of len(sizes) files, sample i's source `i`."""
    parts, i = [], 0
    for n in sizes:
        rows = {
            "input_ids": [[1, 2]] * n,
            "labels": [[1, 2]] * n,
            "images": [[]] * n,
            "image_tokens": [[]] * n,
            "source": [str(i + k) for k in range(n)],
            "length": [2] * n,
        }
        parts.append((datasets.Dataset.from_dict(rows), Path(".")))
        i += n
    return SFTDataset(parts)


def sources(ds: SFTDataset) -> list[str]:
    return [str(ds._row(i)[1]["source"]) for i in range(len(ds))]


def test_val_size_split_is_disjoint_and_deterministic():
    ds = fake_dataset([7, 13])
    rest, held = split_off(ds, 5, seed=3)
    assert len(held) == 5 and len(rest) == 15
    assert sorted(sources(rest) + sources(held), key=int) == [str(i) for i in range(20)]
    assert not set(sources(rest)) & set(sources(held))
    assert sources(held) == sources(split_off(ds, 5, seed=3)[1])  # same seed, same split
    assert sources(held) != sources(split_off(ds, 5, seed=4)[1])
    assert len(split_off(ds, 0.25, seed=3)[1]) == 5  # a fraction of the samples
    assert np.all(np.diff([int(s) for s in sources(rest)]) > 0)  # order kept
    with pytest.raises(ConfigError, match="leaves no training samples"):
        split_off(ds, 20, seed=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"data.eval": [{"path": "v.json"}], "data.val_size": 0.1},
            "data.eval and data.val_size are both set",
        ),
        ({"data.val_size": 1.5}, "data.val_size must be a count >= 1 or a fraction between 0 and 1"),
        ({"data.val_size": 0}, "data.val_size must be a count >= 1"),
        ({"train.eval_steps": 10}, "train.eval_steps needs an eval set: set data.eval or data.val_size"),
        (
            {"data.val_size": 10, "train.eval_strategy": "steps"},
            "train.eval_strategy steps needs train.eval_steps > 0",
        ),
        (
            {"train.eval_benchmark": {"kind": "vqa", "data": "q.jsonl"}},
            "train.eval_benchmark.images: vqa needs the image folder",
        ),
        (
            {"train.eval_benchmark": {"kind": "gqa", "data": "q"}},
            "train.eval_benchmark.kind: 'gqa' is not one",
        ),
    ],
)
def test_eval_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_eval_aliases_and_zero3_refusal(tmp_path):
    cfg = load_config(
        None, {"data.val_size": 4, "train.per_device_eval_batch_size": 3, "train.eval_steps": 5}
    )
    assert (cfg.train.eval_batch_size, cfg.train.eval_steps, cfg.data.val_size) == (3, 5, 4)
    # As TrainingArguments spells it; YAML alone would read an unquoted `no` as false.
    assert load_config(None, parse_overrides(["--train.eval_strategy", "no"])).train.eval_strategy == "no"
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  eval_strategy: no\n")
    assert load_config(path).train.eval_strategy == "no"
    bench = tmp_path / "q.tsv"
    bench.write_text("index\n")
    zero3 = Path(__file__).parents[2] / "configs" / "deepspeed" / "zero3.json"
    overrides = {
        "train.eval_benchmark": {"kind": "mmbench", "data": str(bench)},
        "train.deepspeed": str(zero3),
    }
    with pytest.raises(ConfigError, match="cannot run under ZeRO-3") as err:
        load_config(None, overrides, for_training=True)
    assert "\n" not in str(err.value)
    missing = {"train.eval_benchmark": {"kind": "mmbench", "data": str(tmp_path / "none.tsv")}}
    with pytest.raises(ConfigError, match="train.eval_benchmark.data: .*none.tsv: no such file"):
        load_config(None, missing, for_training=True)


def test_resume_with_an_eval_set_matches_the_uninterrupted_run(llava_cfg, tmp_path):
    """The held-out split and the eval loop leave the trained weights and the eval losses of a resumed run as
    an uninterrupted run's."""
    kwargs = dict(
        stage="finetune", llm_mode="lora", max_steps=6, save_steps=3, save_total_limit=5, eval_steps=3
    )

    def cfg(out):
        c = llava_cfg(tmp_path / out, **kwargs)
        c.data.val_size = 8
        return c

    full = train(cfg("full"))
    train(cfg("cut"), callbacks=[StopAt(3)])
    resumed = train(cfg("cut"), resume=True)
    for (name, p), (_, q) in zip(
        full.model.named_parameters(), resumed.model.named_parameters(), strict=True
    ):
        if p.requires_grad:
            assert torch.allclose(p, q, atol=1e-5), name
    losses = [s["loss"] for s in full.summary["eval"]["steps"]]
    assert [s["step"] for s in resumed.summary["eval"]["steps"]] == [3, 6]
    assert [s["loss"] for s in resumed.summary["eval"]["steps"]] == pytest.approx(losses, abs=1e-5)
