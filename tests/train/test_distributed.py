"""Two processes (torchrun, gloo on CPU) finetune on mixed image / text-only batches without hanging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava_ft.config import DataSource, EvalBenchmarkSection, dump_config

CONFIGS = Path(__file__).parents[2] / "configs"


def mixed_records(shapes, out: Path) -> Path:
    records = json.loads(shapes.finetune.read_text())
    with_image = [r for r in records if "image" in r][:12]
    text_only = [r for r in records if "image" not in r][:12]
    assert len(text_only) >= 2, "the shapes finetune set must hold text-only chat"
    # Text-only records are shorter: length grouping puts them into batches of their own, so in some steps one
    # rank sees only text while the other sees images (the case that hangs ZeRO-3 without a dummy image).
    mixed = [r for pair in zip(with_image, text_only * 6, strict=False) for r in pair]
    path = out / "mixed.json"
    path.write_text(json.dumps(mixed))
    return path


@pytest.mark.parametrize(
    ("deepspeed", "vision"),
    [(None, "frozen"), ("zero2.json", "frozen"), ("zero3.json", "frozen"), ("zero3.json", "full")],
)
def test_two_process_finetune(deepspeed, vision, llava_cfg, shapes, tmp_path):
    cfg = llava_cfg(tmp_path / "out", stage="finetune", llm_mode="lora", max_steps=4, batch_size=2)
    cfg.trainable.vision = vision
    if deepspeed:
        cfg.train.deepspeed = str(CONFIGS / "deepspeed" / deepspeed)
    cfg.data.train = [
        DataSource(path=str(mixed_records(shapes, tmp_path)), image_folder=str(shapes.images_dir))
    ]
    cfg.data.cache_dir = str(tmp_path / "cache")
    config = tmp_path / "ddp.yaml"
    dump_config(cfg, config)
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
    )
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "llava_ft.cli.main",
        "train",
        str(config),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("stage output:") == 1, proc.stdout  # printed by the main process only
    # One rank prepares the data while the other waits, then loads what it cached.
    prepared = [line for line in proc.stderr.splitlines() if "mixed.json (" in line]
    assert sum("(built," in line for line in prepared) == 1, prepared
    assert sum("(hit," in line for line in prepared) == 1, prepared
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 4
    # Throughput counts every rank's batches, not rank 0's alone.
    assert summary["samples"] == 4 * cfg.train.grad_accum * 2 * 2, summary["samples"]
    # Under ZeRO-3 parameters are sharded: the saved weights must be whole, not a rank's empty shard.
    from safetensors.torch import load_file

    tower = ["vision.safetensors"] if vision == "full" else []
    for name in ("projector.safetensors", "llm_adapter/adapter_model.safetensors", *tower):
        tensors = load_file(str(tmp_path / "out" / name))
        assert tensors and all(t.numel() > 0 for t in tensors.values()), name


def test_two_process_resume_counts_the_whole_run(llava_cfg, shapes, tmp_path):
    """Checkpoints hold the run's totals summed over both processes; a resumed run's summary adds them back."""
    cfg = llava_cfg(
        tmp_path / "out", stage="finetune", llm_mode="lora", max_steps=4, batch_size=2, save_steps=2
    )
    cfg.data.train = [
        DataSource(path=str(mixed_records(shapes, tmp_path)), image_folder=str(shapes.images_dir))
    ]
    cfg.data.cache_dir = str(tmp_path / "cache")
    dump_config(cfg, tmp_path / "ddp.yaml")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "llava_ft.cli.main", "train"]
    proc = subprocess.run(
        [*cmd, str(tmp_path / "ddp.yaml")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    full = json.loads((tmp_path / "out" / "summary.json").read_text())
    per_step = cfg.train.grad_accum * 2 * 2
    assert full["samples"] == 4 * per_step
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["LlavaRunTotals"]["counts"]["samples"] == 2 * per_step

    resume = ["--resume", str(tmp_path / "out" / "checkpoint-2")]
    proc = subprocess.run([*cmd, str(tmp_path / "ddp.yaml"), *resume], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = json.loads((tmp_path / "out" / "summary.json").read_text())
    for key in ("samples", "tokens", "tokens_trained"):
        assert resumed[key] == full[key], key


@pytest.mark.parametrize("deepspeed", [None, "zero3.json"])
def test_two_process_eval_loss_and_benchmark(deepspeed, llava_cfg, shapes, tmp_path):
    """Under torchrun the eval loss covers the held-out samples of both ranks and the benchmark (first process
    only; refused under ZeRO-3, where the eval loss alone runs) is logged once per epoch end."""
    from llava_ft.demo.prepare import write_heldout_vqa

    cfg = llava_cfg(
        tmp_path / "out", stage="finetune", llm_mode="lora", max_steps=4, batch_size=2, eval_steps=2
    )
    cfg.data.val_size = 6
    cfg.data.cache_dir = str(tmp_path / "cache")
    bench = write_heldout_vqa(shapes, tmp_path / "heldout_vqa.jsonl")
    if deepspeed:
        cfg.train.deepspeed = str(CONFIGS / "deepspeed" / deepspeed)
    else:
        cfg.train.eval_benchmark = EvalBenchmarkSection(
            kind="vqa", data=str(bench), images=str(shapes.images_dir), limit=3, prompt_suffix=""
        )
    dump_config(cfg, tmp_path / "ddp.yaml")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu")  # fmt: skip
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "llava_ft.cli.main", "train"]
    proc = subprocess.run([*cmd, str(tmp_path / "ddp.yaml")], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [s["step"] for s in summary["eval"]["steps"]] == [2, 4]
    assert summary["eval"]["data"]["samples"] == 6
    rows = [r for r in summary["log_history"] if "eval_vqa_accuracy" in r]
    assert [r["step"] for r in rows] == ([] if deepspeed else [4])
    if not deepspeed:
        assert (
            len(
                (tmp_path / "out" / "eval_benchmark" / "step-4" / "predictions.jsonl")
                .read_text()
                .splitlines()
            )
            == 3
        )
