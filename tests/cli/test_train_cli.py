"""`llava-ft train` as a user runs it: one process, no launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from llava_ft.config import DataSource, dump_config
from llava_ft.testing.tiny_llava import tiny_config

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
