"""Whether a run can write where it will: checked before the model loads, not found at the first save."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from llava_ft.config import ConfigError


def check_writable(folder: str | Path, what: str) -> None:
    """Raise a one-line ConfigError naming `what` (the setting), the path and the problem unless `folder` is, or
    can be made, a folder this process writes to. Checked by creating and removing a file, in the folder or in
    its nearest existing parent: permission bits alone do not tell (root passes os.access on a read-only mount).
    Nothing is created that the check leaves behind."""
    path = Path(folder).absolute()
    if problem := writable_problem(path):
        raise ConfigError(f"{what} {path}: {problem}")


def writable_problem(path: Path) -> str | None:
    if path.exists() and not path.is_dir():
        return "is a file, not a folder"
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot be created: {existing} is a file"
    try:
        fd, probe = tempfile.mkstemp(prefix=".llava_ft-write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        where = "not writable" if existing == path else f"cannot be created: {existing} is not writable"
        return f"{where} ({type(e).__name__}: {e.strerror or e})"
    return None
