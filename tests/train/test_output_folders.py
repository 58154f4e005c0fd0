"""Before the model loads: the output and cache folders are writable, and a folder of earlier checkpoints gets
advice that is true (whether --resume can continue it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llava_ft.config import ConfigError
from llava_ft.train import run
from llava_ft.train.preflight import preflight
from llava_ft.train.writable import check_writable, writable_problem


@pytest.fixture
def no_model(monkeypatch):
    """train() fails loudly if it gets as far as loading the model."""

    def build_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run, "build_model", build_model)


@pytest.fixture
def cfg(llava_cfg, tmp_path):
    def make(out: Path):
        c = llava_cfg(out, stage="finetune", llm_mode="lora")
        c.data.cache_dir = str(tmp_path / "cache")
        return c

    return make


def test_an_output_or_cache_path_that_is_a_file_or_under_one_fails_first(cfg, tmp_path, no_model):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=rf"^train\.output_dir {a_file}: is a file, not a folder$"):
        run.train(cfg(a_file))
    with pytest.raises(
        ConfigError, match=rf"^train\.output_dir {a_file}/out: cannot be created: {a_file} is a file$"
    ):
        run.train(cfg(a_file / "out"))
    c = cfg(tmp_path / "out")
    c.data.cache_dir = str(a_file / "cache")
    with pytest.raises(
        ConfigError, match=rf"^data\.cache_dir {a_file}/cache: cannot be created: {a_file} is a"
    ):
        run.train(c)
    c.data.cache = False  # no cache written: its folder is not checked
    with pytest.raises(AssertionError, match="the model was loaded"):
        run.train(c)
    assert not (tmp_path / "out").exists()  # checked, not created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # and no probe left behind


def test_a_folder_that_does_not_exist_yet_is_fine_and_left_uncreated(tmp_path):
    assert writable_problem(tmp_path / "a" / "b") is None and writable_problem(tmp_path) is None
    check_writable(tmp_path / "a" / "b", "train.output_dir")
    assert list(tmp_path.iterdir()) == []


_PROBLEMS = """
import json, sys
from pathlib import Path
from llava_ft.config import ConfigError
from llava_ft.train.writable import check_writable
folder = Path(sys.argv[1])
out = {}
for path in (folder, folder / "a" / "out"):
    try:
        check_writable(path, "train.output_dir")
        out[str(path)] = None
    except ConfigError as e:
        out[str(path)] = str(e)
print(json.dumps(out))
"""


def unwritable_problems(folder: Path) -> dict[str, str | None]:
    """check_writable's verdicts on `folder` and on a path under it, with `folder` unwritable: by its permissions
    for a user; for root, whom permissions do not stop, as a read-only mount in a mount namespace of its own
    (skipped where none can be made)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _PROBLEMS, str(folder)], capture_output=True, text=True
            )
        finally:
            folder.chmod(0o755)
    else:
        if shutil.which("unshare") is None:
            pytest.skip("root without unshare: no way to make a folder unwritable to this process")
        mount_then_run = 'mount -t tmpfs -o ro tmpfs "$1" && shift && exec "$@"'
        cmd = [
            "unshare",
            "--mount",
            "sh",
            "-c",
            mount_then_run,
            "sh",
            str(folder),
            sys.executable,
            "-c",
            _PROBLEMS,
        ]
        proc = subprocess.run(cmd + [str(folder)], capture_output=True, text=True)
        if proc.returncode != 0 and "Traceback" not in proc.stderr:
            pytest.skip(f"root, and no read-only mount can be made here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_an_unwritable_folder_or_parent_is_named(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    problems = unwritable_problems(folder)
    assert problems[str(folder)].startswith(f"train.output_dir {folder}: not writable (")
    assert problems[str(folder / "a" / "out")].startswith(
        f"train.output_dir {folder}/a/out: cannot be created: {folder} is not writable ("
    )
    assert all("\n" not in p for p in problems.values())


def incomplete_checkpoint(out: Path) -> None:
    """checkpoint-5 as a save cut short leaves it: weights, no trainer_state.json."""
    (out / "checkpoint-5").mkdir(parents=True)
    (out / "checkpoint-5" / "trainable.safetensors").write_bytes(b"")


def test_only_an_incomplete_checkpoint_gets_the_same_advice_with_and_without_resume(cfg, tmp_path, no_model):
    out = tmp_path / "run"
    incomplete_checkpoint(out)
    with pytest.raises(
        ConfigError,
        match=r"holds checkpoint-5 from an earlier run: none complete \(a save cut short\), nothing to resume; "
        r"--overwrite starts again and removes them$",
    ):
        run.train(cfg(out))
    with pytest.raises(
        FileNotFoundError,
        match=rf"^--resume: no complete checkpoint-N folder in {out}: checkpoint-5, none complete \(a save cut "
        r"short\); --overwrite without --resume starts again$",
    ):
        run.train(cfg(out), resume=True)


def test_an_incomplete_checkpoint_after_a_complete_one_is_resumable(cfg, tmp_path, no_model):
    out = tmp_path / "run"
    incomplete_checkpoint(out)
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    save_file({"w": torch.zeros(1)}, str(out / "checkpoint-3" / "trainable.safetensors"))
    with pytest.raises(
        ConfigError, match=r"holds checkpoint-3, checkpoint-5 from an earlier run: --resume continues"
    ):
        run.train(cfg(out))


def test_preflight_checks_the_real_output_folder_it_does_not_write(cfg, tmp_path, no_model):
    """--preflight trains into a temporary folder: the real output folder is checked all the same."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(
        ConfigError, match=rf"^train\.output_dir {a_file}/out: cannot be created: {a_file} is a"
    ):
        preflight(cfg(a_file / "out"))
