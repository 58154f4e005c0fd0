"""scripts/pretrain.sh and finetune.sh (through scripts/_stage.sh): the command they launch for one process,
NPROC processes on one machine and NNODES machines, run on a copy of the scripts whose setup, llava-ft and
torchrun only print what they were given."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """The stage scripts beside stand-ins for setup.sh and the venv's launchers, which echo their arguments."""
    (tmp_path / "scripts").mkdir()
    for name in ("_stage.sh", "pretrain.sh", "finetune.sh"):
        shutil.copy(ROOT / "scripts" / name, tmp_path / "scripts" / name)
    (tmp_path / "scripts" / "setup.sh").write_text("exit 0\n")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("torchrun", "llava-ft"):
        (bin_dir / tool).write_text(f'#!/usr/bin/env bash\necho "{tool} $*"\n')
        (bin_dir / tool).chmod(0o755)
    return tmp_path


def launch(clone: Path, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return subprocess.run(
        ["bash", str(clone / "scripts" / script), *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_one_process_runs_llava_ft(clone):
    out = launch(clone, "finetune.sh", "my.yaml", "--train.max_steps", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "llava-ft train my.yaml --train.max_steps 2"


def test_nproc_runs_torchrun_standalone(clone):
    out = launch(clone, "pretrain.sh", "my.yaml", NPROC="8")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torchrun --standalone --nproc_per_node 8 -m llava_ft.cli.main train my.yaml"


def test_several_machines_pass_the_rendezvous_to_torchrun(clone):
    out = launch(
        clone, "finetune.sh", "my.yaml", "--train.deepspeed", "z.json",
        NPROC="8", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="29600",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        "torchrun --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29600 --nproc-per-node 8 "
        "-m llava_ft.cli.main train my.yaml --train.deepspeed z.json"
    )


def test_several_machines_default_port_and_one_process_each(clone):
    out = launch(clone, "pretrain.sh", "my.yaml", NNODES="2", NODE_RANK="0", MASTER_ADDR="node0")
    assert out.returncode == 0, out.stderr
    assert "--master-port 29500 --nproc-per-node 1 " in out.stdout


@pytest.mark.parametrize("missing", ["NODE_RANK", "MASTER_ADDR"])
def test_several_machines_without_the_rendezvous_is_one_line(clone, missing):
    env = {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "node0"}
    del env[missing]
    out = launch(clone, "finetune.sh", "my.yaml", **env)
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1 and f"NNODES=2 needs {missing}" in out.stderr
