"""Predictions for a benchmark's items: asked of the model (resuming from predictions.jsonl) or read back from
a stored file for a re-score; then the file rewritten with the scores and the report written.

Benchmarks (mmbench.py, pope.py, vqa.py) turn their data into `Item`s and score the predictions; asking,
resuming and writing files live here, so the three behave the same way.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from llava_ft.data.conversation import DataError
from llava_ft.eval.predictions import (
    PREDICTIONS,
    append_predictions,
    check_stored,
    read_predictions,
    seal_tail,
    write_predictions,
)
from llava_ft.eval.report import provenance, write_report
from llava_ft.query import Query


class Answerer(Protocol):
    """What evaluation needs from a model: `llava_ft.inference.Assistant`, or a scripted fake in tests."""

    def generate(self, queries: list[Query], *, max_new_tokens: int = 32) -> list[str]: ...

    def option_logprobs(self, queries: list[Query], options: list[str]) -> list[list[float]]: ...


@dataclass
class Item:
    """One question to put to the model."""

    id: Any
    """The benchmark's own id (MMBench index, question_id), as written in predictions.jsonl."""
    prompt: str
    image: Callable[[], Any]
    """Loads the PIL image (a list of them for several images, or None) when its batch comes up, so a whole
    benchmark is never in memory."""


@dataclass
class Predictor:
    """The model to ask and the settings its answers depend on: by generation, or by comparing option
    log-probabilities."""

    model: Answerer
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

    def predict(self, batch: list[Item], id_field: str) -> list[dict]:
        """The prediction record of every item of `batch`, with the settings it was obtained with."""
        queries = [Query(question=it.prompt, image=it.image()) for it in batch]
        fields = self.settings()
        base = [{id_field: it.id, "prompt": it.prompt, **fields} for it in batch]
        if self.options is None:
            answers = self.model.generate(queries, max_new_tokens=self.max_new_tokens)
            _check_len(answers, batch, "generate")
            return [{**b, "prediction": a} for b, a in zip(base, answers)]
        rows = self.model.option_logprobs(queries, self.options)
        _check_len(rows, batch, "option_logprobs")
        out = []
        for b, row in zip(base, rows):
            best = max(range(len(row)), key=lambda i: row[i])  # first option wins a tie
            out.append({**b, "prediction": self.options[best], "logprobs": dict(zip(self.options, row))})
        return out


def _check_len(answers: list, batch: list[Item], what: str) -> None:
    if len(answers) != len(batch):
        raise RuntimeError(f"model.{what} returned {len(answers)} answers for {len(batch)} queries")


def ask_model(
    items: list[Item], output: Path, predictor: Predictor, *, id_field: str, desc: str = "eval"
) -> tuple[dict[str, dict], int]:
    """Every record of output/predictions.jsonl by str(id), each item's among them, and how many items were
    answered there already. Those are not asked again (resume); new answers are appended after every batch,
    so an interrupted run loses at most one batch."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / PREDICTIONS
    records = read_predictions(path, id_field) if path.exists() else {}
    for it in items:
        if str(it.id) in records:
            check_stored(path, records[str(it.id)], it.id, it.prompt, predictor.settings())
    reused = sum(str(it.id) in records for it in items)
    if reused:
        # stderr, beside tqdm's bar: stdout carries only the score line.
        print(f"resuming: {reused} of {len(items)} predictions reused from {path}", file=sys.stderr)
    todo = [it for it in items if str(it.id) not in records]
    batches = [todo[i : i + predictor.batch_size] for i in range(0, len(todo), predictor.batch_size)]
    if path.exists():
        seal_tail(path)
    with open(path, "a", encoding="utf-8") as f:
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not batches):
            new = predictor.predict(batch, id_field)
            append_predictions(f, new)
            records.update((str(rec[id_field]), rec) for rec in new)
    return records, reused


def read_stored(items: list[Item], predictions_file: Path, output: Path, *, id_field: str) -> dict[str, dict]:
    """Every record of `predictions_file` by str(id) for a re-score: each item must have one, asked with the
    prompt built now. Refused if the re-score would replace answers in output/predictions.jsonl that the source
    lacks."""
    records = read_predictions(predictions_file, id_field)
    own = output / PREDICTIONS
    if own.exists() and not os.path.samefile(predictions_file, own):
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
        check_stored(predictions_file, records[str(it.id)], it.id, it.prompt, None)
    return records


@dataclass
class RunPredictions:
    """What `predict` found, for scoring and for `finish` to rewrite predictions.jsonl."""

    records: list[dict]
    """This run's prediction records, in item order."""
    kept: list[dict]
    """Every record the rewritten predictions.jsonl holds, in file order: this run's and, in its own folder,
    the records of items this run left out (--limit), which a later full run would otherwise ask again."""

    @property
    def answers(self) -> list[str]:
        return [rec["prediction"] for rec in self.records]


def predict(
    items: list[Item],
    output: Path,
    *,
    benchmark: str,
    rule: tuple[str, str],
    id_field: str,
    predictor: Predictor | Callable[[], Predictor] | None,
    predictions_file: str | Path | None,
    data: Path,
    command: str,
) -> tuple[RunPredictions, dict]:
    """Every item's prediction (asked, resumed, or read from `predictions_file` when `predictor` is None) and
    the head of results.json: benchmark, rule, provenance, mode and reused predictions. `predictor` may be a
    function giving it (`arguments.lazy_predictor`): the model then loads after the items read cleanly."""
    if (predictor is None) == (predictions_file is None):
        raise ValueError("give exactly one of predictor (a model) or predictions_file (re-score)")
    if callable(predictor):
        predictor = predictor()
    own = output / PREDICTIONS
    if predictor is not None:
        records, reused = ask_model(items, output, predictor, id_field=id_field, desc=benchmark)
        pred_path = None
        keeps_rest = True
    else:
        pred_path = Path(predictions_file)
        records, reused = read_stored(items, pred_path, output, id_field=id_field), len(items)
        # Into its own file, a re-score keeps the rest; into another folder, it writes only what it scored.
        keeps_rest = own.exists() and os.path.samefile(pred_path, own)
    mine = [records[str(it.id)] for it in items]
    found = RunPredictions(mine, list(records.values()) if keeps_rest else mine)
    head = {
        "benchmark": benchmark,
        "rule": {"name": rule[0], "description": rule[1]},
        **provenance(
            mine,
            checkpoint=predictor.checkpoint if predictor else None,
            data=data,
            command=command,
            predictions_file=pred_path,
        ),
        "mode": predictor.mode if predictor else None,
        "reused_predictions": reused,
    }
    return found, head


def finish(
    output: Path, results: dict, markdown: str, found: RunPredictions, per_item: Iterable[dict]
) -> dict:
    """Rewrite predictions.jsonl with what scoring found per item (after the record's own fields, LLaVA's
    `text` alias dropped), then write results.json and results.md; returns `results`.

    The kept records of items outside this run stay in the file, in their place and as they were (only the
    `text` alias becomes `prediction`).
    """
    # Keyed by identity: `found.kept` holds these very record objects.
    scored = {id(rec): {**_no_text(rec), **extra} for rec, extra in zip(found.records, per_item, strict=True)}
    write_predictions(output / PREDICTIONS, (scored.get(id(rec)) or _no_text(rec) for rec in found.kept))
    write_report(output, results, markdown)
    return results


def _no_text(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "text"}
