"""Answer-extraction rules: model text -> the answer a benchmark scores.

Each rule reproduces a peer harness exactly, because the same predictions score differently under different
rules; every report names the rule it used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    name: str
    description: str


@dataclass(frozen=True)
class Extracted:
    """What a rule read from one prediction: `answer` is None when it found none; `step` says how."""

    answer: str | None
    step: str


# ---------------------------------------------------------------- MMBench (multiple choice)

MMBENCH_RULES = {
    "vlmevalkit": Rule(
        "vlmevalkit",
        "VLMEvalKit exact matching (commit e8e78f05, no LLM judge): refusal/bare 'Z' -> wrong; a single capital "
        "option letter among the last 4 words; 'answer is X'; a unique option-text substring; else no answer",
    ),
    "xtuner": Rule("xtuner", "XTuner tools/mmbench.py: the first run of [A-D]+ anywhere in the prediction"),
}

_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_SPLIT_CHARS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
# No word boundary and case-insensitive, as VLMEvalKit: "the answer is about..." reads as A.
_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def mmbench_vlmevalkit(prediction: str, options: dict[str, str]) -> Extracted:
    """VLMEvalKit `can_infer` (can_infer_option, then can_infer_text). `options`: letter -> non-empty text."""
    for refusal in _REFUSALS:
        if refusal in prediction:
            return Extracted(None, "refusal")
    words = prediction.translate(_SPLIT_CHARS).split()
    present = [letter for letter in options if letter in words]
    if len(present) == 1:
        # The letter counts only if its first occurrence is among the last 4 words ("A" as an article
        # early in a sentence is not an answer).
        if words.index(present[0]) > len(words) - 5:
            return Extracted(present[0], "option_letter")
    elif not present and "Z" in words:
        return Extracted(None, "bare_z")
    match = _ANSWER_IS.search(prediction)
    if match and match.group(1).upper() in options:
        return Extracted(match.group(1).upper(), "answer_is")
    return _option_text(prediction, options)


def _option_text(prediction: str, options: dict[str, str]) -> Extracted:
    text = prediction.lower()
    # Long free text mentions options in passing; VLMEvalKit only trusts short answers.
    if len(text) > 2 * sum(len(v) for v in options.values()):
        return Extracted(None, "none")
    found = [letter for letter, option in options.items() if option.lower() in text]
    if len(found) == 1:
        return Extracted(found[0], "option_text")
    return Extracted(None, "none")


def mmbench_xtuner(prediction: str, options: dict[str, str]) -> Extracted:
    """XTuner: first `[A-D]+` run, whatever it is ("AB" and letters of empty options are kept and score wrong)."""
    match = re.search(r"([A-D]+)", prediction)
    return Extracted(match.group(1), "first_run") if match else Extracted(None, "none")


MMBENCH_EXTRACTORS = {"vlmevalkit": mmbench_vlmevalkit, "xtuner": mmbench_xtuner}


# ---------------------------------------------------------------- POPE (yes / no)

POPE_RULES = {
    "llava": Rule(
        "llava",
        "LLaVA eval_pope.py: first sentence, commas removed, split on spaces; a word 'No'/'not'/'no' "
        "(case-sensitive) -> no, anything else (empty too) -> yes",
    ),
    "strict": Rule(
        "strict",
        "VLMEvalKit YOrN_Extraction: lower-case, VQA punctuation pass, split; 'yes' xor 'no' as a word, "
        "else unknown (wrong for accuracy, not-yes for precision/recall/F1)",
    ),
}


def pope_llava(prediction: str) -> Extracted:
    text = prediction.split(".")[0].replace(",", "")
    words = text.split(" ")
    if "No" in words or "not" in words or "no" in words:
        return Extracted("no", "negation_word")
    return Extracted("yes", "default_yes")


def pope_strict(prediction: str) -> Extracted:
    words = vlmevalkit_punctuation(prediction.lower()).split()
    if ("yes" in words) != ("no" in words):
        return Extracted("yes" if "yes" in words else "no", "yes_xor_no")
    return Extracted(None, "none")


POPE_EXTRACTORS = {"llava": pope_llava, "strict": pope_strict}


# ---------------------------------------------------------------- VQA punctuation passes

VQA_PUNCT = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
# A number written with a thousands comma: its presence anywhere turns every separating mark into a deleted one.
_OFFICIAL_COMMA = re.compile(r"(\d)(,)(\d)")
# lmms-eval's variant also accepts a run of commas between digits ("1,,000").
_LMMS_EVAL_COMMA = re.compile(r"(?<=\d)(,)+(?=\d)")
# Official vqaEval.py's period regex: "(?!<=\d)" is a lookahead (not the intended lookbehind), kept as is.
_OFFICIAL_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_VLMEVALKIT_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def _punctuation(text: str, comma_strip: re.Pattern[str], period_strip: re.Pattern[str]) -> str:
    # A punctuation mark next to a space (or any text with a 1,000-style number) is deleted, otherwise it
    # separates words.
    out = text
    delete = comma_strip.search(text) is not None
    for p in VQA_PUNCT:
        if delete or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The harnesses pass re.UNICODE (32) where `count` goes: at most 32 periods are removed.
    return period_strip.sub("", out, re.UNICODE)


def official_punctuation(text: str) -> str:
    """processPunctuation of the official VQA evaluation (GT-Vision-Lab/VQA vqaEval.py, commit a013f00)."""
    return _punctuation(text, _OFFICIAL_COMMA, _OFFICIAL_PERIOD)


def vlmevalkit_punctuation(text: str) -> str:
    """VLMEvalKit `process_punctuation` (commit e8e78f05): the official pass, except that its period regex is a
    true lookbehind, so a period after a digit stays ("3." is not "3")."""
    return _punctuation(text, _OFFICIAL_COMMA, _VLMEVALKIT_PERIOD)


def lmms_eval_punctuation(text: str) -> str:
    """lmms-eval `EvalAIAnswerProcessor.process_punctuation` (commit 75571cf): the official pass, except that
    a run of commas between digits also counts as a number, so "1,,000" becomes "1000"."""
    return _punctuation(text, _LMMS_EVAL_COMMA, _OFFICIAL_PERIOD)
