import json

import pytest

from llava_ft.data.conversation import DataError
from llava_ft.eval import pope
from llava_ft.eval.runner import Predictor

# (label, prediction, split); hand-extracted under LLaVA's rule / the strict rule in the comments.
CASES = [
    ("yes", "Yes, there is a dog.", "random"),  # yes / yes
    ("no", "NO", "random"),  # yes (case-sensitive) / no
    ("no", "No, there is not.", "random"),  # no / no
    ("yes", "There is no dog. Yes.", "popular"),  # no (first sentence) / unknown
    ("yes", "I cannot tell", "popular"),  # yes / unknown
    ("no", "", "popular"),  # yes / unknown
    ("yes", "yes", "adversarial"),  # yes / yes
    ("no", "Not at all", "adversarial"),  # yes ("Not" is not "not") / unknown
]


def test_metrics_under_both_rules():
    labels = [c[0] for c in CASES]
    preds = [c[1] for c in CASES]
    llava = pope.pope_metrics(labels, [pope.POPE_EXTRACTORS["llava"](p).answer for p in preds])
    # LLaVA: TP 3 (1, 5, 7), FP 3 (2, 6, 8), TN 1 (3), FN 1 (4).
    assert (llava["tp"], llava["fp"], llava["tn"], llava["fn"]) == (3, 3, 1, 1)
    assert llava["accuracy"] == 0.5 and llava["precision"] == 0.5 and llava["recall"] == 0.75
    assert llava["f1"] == pytest.approx(0.6) and llava["yes_ratio"] == 0.75 and llava["unknown"] == 0
    strict = pope.pope_metrics(labels, [pope.POPE_EXTRACTORS["strict"](p).answer for p in preds])
    # Strict: TP 2 (1, 7), FP 0, TN 2 (2, 3), FN 2 (4, 5: unknown counts as not-yes), 4 unknown.
    assert (strict["tp"], strict["fp"], strict["tn"], strict["fn"]) == (2, 0, 2, 2)
    assert strict["accuracy"] == 0.5 and strict["precision"] == 1.0 and strict["recall"] == 0.5
    assert strict["f1"] == pytest.approx(2 / 3) and strict["yes_ratio"] == 0.25 and strict["unknown"] == 4


def test_no_yes_predicted_gives_zero_precision():
    m = pope.pope_metrics(["yes", "no", "no"], ["no", "no", None])
    assert (m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (0.0, 0.0, 0.0, 0.0)
    assert m["accuracy"] == pytest.approx(1 / 3)


def _data(tmp_path):
    data = tmp_path / "pope.jsonl"
    colours = ["red", "blue", "green"]
    data.write_text(
        "".join(
            json.dumps(
                {
                    "question_id": i,
                    "image": f"{colours[i % 3]}.png",
                    "text": f"Is there a thing {i}?",
                    "label": label,
                    "category": split,
                }
            )
            + "\n"
            for i, (label, _, split) in enumerate(CASES)
        )
    )
    return data


def test_run_pope_generate_per_split_and_rules(tmp_path, image_dir, scripted):
    data = _data(tmp_path)
    answers = {f"Is there a thing {i}?{pope.SUFFIX}": c[1] for i, c in enumerate(CASES)}
    fake = scripted(lambda q: answers[q.question])
    res = pope.run_pope(data, image_dir, tmp_path / "out", predictor=Predictor(fake, "ck", batch_size=3))
    assert len(fake.asked) == len(CASES)
    assert res["headline"]["value"] == 0.5 and res["headline"]["metric"] == "accuracy"
    assert res["headline"]["low"] <= 0.5 <= res["headline"]["high"]
    assert res["rules"]["llava"]["overall"]["f1"] == pytest.approx(0.6)
    assert res["rules"]["strict"]["overall"]["unknown"] == 4
    assert res["extraction_failures"] == 0  # the LLaVA rule always answers
    # random split: rows 0-2 -> LLaVA preds yes, yes, no vs labels yes, no, no: acc 2/3.
    assert res["rules"]["llava"]["per_split"]["random"]["accuracy"] == pytest.approx(2 / 3)
    assert set(res["rules"]["llava"]["per_split"]) == {"adversarial", "popular", "random"}
    lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [x["extracted_llava"] for x in lines] == ["yes", "yes", "no", "no", "yes", "yes", "yes", "yes"]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "Rule llava" in md and "Rule strict" in md and "sha256" in md


def test_run_pope_likelihood_mode(tmp_path, image_dir, scripted):
    data = _data(tmp_path)
    # Say yes exactly when the label is yes: a perfect score without any generation.
    labels = {f"Is there a thing {i}?{pope.SUFFIX}": c[0] for i, c in enumerate(CASES)}
    fake = scripted(
        answer=None, logprobs=lambda q, opts: [-0.1, -2.0] if labels[q.question] == "yes" else [-3.0, -0.2]
    )
    res = pope.run_pope(
        data,
        image_dir,
        tmp_path / "out",
        predictor=Predictor(fake, "ck", options=pope.LIKELIHOOD_OPTIONS),
        rule="strict",
    )
    assert res["mode"] == "likelihood" and res["headline"]["value"] == 1.0
    rec = json.loads((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()[0])
    assert rec["prediction"] == "Yes" and rec["logprobs"] == {"Yes": -0.1, "No": -2.0}


def test_pope_bad_label(tmp_path, image_dir):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"question_id": 1, "image": "red.png", "text": "q", "label": "maybe"}) + "\n")
    with pytest.raises(DataError, match=r"p.jsonl line 1: field 'label' is 'maybe', not 'yes' or 'no'"):
        pope.load_pope(data, image_dir)
    data.write_text("{not json\n")
    with pytest.raises(DataError, match=r"p.jsonl line 1: not valid JSON"):
        pope.load_pope(data, image_dir)


def test_pope_takes_one_image_per_question(tmp_path, image_dir):
    data = tmp_path / "p.jsonl"
    record = {"question_id": 1, "image": ["red.png", "blue.png"], "text": "q", "label": "yes"}
    data.write_text(json.dumps(record) + "\n")
    for images in (image_dir, None):  # a re-score too
        with pytest.raises(DataError, match=r"p.jsonl line 1: field 'image' must be one file name"):
            pope.load_pope(data, images)
