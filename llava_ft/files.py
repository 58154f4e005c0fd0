"""Atomic writes: a file or folder is either its old self or complete, never half-written by a killed run."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to; it takes `path`'s place only if the block completes."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:  # durable before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def check_replaceable_dir(path: Path) -> None:
    """Refuse a `path` that `atomic_dir` could not replace: moving a file (or link) aside and then removing it as
    a folder would fail after the new folder was written, leaving a hidden `.name.oldNNN` behind. Callers with
    long work before `atomic_dir` call it first, so that such a path fails at once."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise FileExistsError(f"{path}: exists and is not a folder; refusing to replace it with one")


def atomic_dir(path: Path, write: Callable[[Path], object]) -> None:
    """write(tmpdir) fills a fresh folder beside `path` that then takes its place; a failure leaves `path` as it was."""
    check_replaceable_dir(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
