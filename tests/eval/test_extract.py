"""Answer extraction: expected values worked out by hand from the peers' rules."""

import pytest

from llava_ft.eval.extract import (
    lmms_eval_punctuation,
    mmbench_vlmevalkit,
    mmbench_xtuner,
    official_punctuation,
    pope_llava,
    pope_strict,
    vlmevalkit_punctuation,
)

OPTS = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}  # option text 14 chars: text match up to 28 chars


@pytest.mark.parametrize(
    ("prediction", "letter", "step"),
    [
        ("The answer is B.", "B", "option_letter"),
        ("B) cat", "B", "option_letter"),
        ("(C)", "C", "option_letter"),
        ("I think it is D", "D", "option_letter"),
        # Capital letters only: a lower-case "b" is no option letter, and "b" is no option text either.
        ("b", None, "none"),
        # ...but the "answer is X" regex is case-insensitive.
        ("the answer is b", "B", "answer_is"),
        # Two letters: step 2 fails; "answer is C" is found before anything else.
        ("The answer is C, not A", "C", "answer_is"),
        ("cat", "A", "option_text"),
        ("It is a fish", "D", "option_text"),
        ("A or B", None, "none"),
        # "A" as an article: the only letter, but not among the last 4 words; too long for text matching.
        ("A small animal sits quietly on the wooden table today", None, "none"),
        ("Cannot determine the answer", None, "refusal"),
        ("Sorry, I can't help with images of people yet. B", None, "refusal"),
        ("Z", None, "bare_z"),
        # Long free text: no capital option letter, longer than 2x the options' text -> no answer.
        ("Based on the image, the animal is a dog.", None, "none"),
        ("", None, "none"),
    ],
)
def test_vlmevalkit_rule(prediction, letter, step):
    got = mmbench_vlmevalkit(prediction, OPTS)
    assert (got.answer, got.step) == (letter, step)


def test_vlmevalkit_ignores_letters_of_empty_options():
    two = {"A": "cat", "B": "dog"}
    assert mmbench_vlmevalkit("C", two).answer is None
    assert mmbench_vlmevalkit("The answer is C", two).answer is None
    # With C absent, "A or C" has a single option letter.
    assert mmbench_vlmevalkit("A or C", two).answer == "A"


def test_vlmevalkit_option_text_must_be_unique():
    assert mmbench_vlmevalkit("cats", {"A": "cat", "B": "cats"}).answer is None
    assert mmbench_vlmevalkit("DOG", OPTS).answer == "B"  # case-insensitive text match


@pytest.mark.parametrize(
    ("prediction", "extracted"),
    [
        ("Based on the image, the animal is a dog.", "B"),  # the B of "Based"
        ("The answer is B.", "B"),
        ("b", None),
        ("A or B", "A"),
        ("AB", "AB"),  # kept as is: it cannot equal a one-letter answer
        ("cat", None),
        ("Cannot determine the answer", "C"),
    ],
)
def test_xtuner_rule(prediction, extracted):
    assert mmbench_xtuner(prediction, OPTS).answer == extracted


@pytest.mark.parametrize(
    ("prediction", "llava", "strict"),
    [
        ("Yes", "yes", "yes"),
        ("No", "no", "no"),
        ("NO", "yes", "no"),  # LLaVA's words are case-sensitive
        ("no", "no", "no"),
        ("Yes, there is a dog in the image.", "yes", "yes"),
        ("No, there is not.", "no", "no"),
        ("There is no dog. Yes.", "no", None),  # LLaVA reads the first sentence only
        ("Yes. There is no dog.", "yes", None),
        ("Not at all", "yes", None),  # "Not" is not "not"
        ("The dog is not there", "no", None),
        ("no,", "no", "no"),
        ("", "yes", None),
        ("I cannot tell", "yes", None),
        ("yes!", "yes", "yes"),
    ],
)
def test_pope_rules(prediction, llava, strict):
    assert pope_llava(prediction).answer == llava
    assert pope_strict(prediction).answer == strict


@pytest.mark.parametrize(
    ("text", "official", "vlmevalkit"),
    [
        ("yes.", "yes", "yes"),
        ("3.5", "3.5", "3.5"),
        ("red, white", "red white", "red white"),  # ", " next to a space: deleted
        ("black/white", "black white", "black white"),  # not next to a space: a separator
        ("1,000", "1000", "1000"),  # a digit-comma-digit anywhere deletes every mark
        # The official regex "(?!<=\d)" is a lookahead, so a period after a digit is removed there only.
        ("5.", "5", "5."),
        ("it's", "it's", "it's"),
    ],
)
def test_punctuation_passes(text, official, vlmevalkit):
    assert official_punctuation(text) == official
    assert vlmevalkit_punctuation(text) == vlmevalkit


@pytest.mark.parametrize(
    ("text", "official", "lmms_eval"),
    [
        # lmms-eval's number regex "(?<=\d)(\,)+(?=\d)" accepts a run of commas: every mark is deleted.
        ("1,,000", "1  000", "1000"),
        ("1,000", "1000", "1000"),
        ("3.", "3", "3"),  # the official period regex, lookahead and all
        ("red, white", "red white", "red white"),
    ],
)
def test_lmms_eval_punctuation(text, official, lmms_eval):
    assert official_punctuation(text) == official
    assert lmms_eval_punctuation(text) == lmms_eval
