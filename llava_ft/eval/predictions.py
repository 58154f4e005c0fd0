"""predictions.jsonl: one record per answered item, appended after every batch and rewritten atomically, so an
interrupted run resumes from it; a last line cut off by a kill is dropped on reading and repaired before appending.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from llava_ft.data.conversation import DataError
from llava_ft.eval.jsonl import iter_jsonl, parse_line
from llava_ft.files import atomic_path

PREDICTIONS = "predictions.jsonl"


def read_predictions(path: Path, id_field: str) -> dict[str, dict]:
    """Records of a predictions file by str(id), in file order. Accepts `prediction` or LLaVA's `text` for the
    answer. A last line cut off mid-write is dropped with a warning (its item has no prediction)."""
    records: dict[str, dict] = {}
    for line_no, where, rec in iter_jsonl(path, drop_cut_tail=True):
        if not isinstance(rec, dict) or id_field not in rec:
            raise DataError(where, f"record has no '{id_field}' field")
        if "prediction" not in rec and "text" in rec:
            rec["prediction"] = rec["text"]
        if not isinstance(rec.get("prediction"), str):
            raise DataError(where, "record has no string 'prediction' (or 'text') field")
        key = str(rec[id_field])
        if key in records:
            raise DataError(
                where, f"{id_field} {rec[id_field]!r} already answered on line {records[key]['_line']}"
            )
        rec["_line"] = line_no
        records[key] = rec
    return records


def check_stored(path: Path, rec: dict, item_id: Any, prompt: str, settings: dict[str, Any] | None) -> None:
    """Refuse the stored record of `item_id` if it was asked with another prompt or (given this run's
    `settings`) other settings."""
    where = f"{path} line {rec['_line']}"
    if "prompt" in rec and rec["prompt"] != prompt:
        raise DataError(
            where,
            f"the prompt for id {item_id!r} differs from the one built now from the data (another data file "
            "or prompt option?); use a fresh --output directory",
        )
    # A setting the record lacks (written by another tool) cannot be checked and is accepted.
    for field, now in (settings or {}).items():
        if field in rec and rec[field] != now:
            raise DataError(
                where,
                f"predicted with {field} {rec[field]!r}, this run uses {now!r}; use a fresh --output directory",
            )


def seal_tail(path: Path) -> None:
    """Make `path` end with a newline before appending to it: a last line lacking its newline is completed if
    valid, or cut away if it is the cut-off write `read_predictions` dropped (else it would swallow the next
    record into one bad line)."""
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        start = data.rfind(b"\n") + 1
        try:
            parse_line(data[start:])
        except ValueError:
            f.truncate(start)
        else:
            f.write(b"\n")


def append_predictions(f, records: Iterable[dict]) -> None:
    """Append to an open predictions file and flush: an interrupted run keeps every batch written."""
    for rec in records:
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    f.flush()


def write_predictions(path: Path, records: Iterable[dict]) -> None:
    """Write atomically: a crash while rewriting must not lose the predictions a resume depends on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps({k: v for k, v in rec.items() if k != "_line"}, ensure_ascii=False) + "\n")
