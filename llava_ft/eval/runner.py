"""Shared benchmark machinery: the model interface, resumable batched prediction, provenance and reports.

Benchmarks (mmbench.py, pope.py, vqa.py) turn their data into `Item`s and score the predictions; everything
about asking the model, resuming and writing files lives here, so the three behave the same way.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from llava_ft.config import ConfigError
from llava_ft.data.conversation import DataError
from llava_ft.files import atomic_path
from llava_ft.inference import Query

PREDICTIONS = "predictions.jsonl"
UNKNOWN_CHECKPOINT = "(unknown: not recorded in the predictions file)"

log = logging.getLogger("llava_ft")


class Assistant(Protocol):
    """What evaluation needs from a model (llava_ft.inference.Assistant; tests use scripted fakes)."""

    def generate(self, queries: list[Query], *, max_new_tokens: int = 32) -> list[str]: ...

    def option_logprobs(self, queries: list[Query], options: list[str]) -> list[list[float]]: ...


def open_assistant(checkpoint: str, *, load_4bit: bool = False) -> Assistant:
    # Imported here so that scoring and tests never build a model.
    from llava_ft.inference import load_assistant

    return load_assistant(checkpoint, load_4bit=load_4bit)


def checkpoint_weights(checkpoint: str) -> str:
    from llava_ft.stage import stage_fingerprint

    return stage_fingerprint(checkpoint)


@dataclass
class Item:
    """One question to put to the model."""

    id: Any
    """The benchmark's own id (MMBench index, question_id), as written in predictions.jsonl."""
    prompt: str
    image: Callable[[], Any]
    """Loads the PIL image (or returns None) when its batch comes up, so a whole benchmark is never in memory."""


@dataclass
class Asking:
    """How predictions are obtained: by generation, or by comparing option log-probabilities."""

    assistant: Assistant
    checkpoint: str
    batch_size: int = 8
    max_new_tokens: int = 32
    options: list[str] | None = None
    """Set: likelihood mode; the prediction is the option with the highest log P(option | prompt)."""
    weights: str | None = None
    """Fingerprint of the checkpoint's weights (`stage_fingerprint`): a resume into predictions made by other
    weights under the same path (a retrained stage) is refused instead of silently mixing them."""
    load_4bit: bool = False
    """The model was loaded 4-bit quantised: recorded, since its answers differ from full precision's."""

    @property
    def mode(self) -> str:
        return "likelihood" if self.options else "generate"

    def settings(self) -> dict[str, Any]:
        """What every prediction record stores about how it was obtained; a resume must match each one.
        Only settings that change the answers: max_new_tokens in generate mode, the options in likelihood."""
        fields: dict[str, Any] = {"checkpoint": self.checkpoint, "mode": self.mode}
        if self.weights is not None:
            fields["weights"] = self.weights
        if self.options is None:
            fields["max_new_tokens"] = self.max_new_tokens
        else:
            fields["options"] = list(self.options)
        fields["load_4bit"] = self.load_4bit
        return fields


# ------------------------------------------------------------------------------------------ predictions


def _parse_line(raw: bytes) -> tuple[bool, Any]:
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
                blank, value = _parse_line(raw)
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
    """The record's image file under `images`, once its question_id is checked not to repeat an earlier one
    (`seen`: question_id -> where it was first read). With `images` None (a re-score, which needs no pixels)
    no file is looked for and None is returned."""
    key = str(rec["question_id"])
    if key in seen:
        raise DataError(where, f"question_id {rec['question_id']!r} repeats {seen[key]}")
    seen[key] = where
    if images is None:
        return None
    image = images / rec["image"]
    if not image.is_file():
        raise DataError(where, f"field 'image': file {image} not found")
    return image


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


def _check_previous(path: Path, rec: dict, item: Item, asking: Asking | None) -> None:
    where = f"{path} line {rec['_line']}"
    if "prompt" in rec and rec["prompt"] != item.prompt:
        raise DataError(
            where,
            f"the prompt for id {item.id!r} differs from the one built now from the data (another data file or "
            "prompt option?); use a fresh --output directory",
        )
    if asking is not None:
        # A setting the record lacks (an older version, another tool) cannot be checked and is accepted.
        for field, now in asking.settings().items():
            if field in rec and rec[field] != now:
                raise DataError(
                    where,
                    f"predicted with {field} {rec[field]!r}, this run uses {now!r}; use a fresh --output directory",
                )


def _seal_tail(path: Path) -> None:
    """Make `path` end with a newline before appending to it: a last line lacking its newline is completed if
    valid, or cut away if it is the cut-off write `read_predictions` dropped (else it would swallow the next
    record into one bad line)."""
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        start = data.rfind(b"\n") + 1
        try:
            _parse_line(data[start:])
        except ValueError:
            f.truncate(start)
        else:
            f.write(b"\n")


def collect_predictions(
    items: list[Item],
    output: Path,
    *,
    id_field: str,
    asking: Asking | None = None,
    predictions_file: Path | None = None,
    desc: str = "eval",
) -> tuple[dict[str, dict], int]:
    """The prediction record of every item (by str(id)) and how many were reused rather than asked now.

    With `asking`, items already in output/predictions.jsonl are skipped (resume) and new answers are
    appended after every batch, so an interrupted run loses at most one batch. With `predictions_file`,
    nothing is asked: every item must already have a prediction there.
    """
    if (asking is None) == (predictions_file is None):
        raise ValueError("give exactly one of asking (a model) or predictions_file (re-score)")
    if predictions_file is not None:
        records = read_predictions(predictions_file, id_field)
        own = output / PREDICTIONS
        if own.exists() and not os.path.samefile(predictions_file, own):
            # The re-score rewrites that file with what it scored: refuse if that loses an answer not in the source.
            lost = [k for k, rec in read_predictions(own, id_field).items()
                    if records.get(k, {}).get("prediction") != rec.get("prediction")]  # fmt: skip
            if lost:
                raise DataError(
                    str(own),
                    f"holds {len(lost)} prediction(s) not in {predictions_file} (first id: {lost[0]}) that the "
                    "re-score would replace: use a fresh --output",
                )
        missing = [it.id for it in items if str(it.id) not in records]
        if missing:
            raise DataError(
                str(predictions_file),
                f"no prediction for {len(missing)} of {len(items)} items (first: {missing[:5]}); "
                "use --limit to score a prefix",
            )
        for it in items:
            _check_previous(predictions_file, records[str(it.id)], it, None)
        return records, len(items)

    output.mkdir(parents=True, exist_ok=True)
    path = output / PREDICTIONS
    records = read_predictions(path, id_field) if path.exists() else {}
    for it in items:
        if str(it.id) in records:
            _check_previous(path, records[str(it.id)], it, asking)
    reused = sum(str(it.id) in records for it in items)
    if reused:
        # stderr, beside tqdm's bar: stdout carries only the score line.
        print(f"resuming: {reused} of {len(items)} predictions reused from {path}", file=sys.stderr)
    todo = [it for it in items if str(it.id) not in records]
    batches = [todo[i : i + asking.batch_size] for i in range(0, len(todo), asking.batch_size)]
    if path.exists():
        _seal_tail(path)
    with open(path, "a", encoding="utf-8") as f:
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not batches):
            for rec in _ask(batch, asking, id_field):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                records[str(rec[id_field])] = rec
            f.flush()
    return records, reused


class Chosen(list):
    """This run's prediction records in item order (what `predict` returns), carrying `stored`: every record of
    the predictions file in file order, this run's among them, so that `finish` rewrites the file without
    dropping the items this run left out (--limit)."""

    def __init__(self, chosen: Iterable[dict], stored: list[dict]):
        super().__init__(chosen)
        self.stored = stored


def predict(
    items: list[Item],
    output: Path,
    *,
    benchmark: str,
    rule: tuple[str, str],
    id_field: str,
    asking: Asking | Callable[[], Asking] | None,
    predictions_file: str | Path | None,
    data: Path,
    command: str,
) -> tuple[list[dict], dict]:
    """Every item's prediction record in item order (asked, resumed, or read from `predictions_file`; a `Chosen`
    for `finish`) and the head of results.json: benchmark, rule, provenance, mode and reused predictions.
    `asking` may be a function giving it (`lazy_asking`): the model then loads after the items read cleanly."""
    if callable(asking):
        asking = asking()
    pred_path = Path(predictions_file) if predictions_file else None
    records, reused = collect_predictions(
        items, output, id_field=id_field, asking=asking, predictions_file=pred_path, desc=benchmark
    )
    mine = [records[str(it.id)] for it in items]
    own = output / PREDICTIONS
    # A re-score into another folder writes only what it scored; into its own file, it keeps the rest.
    keeps_rest = pred_path is None or (own.exists() and os.path.samefile(pred_path, own))
    chosen = Chosen(mine, list(records.values()) if keeps_rest else mine)
    head = {
        "benchmark": benchmark,
        "rule": {"name": rule[0], "description": rule[1]},
        **provenance(chosen, asking=asking, data=data, command=command, predictions_file=pred_path),
        "mode": asking.mode if asking else None,
        "reused_predictions": reused,
    }
    return chosen, head


def finish(output: Path, results: dict, markdown: str, chosen: list[dict], per_item: Iterable[dict]) -> dict:
    """Rewrite predictions.jsonl with what scoring found per item (after the record's own fields, LLaVA's
    `text` alias dropped), then write results.json and results.md; returns `results`.

    With `chosen` from `predict`, the stored records of items outside this run stay in the file, in their
    place and as they were (only the `text` alias becomes `prediction`): a --limit run must not throw away
    predictions that a later full run would otherwise ask the model for again.
    """
    # Keyed by identity: `chosen.stored` holds these very record objects.
    scored = {id(rec): {**_no_text(rec), **extra} for rec, extra in zip(chosen, per_item, strict=True)}
    stored = chosen.stored if isinstance(chosen, Chosen) else chosen
    write_jsonl(output / PREDICTIONS, (scored.get(id(rec)) or _no_text(rec) for rec in stored))
    write_report(output, results, markdown)
    return results


def _no_text(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "text"}


def _ask(batch: list[Item], asking: Asking, id_field: str) -> list[dict]:
    queries = [Query(question=it.prompt, image=it.image()) for it in batch]
    fields = asking.settings()
    base = [{id_field: it.id, "prompt": it.prompt, **fields} for it in batch]
    if asking.options is None:
        answers = asking.assistant.generate(queries, max_new_tokens=asking.max_new_tokens)
        _check_len(answers, batch, "generate")
        return [{**b, "prediction": a} for b, a in zip(base, answers)]
    rows = asking.assistant.option_logprobs(queries, asking.options)
    _check_len(rows, batch, "option_logprobs")
    out = []
    for b, row in zip(base, rows):
        best = max(range(len(row)), key=lambda i: row[i])  # first option wins a tie
        out.append({**b, "prediction": asking.options[best], "logprobs": dict(zip(asking.options, row))})
    return out


def _check_len(answers: list, batch: list[Item], what: str) -> None:
    if len(answers) != len(batch):
        raise RuntimeError(f"assistant.{what} returned {len(answers)} answers for {len(batch)} queries")


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    """Write atomically: a crash while rewriting must not lose the predictions a resume depends on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps({k: v for k, v in rec.items() if k != "_line"}, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------ provenance


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def provenance(
    records: list[dict], *, asking: Asking | None, data: Path, command: str, predictions_file: Path | None
) -> dict:
    """Where the figures come from: the checkpoint(s) and weights fingerprint(s) named in the prediction records
    scored (a re-scored file may come from anywhere), the data file's digest and the command."""
    names = sorted({r["checkpoint"] for r in records if isinstance(r.get("checkpoint"), str)})
    checkpoints = names or [asking.checkpoint if asking else UNKNOWN_CHECKPOINT]
    weights = sorted({r["weights"] for r in records if isinstance(r.get("weights"), str)})
    return {
        "checkpoint": checkpoints[0] if len(checkpoints) == 1 else checkpoints,
        "weights": weights[0] if len(weights) == 1 else weights or None,
        "predictions_from": str(predictions_file) if predictions_file else None,
        "data": {"path": str(data), "sha256": sha256_file(data)},
        "command": command,
    }


# ------------------------------------------------------------------------------------------ reports


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    align = ["---" if i == 0 else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def provenance_markdown(results: dict) -> list[str]:
    rule = results["rule"]
    ckpt = results["checkpoint"]
    lines = [
        f"- checkpoint: `{ckpt}`"
        if isinstance(ckpt, str)
        else f"- checkpoints: {', '.join(f'`{c}`' for c in ckpt)}",
        f"- weights: `{results['weights']}`" if results.get("weights") else "- weights: not recorded",
        f"- data: `{results['data']['path']}` (sha256 `{results['data']['sha256']}`)",
        f"- command: `{results['command']}`",
        f"- rule: **{rule['name']}**: {rule['description']}",
    ]
    if results.get("predictions_from"):
        lines.append(f"- predictions re-scored from `{results['predictions_from']}`")
    return lines


def write_report(output: Path, results: dict, markdown: str) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(
        json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (output / "results.md").write_text(markdown.rstrip() + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------ command line


def add_images_arg(parser: argparse.ArgumentParser) -> None:
    """--images, required only with --checkpoint (`images_from_args` checks): a re-score needs no pixels."""
    parser.add_argument(
        "--images",
        type=Path,
        help="folder the records' image paths are relative to (needed with --checkpoint, not --predictions)",
    )


def images_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path | None:
    """The image folder when predicting; None when re-scoring, so that no image file is looked for."""
    if args.checkpoint is None:
        return None
    if args.images is None:
        parser.error("--images is required with --checkpoint (re-scoring with --predictions needs none)")
    return args.images


def add_common_args(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="trained checkpoint folder to evaluate")
    src.add_argument("--predictions", type=Path, help="re-score this predictions.jsonl without a model")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True, help="folder for predictions.jsonl and results")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument(
        "--limit", type=positive_int, default=None, help="evaluate only the first N questions"
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=32)
    parser.add_argument("--load-4bit", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--n-resamples", type=positive_int, default=1000, help="bootstrap resamples")


def positive_int(text: str) -> int:
    """An argparse type: a slice by a negative --limit would silently drop items from the end."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def command_line(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", sys.argv[0] or "-", *args])


def reports_user_errors(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap a benchmark's `main` as `llava-ft` does its commands: bad input (a data or predictions file, a
    checkpoint folder, a refused resume) prints one `prog: error: ...` line and returns 2; any other exception
    is a bug and keeps its traceback."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except (DataError, ConfigError, FileNotFoundError) as e:
            print(f"{Path(sys.argv[0]).name or 'eval'}: error: {e}", file=sys.stderr)
            return 2

    return wrapper


def lazy_asking(args: argparse.Namespace, options: list[str] | None = None) -> Callable[[], Asking] | None:
    """`asking_from_args`, deferred until the benchmark's data has been read: a bad record is reported before
    the model loads, not after (minutes for a 7B model)."""
    return None if args.checkpoint is None else lambda: asking_from_args(args, options)


def asking_from_args(args: argparse.Namespace, options: list[str] | None = None) -> Asking | None:
    if args.checkpoint is None:
        return None
    assistant = open_assistant(args.checkpoint, load_4bit=args.load_4bit)
    weights = checkpoint_weights(args.checkpoint)
    return Asking(
        assistant, args.checkpoint, args.batch_size, args.max_new_tokens, options, weights, args.load_4bit
    )
