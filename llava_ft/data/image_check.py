"""Every image the records name, opened and fully decoded once before training, in forked processes.

A file's verdict is `image_problem`'s answer (images.py: what `load_image` refuses). Verdicts are kept in the
prepared-data cache folder, one Arrow file per image folder, `<cache>/image-verdicts/<hash of the folder>.arrow`,
a row per file: path (relative to the folder), size, mtime_ns, problem (null: readable). A warm start stats
each image and decodes none; a file whose size or modification time changed is decoded again. The file is
replaced atomically and names its checker (images.py and PIL): another checker's verdicts are not reused.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
from tqdm.auto import tqdm

from llava_ft.data import images
from llava_ft.data.forked import Progress, run_forked
from llava_ft.data.images import image_problem
from llava_ft.data.prepare import cpu_budget, default_cache_dir
from llava_ft.files import atomic_path

log = logging.getLogger("llava_ft")

VERDICTS_DIR = "image-verdicts"
# Below this many images to decode, one process: forking a large parent costs more than it saves.
AUTO_MIN_IMAGES = 256
_SCHEMA = pa.schema(
    [("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("problem", pa.string())]
)
_PROGRESS_EVERY = 64


@dataclass
class ImageCheck:
    problems: dict[str, str]
    """Path as the records write it -> what is wrong with it; the readable images are not in it."""
    images: int
    """Distinct images named."""
    missing: int
    """Of them, no file (or not a regular file)."""
    decoded: int
    """Opened and decoded now; the others' verdicts came from the cache."""
    processes: int
    seconds: float

    def summary(self) -> str:
        cached = self.images - self.missing - self.decoded
        return (
            f"images {self.images}: {len(self.problems)} bad ({self.missing} missing), {self.decoded} decoded "
            f"({self.processes} process(es)), {cached} known from the cache, {self.seconds:.1f} s"
        )


def checker_version() -> str:
    """What a verdict depends on besides the file: the rules (images.py) and the decoder (PIL)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(Path(images.__file__).read_bytes())
    h.update(f"{PIL.__version__} {images.MAX_PIXELS}".encode())
    return h.hexdigest()


def verdicts_file(folder: str | os.PathLike, cache_dir: str | os.PathLike | None) -> Path:
    """Where the verdicts of the images in `folder` are kept."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    digest = hashlib.blake2b(str(Path(folder).resolve()).encode(), digest_size=16).hexdigest()
    return root / VERDICTS_DIR / f"{digest}.arrow"


def check_images(
    folder: str | os.PathLike,
    paths: Iterable[str],
    *,
    num_proc: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> ImageCheck:
    """The verdict on each distinct image of `paths` (relative to `folder`): a stat each, a decode for those
    the cache does not know. `num_proc` None: this process's CPUs (capped, see `cpu_budget`) when there are
    many to decode, else 1."""
    started = time.perf_counter()
    names = sorted(set(paths))
    problems, current = _stat_all(folder, names)
    missing = len(problems)
    file = verdicts_file(folder, cache_dir) if use_cache else None
    checker = checker_version()
    cached = _read_verdicts(file, checker) if file is not None else None
    verdicts, known = _reuse(current, cached)
    todo = np.flatnonzero(~known).tolist()
    present = current["path"].to_pylist()
    processes = _processes(len(todo), num_proc, alone=use_cache)
    for row, problem in zip(todo, _decode_all(folder, [present[i] for i in todo], processes, progress)):
        verdicts[row] = problem
    problems.update((name, p) for name, p in zip(present, verdicts) if p is not None)
    if file is not None and todo:
        fresh = current.append_column("problem", pa.array(verdicts, pa.string()))
        _write_verdicts(file, checker, fresh, cached)
    return ImageCheck(
        dict(sorted(problems.items())),
        len(names),
        missing,
        len(todo),
        processes,
        time.perf_counter() - started,
    )


def _stat_all(folder: str | os.PathLike, names: list[str]) -> tuple[dict[str, str], pa.Table]:
    """(name -> problem for those that are no readable file, a table path/size/mtime_ns of the others)."""
    problems: dict[str, str] = {}
    present, sizes, mtimes = [], [], []
    for name in names:
        try:
            st = os.stat(os.path.join(folder, name))
        except (FileNotFoundError, NotADirectoryError):
            problems[name] = f"file not found in {folder}"
            continue
        except OSError as e:
            problems[name] = f"cannot be read ({type(e).__name__}: {e.strerror})"
            continue
        if not stat.S_ISREG(st.st_mode):
            problems[name] = f"not a file in {folder}"
            continue
        present.append(name)
        sizes.append(st.st_size)
        mtimes.append(st.st_mtime_ns)
    current = pa.table(
        [pa.array(present, pa.string()), pa.array(sizes, pa.int64()), pa.array(mtimes, pa.int64())],
        names=["path", "size", "mtime_ns"],
    )
    return problems, current


def _reuse(current: pa.Table, cached: pa.Table | None) -> tuple[list[str | None], np.ndarray]:
    """Per row of `current`: the cached verdict, and whether there is one for its path, size and mtime_ns."""
    verdicts: list[str | None] = [None] * len(current)
    known = np.zeros(len(current), dtype=bool)
    if cached is None or not len(current):
        return verdicts, known
    at = pa.compute.index_in(current["path"], value_set=cached["path"]).fill_null(-1).to_numpy()
    rows = np.flatnonzero(at >= 0)
    same = (cached["size"].to_numpy()[at[rows]] == current["size"].to_numpy()[rows]) & (
        cached["mtime_ns"].to_numpy()[at[rows]] == current["mtime_ns"].to_numpy()[rows]
    )
    rows = rows[same]
    known[rows] = True
    found = cached["problem"].take(at[rows])
    bad = np.flatnonzero(found.is_valid().to_numpy(zero_copy_only=False))  # the readable ones stay None
    for row, problem in zip(rows[bad].tolist(), found.take(bad).to_pylist()):
        verdicts[row] = problem
    return verdicts, known


def _processes(count: int, num_proc: int | None, *, alone: bool) -> int:
    if count == 0:
        return 0
    if num_proc is None:
        num_proc = 1 if count < AUTO_MIN_IMAGES else cpu_budget(alone=alone)
    # At least a few images per process: each costs a fork.
    return max(1, min(num_proc, math.ceil(count / 4)))


def _decode_all(
    folder: str | os.PathLike, names: list[str], processes: int, progress: bool
) -> list[str | None]:
    """image_problem of each name, in order: here for one process, else process k takes every k-th name."""
    if not names:
        return []
    with tqdm(
        desc="checking images", unit=" img", total=len(names), disable=not progress, mininterval=1.0
    ) as bar:
        if processes <= 1:
            return _decode(folder, names, bar.update)
        parts = run_forked(
            [_job(folder, names[k::processes]) for k in range(processes)],
            what="image check",
            progress=lambda done: bar.update(done - bar.n),
        )
    out: list[str | None] = [None] * len(names)
    for k, part in enumerate(parts):
        out[k::processes] = part
    return out


def _job(folder: str | os.PathLike, names: list[str]):
    return lambda progress: _decode(folder, names, progress)


def _decode(folder: str | os.PathLike, names: list[str], progress: Progress) -> list[str | None]:
    out, reported = [], 0
    for i, name in enumerate(names, start=1):
        out.append(image_problem(os.path.join(folder, name)))
        if i % _PROGRESS_EVERY == 0 or i == len(names):
            progress(i - reported)
            reported = i
    return out


def _read_verdicts(file: Path, checker: str) -> pa.Table | None:
    """The stored verdicts, or None when there are none of this checker (absent, damaged: decoded again)."""
    if not file.is_file():
        return None
    try:
        with pa.memory_map(str(file)) as source:
            table = pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowInvalid) as e:
        log.warning("image verdicts %s unreadable (%s): the images are decoded again", file, e)
        return None
    if (table.schema.metadata or {}).get(b"checker") != checker.encode() or not table.schema.equals(_SCHEMA):
        return None
    return table


def _write_verdicts(file: Path, checker: str, fresh: pa.Table, cached: pa.Table | None) -> None:
    """`fresh` (the verdicts of the images named now) and the cached ones of other images (named by other data
    files over the same folder), written under a temporary name that then replaces the file."""
    table = fresh
    if cached is not None:
        others = cached.filter(pa.compute.invert(pa.compute.is_in(cached["path"], value_set=fresh["path"])))
        table = pa.concat_tables([others.cast(_SCHEMA), fresh.cast(_SCHEMA)])
    table = table.cast(_SCHEMA).replace_schema_metadata({"checker": checker})
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(file) as tmp:
            options = pa.ipc.IpcWriteOptions(compression="zstd")
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema, options=options) as w:
                w.write_table(table)
    except OSError as e:  # a read-only cache folder costs the next run a decode, not this run its data
        log.warning("image verdicts not saved to %s (%s)", file, e)
