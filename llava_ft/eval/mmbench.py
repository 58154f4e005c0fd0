"""MMBench: multiple choice with circular evaluation, scored offline by exact matching.

TSV columns: index, question, hint, A, B, C, D (empty / missing options allowed), answer, category,
l2-category, image (base64, or the index of another row whose image it shares). Circular rotations are rows
with index >= 1e6; index % 1e6 names the main row, and a question counts only if every rotation is right. A
rotation whose main row is missing is ignored, counted and reported, as VLMEvalKit's circular evaluation does.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import csv
import io
import logging
import re
import string
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from llava_ft.data.conversation import DataError
from llava_ft.eval import arguments, report, runner
from llava_ft.eval.extract import MMBENCH_EXTRACTORS, MMBENCH_RULES, Extracted
from llava_ft.eval.stats import Estimate, bootstrap_mean

ROTATION = 1_000_000
EN_INSTRUCTION = "Answer with the option's letter from the given choices directly."
CN_INSTRUCTION = "请直接回答选项字母。"
# pandas.read_csv's default missing-value strings: VLMEvalKit and XTuner read the TSV with pandas, so an
# option written as "None" or "NA" is an absent option for them and must be for us.
NA_STRINGS = frozenset(
    "|#N/A|#N/A N/A|#NA|-1.#IND|-1.#QNAN|-NaN|-nan|1.#IND|1.#QNAN|<NA>|N/A|NA|NULL|NaN|None|n/a|nan|null".split(
        "|"
    )
)
# VLMEvalKit treats an image cell this short as the index of the row that holds the image.
IMAGE_REF_MAX_LEN = 64

log = logging.getLogger("llava_ft")


@dataclass
class MMBenchRow:
    index: int
    question: str
    options: dict[str, str]
    """Letter -> text, non-empty options only, in letter order."""
    answer: str
    hint: str | None = None
    category: str = ""
    l2_category: str = ""
    image_b64: str | None = None
    where: str = ""
    """"file row N", for error messages."""

    @property
    def group(self) -> int:
        return self.index % ROTATION

    @property
    def is_main(self) -> bool:
        return self.index < ROTATION


@dataclass
class MMBenchFile:
    rows: list[MMBenchRow]
    """Every question and its rotations, in file order."""
    orphans: list[MMBenchRow]
    """Rotation rows whose main row is missing. VLMEvalKit groups rows under main rows only, so it never
    scores them; here they are neither asked nor scored, only counted in the results."""


# ------------------------------------------------------------------------------------------ reading


def _na(value: str | None) -> bool:
    return value is None or value in NA_STRINGS


def load_mmbench_tsv(path: str | Path) -> MMBenchFile:
    path = Path(path)
    csv.field_size_limit(2**31 - 1)  # base64 images are far longer than csv's 128 KiB default
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None:
            raise DataError(str(path), "empty file (no header row)")
        missing = [c for c in ("index", "question", "answer") if c not in header]
        if missing:
            raise DataError(f"{path} header", f"missing column(s) {missing}; found {header}")
        letters = [c for c in header if len(c) == 1 and c in string.ascii_uppercase]
        if not letters:
            raise DataError(f"{path} header", "no option columns (A, B, ...)")
        rows = [
            _parse_row(dict(zip(header, cells)), letters, f"{path} row {n}", len(header), len(cells))
            for n, cells in enumerate(reader, 1)
        ]
    orphans = _check_rows(rows)
    if orphans:
        log.warning(
            "%s: %d rotation row(s) without their main row ignored (first: index %d, %s)",
            path, len(orphans), orphans[0].index, orphans[0].where,
        )  # fmt: skip
    ignored = {r.index for r in orphans}
    return MMBenchFile([r for r in rows if r.index not in ignored], orphans)


def _parse_row(
    rec: dict[str, str], letters: list[str], where: str, n_header: int, n_cells: int
) -> MMBenchRow:
    if n_cells != n_header:
        raise DataError(where, f"has {n_cells} fields, the header has {n_header}")
    try:
        index = int(rec["index"])
    except ValueError:
        raise DataError(where, f"column 'index' is {rec['index']!r}, not an integer") from None
    if index < 0:
        raise DataError(where, f"column 'index' is {index}, negative")
    if _na(rec["question"]):
        raise DataError(where, "column 'question' is empty")
    options = {c: rec[c] for c in letters if not _na(rec[c])}
    if len(options) < 2:
        raise DataError(where, f"has {len(options)} non-empty option(s); a question needs at least 2")
    answer = rec["answer"]
    if answer not in options:
        raise DataError(
            where, f"column 'answer' is {answer!r}, not one of the non-empty options {_span(options)}"
        )
    image = rec.get("image")
    return MMBenchRow(
        index=index,
        question=rec["question"],
        options=options,
        answer=answer,
        hint=None if _na(rec.get("hint")) else rec["hint"],
        category="" if _na(rec.get("category")) else rec["category"],
        l2_category="" if _na(rec.get("l2-category")) else rec["l2-category"],
        image_b64=None if _na(image) else image,
        where=where,
    )


def _span(options: dict[str, str]) -> str:
    letters = list(options)
    contiguous = "".join(letters) in string.ascii_uppercase
    return f"{letters[0]}-{letters[-1]}" if contiguous and len(letters) > 2 else "/".join(letters)


def _check_rows(rows: list[MMBenchRow]) -> list[MMBenchRow]:
    """Refuse repeated indices and broken image references; returns the rotation rows without a main row (their
    image cell, usually the missing main row's index, is not checked: they are ignored)."""
    by_index: dict[int, MMBenchRow] = {}
    for row in rows:
        if row.index in by_index:
            raise DataError(row.where, f"index {row.index} repeats {by_index[row.index].where}")
        by_index[row.index] = row
    orphans = []
    for row in rows:
        if not row.is_main and row.group not in by_index:
            orphans.append(row)
            continue
        if row.image_b64 is not None and len(row.image_b64) <= IMAGE_REF_MAX_LEN:
            target = by_index.get(int(row.image_b64)) if row.image_b64.isdigit() else None
            if target is None or target.image_b64 is None or len(target.image_b64) <= IMAGE_REF_MAX_LEN:
                raise DataError(
                    row.where,
                    f"column 'image' is {row.image_b64!r}: neither an image nor the index of a row with one",
                )
            row.image_b64 = target.image_b64
    return orphans


def decode_image(row: MMBenchRow) -> Image.Image | None:
    if row.image_b64 is None:
        return None
    try:
        image = Image.open(io.BytesIO(base64.b64decode(row.image_b64, validate=True)))
        return image.convert("RGB")
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as e:
        raise DataError(
            row.where, f"column 'image' is not a base64-encoded image ({type(e).__name__}: {e})"
        ) from None


# ------------------------------------------------------------------------------------------ rotations


def rotate(row: MMBenchRow, k: int) -> MMBenchRow:
    """Rotation k: the option texts shift k places (new A = old option k), index + k * 1e6."""
    letters = list(row.options)
    texts = list(row.options.values())
    n = len(texts)
    answer = letters[(letters.index(row.answer) - k) % n]
    options = {letters[j]: texts[(j + k) % n] for j in range(n)}
    return replace(row, index=row.index + k * ROTATION, options=options, answer=answer)


def add_rotations(rows: list[MMBenchRow]) -> list[MMBenchRow]:
    """Every question followed by its n-1 rotations (as VLMEvalKit's circular files)."""
    if any(not r.is_main for r in rows):
        raise ValueError("the data already has circular rotations (index >= 1e6)")
    if any(r.index >= ROTATION for r in rows):
        raise ValueError("indices must be below 1e6 to add rotations")
    return [rot for r in rows for rot in [r] + [rotate(r, k) for k in range(1, len(r.options))]]


def write_mmbench_tsv(rows: Sequence[dict[str, Any]], path: str | Path, *, circular: bool = False) -> None:
    """Write questions in MMBench TSV form.

    rows: dicts with index, question, options (list of texts, A first), answer (letter), category,
    l2-category, image (PIL), optional hint. With `circular`, each question's rotations follow it, their
    image cell naming the main row's index (as the official circular files do, to stay small).
    """
    parsed = []
    for i, r in enumerate(rows):
        where = f"write_mmbench_tsv rows[{i}]"
        options = dict(zip(string.ascii_uppercase, r["options"]))
        if r["answer"] not in options:
            raise DataError(where, f"answer {r['answer']!r} is not one of the options {_span(options)}")
        buf = io.BytesIO()
        r["image"].save(buf, format="PNG")
        parsed.append(
            MMBenchRow(
                index=int(r["index"]),
                question=r["question"],
                options=options,
                answer=r["answer"],
                hint=r.get("hint"),
                category=r.get("category", ""),
                l2_category=r.get("l2-category", ""),
                image_b64=base64.b64encode(buf.getvalue()).decode("ascii"),
                where=where,
            )
        )
    out = add_rotations(parsed) if circular else parsed
    if _check_rows(out):
        raise DataError("write_mmbench_tsv", "a rotation row (index >= 1e6) has no main row")
    letters = string.ascii_uppercase[: max(len(r.options) for r in out)]
    header = ["index", "question", "hint", *letters, "answer", "category", "l2-category", "image"]
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        for r in out:
            image = r.image_b64 if r.is_main else str(r.group)
            cells = [r.index, r.question, r.hint or "", *[r.options.get(c, "") for c in letters]]
            w.writerow([*cells, r.answer, r.category, r.l2_category, image])


# ------------------------------------------------------------------------------------------ prompting


def build_prompt(row: MMBenchRow, lang: str = "auto") -> str:
    """LLaVA / XTuner MMBench prompt: [hint\\n]question\\nA. ..\\nB. ..\\n + instruction."""
    text = (f"{row.hint}\n" if row.hint else "") + f"{row.question}\n"
    text += "".join(f"{k}. {v}\n" for k, v in row.options.items())
    chinese = lang == "cn" or (lang == "auto" and re.search("[\u4e00-\u9fff]", text) is not None)
    return text + (CN_INSTRUCTION if chinese else EN_INSTRUCTION)


def select(rows: list[MMBenchRow], limit: int | None) -> list[MMBenchRow]:
    """The first `limit` questions with all their rotations."""
    if limit is None:
        return rows
    keep = set([r.index for r in rows if r.is_main][:limit])
    return [r for r in rows if r.group in keep]


# ------------------------------------------------------------------------------------------ scoring


@dataclass
class Scored:
    row: MMBenchRow
    prediction: str
    extracted: Extracted

    @property
    def correct(self) -> bool:
        return self.extracted.answer == self.row.answer

    @property
    def failed(self) -> bool:
        return self.extracted.answer not in self.row.options


def extract_all(rows: list[MMBenchRow], predictions: dict[str, str], rule: str) -> list[Scored]:
    extract = MMBENCH_EXTRACTORS[rule]
    return [Scored(r, predictions[str(r.index)], extract(predictions[str(r.index)], r.options)) for r in rows]


def circular_hits(scored: list[Scored]) -> dict[int, bool]:
    """Main index -> whether every row of the question (main row and rotations) was right."""
    hits: dict[int, bool] = {s.row.group: True for s in scored if s.row.is_main}
    for s in scored:
        hits[s.row.group] = hits[s.row.group] and s.correct
    return hits


def _grouped(keys: list[str], hits: list[bool]) -> dict[str, dict]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for k, h in zip(keys, hits):
        groups[k].append(h)
    return {k: {"n": len(v), "accuracy": float(np.mean(v))} for k, v in sorted(groups.items())}


def score_mmbench(scored: list[Scored], *, seed: int = 0, n_resamples: int = 1000) -> dict:
    mains = [s for s in scored if s.row.is_main]
    hits = circular_hits(scored)
    circ = [hits[s.row.index] for s in mains]
    has_rotations = len(mains) < len(scored)

    def est(values: list[bool]) -> dict:
        return bootstrap_mean(values, seed=seed, n_resamples=n_resamples).to_dict()

    scores = {"circular": est(circ)} if has_rotations else {}
    scores["single_all"] = est([s.correct for s in scored])
    scores["single_main"] = est([s.correct for s in mains])
    breakdown = {}
    for field in ("category", "l2_category"):
        main_keys = [getattr(s.row, field) or "(none)" for s in mains]
        row_keys = [getattr(s.row, field) or "(none)" for s in scored]
        if set(main_keys) == {"(none)"}:
            continue
        breakdown[field.replace("_", "-")] = {
            "circular": _grouped(main_keys, circ) if has_rotations else None,
            "single_all": _grouped(row_keys, [s.correct for s in scored]),
        }
    headline = "circular" if has_rotations else "single_all"
    return {
        "headline": {"metric": headline, **scores[headline]},
        "scores": scores,
        "n_questions": len(mains),
        "n_rows": len(scored),
        "extraction_failures": sum(s.failed for s in scored),
        "extraction_steps": dict(sorted(Counter(s.extracted.step for s in scored).items())),
        "breakdown": breakdown,
    }


def headline_value(scored: list[Scored], metric: str) -> float:
    if metric == "circular":
        return float(np.mean(list(circular_hits(scored).values())))
    return float(np.mean([s.correct for s in scored if metric == "single_all" or s.row.is_main]))


SCORE_NAMES = {
    "circular": "circular (every rotation right)",
    "single_all": "single pass, every row",
    "single_main": "single pass, main rows only",
}


def mmbench_markdown(results: dict) -> str:
    lines = ["# MMBench", "", *report.provenance_markdown(results)]
    lines.append(
        f"- items: {results['n_questions']} questions, {results['n_rows']} rows; "
        f"extraction failures: {results['extraction_failures']} rows"
    )
    orphans = results["orphan_rotations"]
    if orphans["n"]:
        shown = ", ".join(str(i) for i in orphans["indices"][:10]) + (", ..." if orphans["n"] > 10 else "")
        lines.append(
            f"- ignored: {orphans['n']} rotation rows whose main row is missing (indices {shown}), "
            "as VLMEvalKit's circular evaluation"
        )
    lines += [
        "",
        report.markdown_table(
            ["score", "accuracy % [95% CI]", "n (resampled units)"],
            [[SCORE_NAMES[k], Estimate.from_dict(v).fmt(), v["n"]] for k, v in results["scores"].items()],
        ),
    ]
    for other, value in results.get("other_rules", {}).items():
        lines.append(
            f"\nUnder the {other} rule the headline ({results['headline']['metric']}) is {value * 100:.2f}%."
        )
    for field, parts in results["breakdown"].items():
        names = list(parts["single_all"])
        circ = parts["circular"]
        rows = [
            [
                name,
                *([f"{circ[name]['accuracy'] * 100:.2f}", circ[name]["n"]] if circ else []),
                f"{parts['single_all'][name]['accuracy'] * 100:.2f}",
                parts["single_all"][name]["n"],
            ]
            for name in names
        ]
        headers = [field, *(["circular %", "questions"] if circ else []), "single-pass %", "rows"]
        lines += ["", f"## Per {field}", "", report.markdown_table(headers, rows)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ running


def run_mmbench(
    data: str | Path,
    output: str | Path,
    *,
    predictor: runner.Predictor | Callable[[], runner.Predictor] | None = None,
    predictions_file: str | Path | None = None,
    rule: str = "vlmevalkit",
    lang: str = "auto",
    limit: int | None = None,
    circular: bool = False,
    seed: int = 0,
    n_resamples: int = 1000,
    command: str = "",
) -> dict:
    """Predict (or re-score), score under `rule`, write predictions.jsonl, results.json and results.md."""
    if rule not in MMBENCH_RULES:
        raise ValueError(f"unknown rule {rule!r}; choose from {sorted(MMBENCH_RULES)}")
    data, output = Path(data), Path(output)
    bench = load_mmbench_tsv(data)
    rows = bench.rows
    if circular:
        try:
            # Orphans are rotations too: a file holding any already has rotations, which add_rotations refuses.
            rows = add_rotations(rows + bench.orphans)
        except ValueError as e:
            raise DataError(str(data), f"--circular: {e}") from None
    rows = select(rows, limit)
    items = [runner.Item(r.index, build_prompt(r, lang), lambda r=r: decode_image(r)) for r in rows]
    found, head = runner.predict(
        items, output, benchmark="mmbench", rule=(rule, MMBENCH_RULES[rule].description), id_field="index",
        predictor=predictor, predictions_file=predictions_file, data=data, command=command,
    )  # fmt: skip
    predictions = {str(r.index): rec["prediction"] for r, rec in zip(rows, found.records)}
    scored = extract_all(rows, predictions, rule)
    results = {
        **head,
        "lang": lang,
        "rotations_generated": circular,
        "orphan_rotations": {"n": len(bench.orphans), "indices": [r.index for r in bench.orphans]},
        **score_mmbench(scored, seed=seed, n_resamples=n_resamples),
    }
    metric = results["headline"]["metric"]
    results["other_rules"] = {
        other: headline_value(extract_all(rows, predictions, other), metric)
        for other in MMBENCH_RULES
        if other != rule
    }
    hits = circular_hits(scored)
    per_item = (
        {
            "index": s.row.index,
            "prediction": s.prediction,
            "extracted": s.extracted.answer,
            "extraction_step": s.extracted.step,
            "answer": s.row.answer,
            "correct": s.correct,
            "question_correct": hits[s.row.group],
            "category": s.row.category,
            "l2-category": s.row.l2_category,
        }
        for s in scored
    )
    return runner.finish(output, results, mmbench_markdown(results), found, per_item)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """MMBench's flags, for `python eval/mmbench.py` and `llava-ft eval mmbench` alike."""
    arguments.add_common_args(parser)
    parser.add_argument("--rule", choices=sorted(MMBENCH_RULES), default="vlmevalkit")
    parser.add_argument(
        "--lang",
        choices=["auto", "en", "cn"],
        default="auto",
        help="instruction language; auto: Chinese when the prompt has CJK characters (as XTuner)",
    )
    parser.add_argument("--circular", action="store_true", help="generate rotations for a file that has none")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, command: str) -> int:
    """Evaluate as `args` say (parsed by `parser`, which reports flag errors), recording `command` as typed."""
    arguments.check_input_files(args)
    results = run_mmbench(
        args.data,
        args.output,
        predictor=arguments.lazy_predictor(args),
        predictions_file=args.predictions,
        rule=args.rule,
        lang=args.lang,
        limit=args.limit,
        circular=args.circular,
        seed=args.seed,
        n_resamples=args.n_resamples,
        command=command,
    )
    head = results["headline"]
    print(
        f"MMBench {head['metric']} ({args.rule}): {Estimate.from_dict(head).fmt()} over {head['n']}; "
        f"results in {args.output}"
    )
    return 0


main = arguments.script_main(__doc__, add_arguments, run)
