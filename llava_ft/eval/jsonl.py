"""JSONL files read line by line (benchmark records and predictions): a bad line names its file and line."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llava_ft.data.conversation import DataError

log = logging.getLogger("llava_ft")


def parse_line(raw: bytes) -> tuple[bool, Any]:
    """(blank, value) of one line; raises UnicodeDecodeError or JSONDecodeError."""
    text = raw.decode("utf-8")
    return (True, None) if not text.strip() else (False, json.loads(text))


def _line_problem(e: ValueError) -> str:
    return f"not valid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else "not valid UTF-8"


def iter_jsonl(path: Path, *, drop_cut_tail: bool = False) -> Iterator[tuple[int, str, Any]]:
    """(line number, "file line N", parsed value) for every non-blank line; a bad line names its line.

    With `drop_cut_tail`, a bad last line without a newline (a write cut off when a process was killed) is
    skipped with a warning: only the last line can lack its newline, and nothing after it was written.
    """
    # Bytes, decoded per line: a write cut inside a multi-byte character must be a bad line, not a crash.
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            where = f"{path} line {line_no}"
            try:
                blank, value = parse_line(raw)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                if drop_cut_tail and not raw.endswith(b"\n"):
                    log.warning("%s: %s and no newline: dropped as a write cut off", where, _line_problem(e))
                    return
                raise DataError(where, _line_problem(e)) from None
            if not blank:
                yield line_no, where, value


def require_fields(rec: Any, where: str, fields: tuple[str, ...]) -> dict:
    """A benchmark record: a JSON object holding every one of `fields`."""
    if not isinstance(rec, dict):
        raise DataError(where, "a record must be a JSON object")
    for field in fields:
        if field not in rec:
            raise DataError(where, f"missing field '{field}'")
    return rec


def unique_image(rec: dict, where: str, seen: dict[str, str], images: Path | None) -> Path | None:
    """`unique_images` for a benchmark of one image per question: `image` must be one file name."""
    if not isinstance(rec["image"], str):
        raise DataError(
            where, "field 'image' must be one file name (this benchmark takes one image per question)"
        )
    files = unique_images(rec, where, seen, images)
    return None if files is None else files[0]


def unique_images(rec: dict, where: str, seen: dict[str, str], images: Path | None) -> list[Path] | None:
    """The record's image files under `images`, in order (`image`: one file name or a non-empty list of them),
    once its question_id is checked not to repeat an earlier one (`seen`: question_id -> where it was first
    read). With `images` None (a re-score, which needs no pixels) no file is looked for and None is
    returned."""
    names = [rec["image"]] if isinstance(rec["image"], str) else rec["image"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise DataError(where, "field 'image' must be a file name or a non-empty list of file names")
    key = str(rec["question_id"])
    if key in seen:
        raise DataError(where, f"question_id {rec['question_id']!r} repeats {seen[key]}")
    seen[key] = where
    if images is None:
        return None
    files = [images / name for name in names]
    for file in files:
        if not file.is_file():
            raise DataError(where, f"field 'image': file {file} not found")
    return files
