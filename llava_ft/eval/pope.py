"""POPE: yes/no object-hallucination probes, scored under LLaVA's rule and VLMEvalKit's strict rule.

JSONL records: {question_id, image, text, label: "yes"|"no", category or split: adversarial|popular|random}.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from llava_ft.data.conversation import DataError
from llava_ft.eval import arguments, report, runner
from llava_ft.eval.extract import POPE_EXTRACTORS, POPE_RULES
from llava_ft.eval.jsonl import iter_jsonl, require_fields, unique_image
from llava_ft.eval.stats import Estimate, bootstrap

SUFFIX = "\nAnswer the question using a single word or phrase."
LIKELIHOOD_OPTIONS = ["Yes", "No"]


@dataclass
class PopeItem:
    question_id: object
    image: Path | None
    """None when loaded for a re-score (no image folder)."""
    text: str
    label: str
    """"yes" or "no"."""
    split: str
    where: str


def load_pope(path: str | Path, images: str | Path | None) -> list[PopeItem]:
    """With `images` None (a re-score) image files are neither looked for nor needed."""
    path, images = Path(path), None if images is None else Path(images)
    items: list[PopeItem] = []
    seen: dict[str, str] = {}
    for _, where, rec in iter_jsonl(path):
        rec = require_fields(rec, where, ("question_id", "image", "text", "label"))
        label = str(rec["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise DataError(where, f"field 'label' is {rec['label']!r}, not 'yes' or 'no'")
        image = unique_image(rec, where, seen, images)
        split = rec.get("category", rec.get("split", "(none)"))
        items.append(PopeItem(rec["question_id"], image, rec["text"], label, str(split), where))
    if not items:
        raise DataError(str(path), "no records")
    return items


def build_prompt(text: str, suffix: str = SUFFIX) -> str:
    return text if text.endswith(suffix) else text + suffix


def load_image(item: PopeItem) -> Image.Image:
    try:
        return Image.open(item.image).convert("RGB")
    except OSError as e:
        raise DataError(item.where, f"field 'image': cannot read {item.image} ({e})") from None


# ------------------------------------------------------------------------------------------ scoring


def pope_metrics(labels: Sequence[str], preds: Sequence[str | None]) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio; `None` predictions (no answer) are wrong and not-yes.

    Precision is 0 when nothing is predicted yes (LLaVA's script divides by zero there); recall and F1 likewise.
    """
    tp = sum(label == "yes" and p == "yes" for label, p in zip(labels, preds))
    fp = sum(label == "no" and p == "yes" for label, p in zip(labels, preds))
    tn = sum(label == "no" and p == "no" for label, p in zip(labels, preds))
    fn = sum(label == "yes" and p != "yes" for label, p in zip(labels, preds))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n,
        "accuracy": (tp + tn) / n if n else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else float("nan"),
        "unknown": sum(p is None for p in preds),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def score_rule(items: list[PopeItem], predictions: list[str], rule: str) -> dict:
    extract = POPE_EXTRACTORS[rule]
    preds = [extract(p).answer for p in predictions]
    labels = [it.label for it in items]
    splits = sorted({it.split for it in items})
    per_split = {
        s: pope_metrics(
            [lab for lab, it in zip(labels, items) if it.split == s],
            [p for p, it in zip(preds, items) if it.split == s],
        )
        for s in splits
    }
    return {
        "overall": pope_metrics(labels, preds),
        "per_split": per_split,
        "mean_over_splits": {m: float(np.mean([v[m] for v in per_split.values()])) for m in METRICS},
        "extracted": preds,
    }


def score_pope(
    items: list[PopeItem], predictions: list[str], rule: str, *, seed: int = 0, n_resamples: int = 1000
) -> dict:
    by_rule = {r: score_rule(items, predictions, r) for r in POPE_RULES}
    labels = np.array([it.label for it in items])
    preds = np.array([p or "" for p in by_rule[rule]["extracted"]])

    def metric(name: str):
        return lambda idx: pope_metrics(labels[idx], [p or None for p in preds[idx]])[name]

    acc = bootstrap(
        len(items), lambda idx: float(np.mean(preds[idx] == labels[idx])), seed=seed, n_resamples=n_resamples
    )
    f1 = bootstrap(len(items), metric("f1"), seed=seed, n_resamples=n_resamples)
    return {
        "headline": {"metric": "accuracy", **acc.to_dict()},
        "f1_interval": f1.to_dict(),
        "n_items": len(items),
        "extraction_failures": by_rule[rule]["overall"]["unknown"],
        "rules": {r: {k: v for k, v in res.items() if k != "extracted"} for r, res in by_rule.items()},
        "_extracted": {r: res["extracted"] for r, res in by_rule.items()},
    }


def pope_markdown(results: dict) -> str:
    lines = ["# POPE", "", *report.provenance_markdown(results)]
    lines.append(
        f"- mode: {results['mode'] or 'predictions file'}; items: {results['n_items']}; "
        f"extraction failures ({results['rule']['name']}): {results['extraction_failures']}"
    )
    lines.append(
        f"- headline accuracy % [95% CI]: {Estimate.from_dict(results['headline']).fmt()}; "
        f"F1 % [95% CI]: {Estimate.from_dict(results['f1_interval']).fmt()}"
    )
    for rule, res in results["rules"].items():
        rows = [
            [name, *(f"{m[k] * 100:.2f}" for k in METRICS), m["n"]]
            for name, m in [("overall", res["overall"]), *res["per_split"].items()]
        ]
        rows.append(["mean over splits", *(f"{res['mean_over_splits'][k] * 100:.2f}" for k in METRICS), ""])
        lines += [
            "",
            f"## Rule {rule}: {POPE_RULES[rule].description}",
            "",
            report.markdown_table(["split", "acc %", "precision %", "recall %", "F1 %", "yes %", "n"], rows),
        ]
    return "\n".join(lines)


def run_pope(
    data: str | Path,
    images: str | Path | None,
    output: str | Path,
    *,
    predictor: runner.Predictor | Callable[[], runner.Predictor] | None = None,
    predictions_file: str | Path | None = None,
    rule: str = "llava",
    suffix: str = SUFFIX,
    limit: int | None = None,
    seed: int = 0,
    n_resamples: int = 1000,
    command: str = "",
) -> dict:
    if rule not in POPE_RULES:
        raise ValueError(f"unknown rule {rule!r}; choose from {sorted(POPE_RULES)}")
    data, output = Path(data), Path(output)
    # A re-score asks nothing, so no image is opened: it must not need the files either.
    items = load_pope(data, images if predictor is not None else None)[:limit]
    work = [
        runner.Item(it.question_id, build_prompt(it.text, suffix), lambda it=it: load_image(it))
        for it in items
    ]
    found, head = runner.predict(
        work, output, benchmark="pope", rule=(rule, POPE_RULES[rule].description), id_field="question_id",
        predictor=predictor, predictions_file=predictions_file, data=data, command=command,
    )  # fmt: skip
    scores = score_pope(items, found.answers, rule, seed=seed, n_resamples=n_resamples)
    extracted = scores.pop("_extracted")
    results = {**head, "images": str(images) if images is not None else None, **scores}
    per_item = (
        {
            "label": it.label,
            "split": it.split,
            **{f"extracted_{r}": extracted[r][i] for r in POPE_RULES},
            "correct": extracted[rule][i] == it.label,
        }
        for i, it in enumerate(items)
    )
    return runner.finish(output, results, pope_markdown(results), found, per_item)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """POPE's flags, for `python eval/pope.py` and `llava-ft eval pope` alike."""
    arguments.add_common_args(parser)
    arguments.add_images_arg(parser)
    parser.add_argument(
        "--mode",
        choices=["generate", "likelihood"],
        default="generate",
        help="likelihood: compare log P('Yes') and log P('No') instead of generating",
    )
    parser.add_argument("--rule", choices=sorted(POPE_RULES), default="llava", help="rule of the headline")
    parser.add_argument(
        "--prompt-suffix", default=SUFFIX, help="appended to each question unless already there"
    )


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, command: str) -> int:
    """Evaluate as `args` say (parsed by `parser`, which reports flag errors), recording `command` as typed."""
    arguments.check_input_files(args)
    images = arguments.images_from_args(parser, args)
    options = LIKELIHOOD_OPTIONS if args.mode == "likelihood" else None
    results = run_pope(
        args.data,
        images,
        args.output,
        predictor=arguments.lazy_predictor(args, options),
        predictions_file=args.predictions,
        rule=args.rule,
        suffix=args.prompt_suffix,
        limit=args.limit,
        seed=args.seed,
        n_resamples=args.n_resamples,
        command=command,
    )
    print(
        f"POPE accuracy ({args.rule}): {Estimate.from_dict(results['headline']).fmt()}; "
        f"F1 {results['rules'][args.rule]['overall']['f1'] * 100:.2f}; results in {args.output}"
    )
    return 0


main = arguments.script_main(__doc__, add_arguments, run)
