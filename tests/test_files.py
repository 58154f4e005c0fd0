from pathlib import Path

import pytest

from llava_ft.files import atomic_dir, atomic_path, atomic_write_text


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
