"""`llava-ft train` as a user runs it: one process, no launcher."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from llava_ft.cli.main import build_parser, main
from llava_ft.config import DataSource, dump_config
from llava_ft.testing.tiny_llava import tiny_config
from llava_ft.train.preflight import TEXT_QUESTION

CONFIGS = Path(__file__).parents[2] / "configs"


def test_deepspeed_runs_without_a_launcher(tmp_path):
    """DeepSpeed, started without torchrun, used to look for MPI ("No module named 'mpi4py'")."""
    cfg = tiny_config(tmp_path / "models", vision_backend=None)
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"sample {i} of a tiny corpus."}) + "\n" for i in range(8)))
    cfg.data.train = [DataSource(str(data), format="text")]
    cfg.data.template = "plain"
    cfg.data.max_length = 32
    cfg.data.cache = False
    cfg.train.output_dir = str(tmp_path / "out")
    cfg.train.batch_size = 2
    cfg.train.max_steps = 1
    cfg.train.report_to = "none"
    cfg.train.deepspeed = str(CONFIGS / "deepspeed" / "zero2.json")
    dump_config(cfg, tmp_path / "run.yaml")
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "llava_ft.cli.main", "train", str(tmp_path / "run.yaml")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("stage output:") == 1
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 1


def test_preflight_flag_parses_and_excludes_resume(capsys):
    parser = build_parser()
    assert parser.parse_args(["train", "run.yaml", "--preflight"]).preflight is True
    assert parser.parse_args(["train", "run.yaml"]).preflight is False
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "run.yaml", "--preflight", "--resume"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_preflight_prints_its_figures_and_writes_no_output(
    tmp_path, tiny_root, text_file, monkeypatch, capsys
):
    """Text-only data: the question is a text one; overrides reach the estimate (max_steps 7 -> 7 steps)."""
    cfg = tiny_config(tiny_root, vision_backend=None, llm_mode="full", template="plain")
    cfg.data.train = [DataSource(str(text_file), format="text")]
    cfg.data.max_length = 32
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.train.output_dir = str(tmp_path / "out")
    cfg.train.batch_size = 2
    dump_config(cfg, tmp_path / "run.yaml")
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))

    assert main(["train", str(tmp_path / "run.yaml"), "--preflight", "--train.max_steps", "7"]) == 0

    out = capsys.readouterr().out
    assert "stage output:" not in out
    for start in ("preflight: 2 optimizer steps on the longest samples", "step time: ", "peak memory: "):
        assert sum(line.startswith(start) for line in out.splitlines()) == 1, out
    assert f"question: {TEXT_QUESTION}" in out.splitlines()
    assert sum(line.startswith("answer: ") for line in out.splitlines()) == 1
    assert re.search(r"^estimate: 7 optimizer steps x [\d.e-]+ s = [\d.e-]+ h at most", out, re.M), out
    assert not (tmp_path / "out").exists()
    assert list(temp.iterdir()) == []
