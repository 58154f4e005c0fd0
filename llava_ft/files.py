"""Atomic writes: a file or folder is either its old self or complete, never half-written by a killed run.

Every temporary is named `.NAME.KIND-HOST-PID-N` after its owner process, so that `sweep_leftovers` can remove
what a killed run left in a folder while keeping what a live run (here, or on another node sharing the file
system) is writing. A replaced folder is swapped in with one renameat2(RENAME_EXCHANGE) where the system has it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import itertools
import logging
import os
import re
import shutil
import socket
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llava_ft.errors import DiskFullError, is_disk_full

log = logging.getLogger("llava_ft")

KINDS = ("tmp", "new", "old", "partial")
"""tmp: a file being written (atomic_path); new: a folder being written (atomic_dir); old: the folder a
two-rename replacement moved aside; partial: a prepared-data cache entry being built."""

_LEFTOVER = re.compile(rf"^\.(?P<name>.+?)\.(?P<kind>{'|'.join(KINDS)})-(?P<host>.+)-(?P<pid>\d+)-\d+$")
_sequence = itertools.count()


@functools.cache
def host_id() -> str:
    """This machine as seen by its processes: the host name, and the pid namespace where there is one, since
    containers sharing a host name (and a volume) each count pids from 1."""
    name = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return name
    return f"{name}.{re.sub(r'[^0-9]', '', namespace)}"


def temp_name(name: str, kind: str, *, host: str | None = None, pid: int | None = None) -> str:
    """The hidden name of a temporary for `name`, owned by this process unless `host`/`pid` say otherwise."""
    assert kind in KINDS, kind
    return f".{name}.{kind}-{host or host_id()}-{os.getpid() if pid is None else pid}-{next(_sequence)}"


def make_temp_dir(parent: Path, name: str, kind: str) -> Path:
    """A fresh folder `parent/temp_name(name, kind)`."""
    path = parent / temp_name(name, kind)
    path.mkdir()
    return path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to; it takes `path`'s place only if the block completes."""
    tmp = path.with_name(temp_name(path.name, "tmp"))
    try:
        yield tmp
        set_default_modes(tmp)
        with open(tmp, "rb") as f:  # durable before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        raise disk_full(path.parent, _disk_size(tmp)) from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def check_replaceable_dir(path: Path) -> None:
    """Refuse a `path` that `atomic_dir` could not replace: moving a file (or link) aside and then removing it as
    a folder would fail after the new folder was written, leaving a hidden `.name.old-…` behind. Callers with
    long work before `atomic_dir` call it first, so that such a path fails at once."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise FileExistsError(f"{path}: exists and is not a folder; refusing to replace it with one")


def atomic_dir(path: Path, write: Callable[[Path], object]) -> None:
    """write(tmpdir) fills a fresh folder beside `path` that then takes its place; a failure leaves `path` as it
    was, and `path` is never absent once it existed (after a kill between two renames, `sweep_leftovers` puts
    the old folder back)."""
    check_replaceable_dir(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(path.parent, path.name, "new")
    try:
        try:
            write(tmp)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
            if not is_disk_full(e):
                raise
            raise disk_full(path.parent, _disk_size(tmp)) from None
        set_default_modes(tmp)
        if not path.exists():
            os.replace(tmp, path)
        elif exchange(tmp, path):
            shutil.rmtree(tmp)  # the old folder, under the temporary's name
        else:
            old = path.with_name(temp_name(path.name, "old"))
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# ---------------------------------------------------------------- modes


def current_umask() -> int:
    """The process umask, read from /proc where it is shown (os.umask can only read it by changing it, which
    another thread creating a file at that moment would see)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_default_modes(path: Path) -> None:
    """Give `path` and, for a folder, everything under it the modes `open` and `mkdir` give by default: files
    0666 (0777 if the owner may execute them) and folders 0777, minus the umask. Links are left alone."""
    mask = current_umask()

    def fix(p: str, is_dir: bool) -> None:
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            return
        full = 0o777 if is_dir or st.st_mode & stat.S_IXUSR else 0o666
        if stat.S_IMODE(st.st_mode) != full & ~mask:
            os.chmod(p, full & ~mask)

    fix(os.fspath(path), path.is_dir() and not path.is_symlink())
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for n in dirs:
                fix(os.path.join(root, n), True)
            for n in files:
                fix(os.path.join(root, n), False)


# ---------------------------------------------------------------- atomic swap

AT_FDCWD = -100
RENAME_EXCHANGE = 2
# The file system or kernel lacks the flag: fall back to two renames.
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def _load_renameat2() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not glibc >= 2.28 (or not Linux)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


# ---------------------------------------------------------------- leftovers of killed runs


@dataclass(frozen=True)
class Leftover:
    path: Path
    name: str
    """The path it stands for (its folder's entry)."""
    kind: str
    host: str
    pid: int


def parse_leftover(path: Path) -> Leftover | None:
    """The owner of a temporary named by `temp_name`, or None for any other name."""
    m = _LEFTOVER.match(path.name)
    if m is None:
        return None
    return Leftover(path, m["name"], m["kind"], m["host"], int(m["pid"]))


def owner_alive(host: str, pid: int) -> bool:
    """Whether the owner may still be running: always for another machine (or pid namespace), whose processes
    cannot be seen from here; a reused pid also counts as alive, which only keeps a leftover longer."""
    if host != host_id():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_leftovers(folder: Path) -> list[Path]:
    """Remove the temporaries that dead processes of this machine left in `folder`, first putting back a folder
    that a kill between two renames left absent; logs one line with the space freed. Returns what it removed."""
    try:
        entries = sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    dead = [t for e in entries if (t := parse_leftover(e)) is not None and not owner_alive(t.host, t.pid)]
    for t in dead:
        target = folder / t.name
        if t.kind == "old" and not target.exists() and not target.is_symlink():
            try:
                os.replace(t.path, target)
            except FileNotFoundError:  # another run's sweep put it back first
                continue
            except OSError as e:
                log.warning("%s: could not put back %s: %s", target, t.path.name, e)
                continue
            log.warning(
                "%s: put back from %s (a replacement was killed between its renames)", target, t.path.name
            )
    removed, freed = [], 0
    for t in dead:
        if not t.path.exists() and not t.path.is_symlink():
            continue  # put back above, or removed by another run's sweep
        size = _disk_size(t.path)
        try:
            if t.path.is_dir() and not t.path.is_symlink():
                shutil.rmtree(t.path)
            else:
                t.path.unlink()
        except FileNotFoundError:
            continue
        except OSError as e:
            log.warning("%s: could not remove a killed run's leftover: %s", t.path, e)
            continue
        removed.append(t.path)
        freed += size
    if removed:
        names = ", ".join(p.name for p in removed)
        log.info(
            "%s: removed %d leftover(s) of killed runs (%s freed): %s",
            folder,
            len(removed),
            _size(freed),
            names,
        )
    return removed


def _disk_size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        try:
            return path.lstat().st_size
        except OSError:
            return 0
    total = 0
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, n)).st_size
    return total


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KB", "MB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def disk_full(folder: Path, needed: int | None = None) -> DiskFullError:
    """The one-line report for a full disk under `folder`: what is free there and, when known, what the write
    needed at least (what it had written when the disk filled)."""
    parts = [f"{folder}: no space left on the disk"]
    if needed:
        parts.append(f"the write needs more than {_size(needed)}")
    with contextlib.suppress(OSError):
        parts.append(f"{_size(shutil.disk_usage(folder).free)} free")
    return DiskFullError("; ".join(parts) + "; free some space or choose another folder")
