import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llava_ft import files
from llava_ft.files import (
    atomic_dir,
    atomic_path,
    atomic_write_text,
    exchange,
    host_id,
    parse_leftover,
    sweep_leftovers,
    temp_name,
)
from llava_ft.stage import CONFIG_NAME, load_stage
from llava_ft.testing.tiny_llava import write_tiny_stage_output


def test_atomic_path_replaces_only_when_complete(tmp_path: Path):
    target = tmp_path / "config.yaml"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary left behind
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"  # invisible until the block completes
    assert target.read_text() == "new"


def test_atomic_dir_keeps_the_old_folder_on_failure(tmp_path: Path):
    target = tmp_path / "llm"
    atomic_dir(target, lambda d: (d / "a.txt").write_text("1"))

    def fail(d: Path) -> None:
        (d / "a.txt").write_text("2")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_dir(target, fail)
    assert (target / "a.txt").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["llm"]
    atomic_dir(target, lambda d: (d / "b.txt").write_text("3"))
    assert [p.name for p in target.iterdir()] == ["b.txt"]


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_atomic_dir_refuses_a_non_folder_before_writing(tmp_path: Path, kind: str):
    """A file at the destination was once moved aside, then rmtree failed on it after the write."""
    target = tmp_path / "out"
    if kind == "file":
        target.write_text("an old file")
    else:
        (tmp_path / "real").mkdir()
        target.symlink_to(tmp_path / "real")
    written = []
    with pytest.raises(FileExistsError, match="out: exists and is not a folder"):
        atomic_dir(target, written.append)
    assert written == []  # refused before any work
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if kind == "file" else ["out", "real"])


# ---------------------------------------------------------------- leftovers of killed runs and folder swaps


def _dead_pid() -> int:
    """The pid of a process that has ended (not reused this soon on a machine with free pids)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftover(folder: Path, name: str, kind: str, *, host: str | None = None, pid: int, folder_: bool = True):
    path = folder / temp_name(name, kind, host=host, pid=pid)
    if folder_:
        path.mkdir()
        (path / "weights.bin").write_bytes(b"\0" * 3000)
    else:
        path.write_bytes(b"\0" * 3000)
    return path


def test_sweep_removes_a_dead_owners_leftovers_and_keeps_live_and_other_hosts(tmp_path: Path, caplog):
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (tmp_path / "llm_adapter").mkdir()
        removed = {
            _leftover(tmp_path, "llm_adapter", "new", pid=dead),
            _leftover(tmp_path, "llm_adapter", "old", pid=dead),  # its folder is present: not needed
            _leftover(tmp_path, "projector.safetensors", "tmp", pid=dead, folder_=False),
            _leftover(tmp_path, "abc123", "partial", pid=dead),
        }
        kept = {
            _leftover(tmp_path, "llm", "new", pid=live.pid),  # another process on this machine, writing
            _leftover(tmp_path, "llm", "new", pid=os.getpid()),
            _leftover(tmp_path, "llm", "new", host="other-node.cluster", pid=dead),  # a shared file system
            tmp_path / ".llm.new-x",  # not named by an owner
            tmp_path / "checkpoint-5",
        }
        for p in kept:
            p.mkdir(exist_ok=True)
        with caplog.at_level(logging.INFO, logger="llava_ft"):
            assert set(sweep_leftovers(tmp_path)) == removed
        assert {p for p in tmp_path.iterdir()} == kept | {tmp_path / "llm_adapter"}
        (line,) = [r.getMessage() for r in caplog.records]
        assert f"{tmp_path}: removed 4 leftover(s) of killed runs (11.7 KB freed)" in line
        assert sweep_leftovers(tmp_path) == [] and sweep_leftovers(tmp_path / "absent") == []
    finally:
        live.kill()
        live.wait()


def test_temporaries_are_named_after_their_owner(tmp_path: Path):
    seen = []
    with atomic_path(tmp_path / "a.json") as tmp:
        seen.append(tmp)
        tmp.write_text("{}")
    atomic_dir(tmp_path / "llm", seen.append)
    for p in seen:
        t = parse_leftover(p)
        assert t is not None and (t.host, t.pid) == (host_id(), os.getpid()), p.name
    assert [t.kind for t in map(parse_leftover, seen)] == ["tmp", "new"]
    assert parse_leftover(Path(".x.new-node-7")) is None and parse_leftover(Path("x.new-node-7-12-3")) is None
    t = parse_leftover(Path(".model.v2.old-node-7.lan-12-3"))
    assert (t.name, t.kind, t.host, t.pid) == ("model.v2", "old", "node-7.lan", 12)


# A child that replaces a folder (atomic_dir's own, or a stage output's llm_adapter while saving a retrained
# stage) and dies (os._exit: no cleanup runs) between the two renames or after the swap.
KILLED_REPLACE = """
import os, shutil, sys
from pathlib import Path
from llava_ft import files

where, target = sys.argv[1], Path(sys.argv[2])
if where == "between the renames":
    files._renameat2 = None  # the two-rename path of systems without RENAME_EXCHANGE
    real_replace = os.replace
    def replace(a, b):
        real_replace(a, b)
        if Path(b).name.startswith(f".{target.name}.old-"):
            os._exit(9)
    os.replace = replace
else:  # after the swap, before the old copy is removed
    real_rmtree = shutil.rmtree
    def rmtree(path, *args, **kwargs):
        if Path(path).name.startswith(f".{target.name}.new-"):
            os._exit(9)
        real_rmtree(path, *args, **kwargs)
    shutil.rmtree = rmtree
if len(sys.argv) > 3:
    from llava_ft.testing.tiny_llava import write_tiny_stage_output
    write_tiny_stage_output(Path(sys.argv[3]), target.parent, seed=2)
else:
    files.atomic_dir(target, lambda d: (d / "a.txt").write_text("new"))
"""


def _killed_replace(where: str, target: Path, *tiny_root: Path) -> None:
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])}
    argv = [sys.executable, "-c", KILLED_REPLACE, where, str(target), *map(str, tiny_root)]
    assert subprocess.run(argv, env=env).returncode == 9


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2 is Linux's")
def test_replacing_a_folder_is_one_swap_that_a_kill_cannot_split(tmp_path: Path):
    target = tmp_path / "out"
    atomic_dir(target, lambda d: (d / "a.txt").write_text("old"))
    other = tmp_path / "other"
    other.mkdir()
    assert exchange(other, target)  # RENAME_EXCHANGE works here
    assert (other / "a.txt").read_text() == "old" and not any(target.iterdir())
    assert exchange(other, target) and (target / "a.txt").read_text() == "old"
    other.rmdir()

    _killed_replace("after the swap", target)
    assert [p.name for p in target.iterdir()] == ["a.txt"] and (target / "a.txt").read_text() == "new"
    (left,) = [p for p in tmp_path.iterdir() if p != target]  # the old copy, under the temporary's name
    assert sweep_leftovers(tmp_path) == [left]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_kill_between_the_two_renames_is_undone_by_the_sweep(tmp_path: Path):
    target = tmp_path / "out"
    atomic_dir(target, lambda d: (d / "a.txt").write_text("old"))
    _killed_replace("between the renames", target)
    assert not target.exists()
    assert sorted(parse_leftover(p).kind for p in tmp_path.iterdir()) == ["new", "old"]
    sweep_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["a.txt"] and (target / "a.txt").read_text() == "old"


def test_without_exchange_a_folder_is_still_replaced(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(files, "_renameat2", None)
    target = tmp_path / "out"
    atomic_dir(target, lambda d: (d / "a.txt").write_text("1"))
    atomic_dir(target, lambda d: (d / "b.txt").write_text("2"))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["b.txt"]


@pytest.mark.parametrize("where", ["after the swap", "between the renames"])
def test_a_stage_killed_while_replacing_a_part_is_completed_by_the_next_save(tiny_root, tmp_path, where):
    out = tmp_path / "stage"
    write_tiny_stage_output(tiny_root, out, seed=1)
    before = load_file(out / "llm_adapter" / "adapter_model.safetensors")
    if where == "after the swap" and sys.platform != "linux":
        pytest.skip("renameat2 is Linux's")
    _killed_replace(where, out / "llm_adapter", tiny_root)

    # The part being replaced when the kill came: present and whole (the new one), or put back by the sweep.
    adapter = out / "llm_adapter" / "adapter_model.safetensors"
    if where == "between the renames":
        assert not adapter.exists()
        sweep_leftovers(out)
        after = load_file(adapter)
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    else:
        after = load_file(adapter)
        assert after.keys() == before.keys() and any(not torch.equal(after[k], before[k]) for k in before)
    assert not (out / CONFIG_NAME).exists()  # the stage is incomplete until a save finishes

    write_tiny_stage_output(tiny_root, out, seed=2)  # the rerun
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no leftovers
    reference = write_tiny_stage_output(tiny_root, tmp_path / "reference", seed=2)
    ids = torch.tensor([[5, 9, 11, 3, 7, 2]])
    with torch.no_grad():
        logits = [
            load_stage(s).model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            for s in (out, reference)
        ]
    assert torch.equal(*logits)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_default_modes_minus_the_umask(tmp_path: Path, umask: int):
    """safetensors creates its files 0600 and mkdtemp-like writers make 0700 folders; what atomic_dir and
    atomic_path leave is readable as a plain save_pretrained folder would be (0666/0777 minus the umask)."""
    from safetensors.torch import save_file

    def write(d: Path) -> None:
        save_file({"w": torch.zeros(2)}, d / "model.safetensors")
        (d / "sub").mkdir(mode=0o700)
        (d / "sub" / "tool.sh").write_text("#!/bin/sh\n")
        (d / "sub" / "tool.sh").chmod(0o700)

    old = os.umask(umask)
    try:
        atomic_dir(tmp_path / "export", write)
        with atomic_path(tmp_path / "projector.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, tmp)
    finally:
        os.umask(old)
    assert files.current_umask() == old

    def mode(p: Path) -> int:
        return p.stat().st_mode & 0o777

    assert mode(tmp_path / "export") == 0o777 & ~umask
    assert mode(tmp_path / "export" / "sub") == 0o777 & ~umask
    assert mode(tmp_path / "export" / "model.safetensors") == 0o666 & ~umask
    assert mode(tmp_path / "export" / "sub" / "tool.sh") == 0o777 & ~umask  # executable stays executable
    assert mode(tmp_path / "projector.safetensors") == 0o666 & ~umask
