"""Open-ended VQA (VQAv2 style): soft accuracy against up to 10 human answers, plus exact match.

JSONL records: {question_id, image, question, answers: [strings] or [{"answer": ...}], optional answer_type}.
`image` is one file or a list of files (several images): the question holds one `<image>` marker per image, in
order, or none, and then the images go in front of it in order (as training and chat put them).
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from llava_ft.constants import IMAGE_TOKEN
from llava_ft.data.conversation import DataError
from llava_ft.eval import arguments, report, runner
from llava_ft.eval.extract import Rule, lmms_eval_punctuation, official_punctuation, vlmevalkit_punctuation
from llava_ft.eval.jsonl import iter_jsonl, require_fields, unique_images
from llava_ft.eval.stats import Estimate, bootstrap_mean

SUFFIX = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's VQAv2 prompt

NORMALIZE_RULES = {
    "official": Rule(
        "official",
        "official vqaEval.py (GT-Vision-Lab/VQA a013f00): prediction and human answers are normalised only when "
        "the human answers are not all identical; soft accuracy = mean over the 10 leave-one-out subsets of "
        "min(#matches/3, 1)",
    ),
    "always": Rule(
        "always",
        "the official normalisation applied to every record, whether or not the human answers agree; the same "
        "soft accuracy (neither lmms-eval nor VLMEvalKit: see the 'lmms-eval' and 'vlmevalkit' modes)",
    ),
    "vlmevalkit": Rule(
        "vlmevalkit",
        "VLMEvalKit vqa_score (vlmeval/dataset/utils/vqa_eval.py, e8e78f05): every record normalised, with "
        "VLMEvalKit's punctuation pass, whose period rule keeps a period after a digit ('3.' is not '3'); "
        "the same soft accuracy",
    ),
    "lmms-eval": Rule(
        "lmms-eval",
        "lmms-eval vqav2 (lmms_eval/tasks/vqav2/utils.py, 75571cf): every record normalised, with lmms-eval's "
        "punctuation pass, which reads a run of commas between digits as a number ('1,,000' is '1000'); the "
        "same soft accuracy",
    ),
}

# Official vqaEval.py tables, verbatim, which VLMEvalKit and lmms-eval copy unchanged (keys with capitals never
# match after lower-casing; kept as upstream).
MANUAL_MAP = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = ("a", "an", "the")
CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}


def digit_article(text: str) -> str:
    """processDigitArticle: lower-case, number words -> digits, drop articles, restore contractions."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize(text: str) -> str:
    """The full official normalisation of one answer."""
    return digit_article(official_punctuation(_clean(text)))


def normalize_vlmevalkit(text: str) -> str:
    """VLMEvalKit `process_answer`: the official steps with its own punctuation pass."""
    return digit_article(vlmevalkit_punctuation(_clean(text)))


def normalize_lmms_eval(text: str) -> str:
    """lmms-eval's VQAv2 normalisation: the official steps with its own punctuation pass."""
    return digit_article(lmms_eval_punctuation(_clean(text)))


NORMALIZERS: dict[str, Callable[[str], str]] = {
    "official": normalize,
    "always": normalize,
    "vlmevalkit": normalize_vlmevalkit,
    "lmms-eval": normalize_lmms_eval,
}


def vqa_accuracy(prediction: str, answers: list[str], normalization: str = "official") -> float:
    """Soft accuracy: mean over each human answer left out of min(#others equal to the prediction / 3, 1).

    "official" normalises only when the human answers differ; every other mode always, with its own function.
    With one human answer there are no "others" (the score would always be 0), so such a record scores
    normalised exact match instead, in every mode (named in reports).
    """
    norm = NORMALIZERS[normalization]
    if len(answers) == 1:
        return float(norm(prediction) == norm(answers[0]))
    pred, gts = _clean(prediction), [_clean(a) for a in answers]
    if normalization != "official" or len(set(gts)) > 1:
        pred, gts = norm(pred), [norm(a) for a in gts]
    matches = sum(g == pred for g in gts)
    return float(np.mean([min((matches - (g == pred)) / 3, 1.0) for g in gts]))


def exact_match(prediction: str, answers: list[str]) -> bool:
    """The officially normalised prediction equals the most frequent normalised human answer (first on a tie)."""
    return normalize(prediction) == Counter(normalize(a) for a in answers).most_common(1)[0][0]


@dataclass
class VqaItem:
    question_id: object
    image: Path | list[Path] | None
    """One file, or a list of files (a record whose `image` is a list); None when loaded for a re-score (no
    image folder)."""
    question: str
    answers: list[str]
    answer_type: str | None
    where: str


def load_vqa(path: str | Path, images: str | Path | None) -> list[VqaItem]:
    """With `images` None (a re-score) image files are neither looked for nor needed."""
    path, images = Path(path), None if images is None else Path(images)
    items: list[VqaItem] = []
    seen: dict[str, str] = {}
    for _, where, rec in iter_jsonl(path):
        rec = require_fields(rec, where, ("question_id", "image", "question", "answers"))
        answers = (
            [a["answer"] if isinstance(a, dict) and "answer" in a else a for a in rec["answers"]]
            if isinstance(rec["answers"], list)
            else None
        )
        if not answers or not all(isinstance(a, str) for a in answers):
            raise DataError(where, "field 'answers' must be a non-empty list of strings (or {'answer': ...})")
        files = unique_images(rec, where, seen, images)
        n_images = len(rec["image"]) if isinstance(rec["image"], list) else 1
        markers = rec["question"].count(IMAGE_TOKEN) if isinstance(rec["question"], str) else 0
        if markers not in (0, n_images):
            raise DataError(
                where,
                f"the question has {markers} {IMAGE_TOKEN} marker(s) but the record {n_images} image(s)",
            )
        image = files if files is None or isinstance(rec["image"], list) else files[0]
        items.append(
            VqaItem(rec["question_id"], image, rec["question"], answers, rec.get("answer_type"), where)
        )
    if not items:
        raise DataError(str(path), "no records")
    return items


def load_image(item: VqaItem) -> Image.Image | list[Image.Image]:
    """The item's image, or its list of images in order."""
    if isinstance(item.image, list):
        return [_open(item, path) for path in item.image]
    return _open(item, item.image)


def _open(item: VqaItem, path: Path) -> Image.Image:
    try:
        return Image.open(path).convert("RGB")
    except OSError as e:
        raise DataError(item.where, f"field 'image': cannot read {path} ({e})") from None


def build_prompt(question: str, suffix: str = SUFFIX) -> str:
    return question if question.endswith(suffix) else question + suffix


def score_vqa(
    items: list[VqaItem],
    predictions: list[str],
    normalization: str,
    *,
    seed: int = 0,
    n_resamples: int = 1000,
) -> dict:
    soft = {n: [vqa_accuracy(p, it.answers, n) for p, it in zip(predictions, items)] for n in NORMALIZE_RULES}
    exact = [exact_match(p, it.answers) for p, it in zip(predictions, items)]
    acc = soft[normalization]
    per_type: dict[str, list[float]] = defaultdict(list)
    for a, it in zip(acc, items):
        per_type[it.answer_type or "(none)"].append(a)
    return {
        "headline": {
            "metric": "soft_accuracy",
            **bootstrap_mean(acc, seed=seed, n_resamples=n_resamples).to_dict(),
        },
        "soft_accuracy": {n: float(np.mean(v)) for n, v in soft.items()},
        "exact_match": bootstrap_mean(exact, seed=seed, n_resamples=n_resamples).to_dict(),
        "per_answer_type": {
            k: {"n": len(v), "soft_accuracy": float(np.mean(v))} for k, v in sorted(per_type.items())
        },
        "n_items": len(items),
        "extraction_failures": sum(not p.strip() for p in predictions),
        "answers_per_question": dict(sorted(Counter(len(it.answers) for it in items).items())),
        "single_answer_scored_by_exact_match": sum(len(it.answers) == 1 for it in items),
        "_per_item": {"soft": acc, "exact": exact},
    }


def vqa_markdown(results: dict) -> str:
    lines = ["# VQA", "", *report.provenance_markdown(results)]
    lines.append(
        f"- items: {results['n_items']}; empty predictions: {results['extraction_failures']}; "
        f"human answers per question: {results['answers_per_question']} "
        f"({results['single_answer_scored_by_exact_match']} with one answer scored by normalised exact match)"
    )
    rows = [
        ["soft accuracy (headline)", Estimate.from_dict(results["headline"]).fmt()],
        ["exact match (vs the most frequent human answer)", Estimate.from_dict(results["exact_match"]).fmt()],
    ]
    rows += [
        [f"soft accuracy, normalisation '{n}'", f"{v * 100:.2f}"] for n, v in results["soft_accuracy"].items()
    ]
    lines += ["", report.markdown_table(["score", "% [95% CI]"], rows)]
    if set(results["per_answer_type"]) != {"(none)"}:
        lines += [
            "",
            "## Per answer type",
            "",
            report.markdown_table(
                ["answer type", "soft accuracy %", "n"],
                [
                    [k, f"{v['soft_accuracy'] * 100:.2f}", v["n"]]
                    for k, v in results["per_answer_type"].items()
                ],
            ),
        ]
    return "\n".join(lines)


def run_vqa(
    data: str | Path,
    images: str | Path | None,
    output: str | Path,
    *,
    predictor: runner.Predictor | Callable[[], runner.Predictor] | None = None,
    predictions_file: str | Path | None = None,
    normalization: str = "official",
    suffix: str = SUFFIX,
    limit: int | None = None,
    seed: int = 0,
    n_resamples: int = 1000,
    command: str = "",
) -> dict:
    if normalization not in NORMALIZE_RULES:
        raise ValueError(f"unknown normalisation {normalization!r}; choose from {sorted(NORMALIZE_RULES)}")
    data, output = Path(data), Path(output)
    # A re-score asks nothing, so no image is opened: it must not need the files either.
    items = load_vqa(data, images if predictor is not None else None)[:limit]
    work = [
        runner.Item(it.question_id, build_prompt(it.question, suffix), lambda it=it: load_image(it))
        for it in items
    ]
    found, head = runner.predict(
        work, output, benchmark="vqa", rule=(normalization, NORMALIZE_RULES[normalization].description),
        id_field="question_id", predictor=predictor, predictions_file=predictions_file, data=data, command=command,
    )  # fmt: skip
    scores = score_vqa(items, found.answers, normalization, seed=seed, n_resamples=n_resamples)
    per_item = scores.pop("_per_item")
    results = {**head, "images": str(images) if images is not None else None, **scores}
    fields = (
        {"answers": it.answers, "soft_accuracy": per_item["soft"][i], "exact_match": per_item["exact"][i]}
        for i, it in enumerate(items)
    )
    return runner.finish(output, results, vqa_markdown(results), found, fields)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """VQA's flags, for `python eval/vqa.py` and `llava-ft eval vqa` alike."""
    arguments.add_common_args(parser)
    arguments.add_images_arg(parser)
    parser.add_argument(
        "--normalize",
        choices=sorted(NORMALIZE_RULES),
        default="official",
        help="official: as vqaEval.py (normalise only when the human answers differ); always: the official "
        "normalisation on every record; vlmevalkit, lmms-eval: each harness's own normalisation on every record",
    )
    parser.add_argument(
        "--prompt-suffix", default=SUFFIX, help="appended to each question unless already there"
    )


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, command: str) -> int:
    """Evaluate as `args` say (parsed by `parser`, which reports flag errors), recording `command` as typed."""
    arguments.check_input_files(args)
    images = arguments.images_from_args(parser, args)
    results = run_vqa(
        args.data,
        images,
        args.output,
        predictor=arguments.lazy_predictor(args),
        predictions_file=args.predictions,
        normalization=args.normalize,
        suffix=args.prompt_suffix,
        limit=args.limit,
        seed=args.seed,
        n_resamples=args.n_resamples,
        command=command,
    )
    print(
        f"VQA soft accuracy ({args.normalize}): {Estimate.from_dict(results['headline']).fmt()}; results in {args.output}"
    )
    return 0


main = arguments.script_main(__doc__, add_arguments, run)
