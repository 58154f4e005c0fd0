import json

import pytest

from llava_ft.data.conversation import DataError
from llava_ft.eval import vqa
from llava_ft.eval.runner import Predictor
from llava_ft.eval.vqa import exact_match, normalize, vqa_accuracy


def naive_official(prediction: str, answers: list[str]) -> float:
    """vqaEval.py's loop written out: each human answer is a distinct record; compare with the other nine."""
    records = [{"answer_id": i, "answer": a.strip()} for i, a in enumerate(answers)]
    pred = prediction.strip()
    if len({r["answer"] for r in records}) > 1:
        records = [{**r, "answer": normalize(r["answer"])} for r in records]
        pred = normalize(pred)
    accs = []
    for rec in records:
        others = [r for r in records if r != rec]
        accs.append(min(1, len([r for r in others if r["answer"] == pred]) / 3))
    return sum(accs) / len(accs)


@pytest.mark.parametrize(
    ("agreeing", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_soft_accuracy_by_agreeing_humans(agreeing, expected):
    # Hand-computed with the 10-choose-9 rule, e.g. 2 agreeing: 2 subsets hold 1 match (1/3), 8 hold 2 (2/3):
    # (2/3 + 16/3) / 10 = 0.6.
    answers = ["cat"] * agreeing + ["dog"] * (10 - agreeing)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)
    assert naive_official("cat", answers) == pytest.approx(expected)


def test_normalisation_only_when_humans_disagree():
    ten_yes = ["yes"] * 10
    assert vqa_accuracy("Yes.", ten_yes, "official") == 0.0
    assert vqa_accuracy("Yes.", ten_yes, "always") == 1.0
    assert vqa_accuracy("yes", ten_yes, "official") == 1.0
    mixed = ["yes"] * 9 + ["no"]
    assert vqa_accuracy("Yes.", mixed, "official") == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        # VLMEvalKit's period regex is a true lookbehind: "3." keeps its period; the official one drops it.
        ("3.", ["3"] * 10, {"official": 0.0, "always": 1.0, "vlmevalkit": 0.0, "lmms-eval": 1.0}),
        ("3.", ["3"] * 9 + ["4"], {"official": 1.0, "always": 1.0, "vlmevalkit": 0.0, "lmms-eval": 1.0}),
        # lmms-eval reads a run of commas between digits as a number; the others split "1,,000" into "1 000".
        ("1,,000", ["1000"] * 10, {"official": 0.0, "always": 0.0, "vlmevalkit": 0.0, "lmms-eval": 1.0}),
        (
            "1,,000",
            ["1000"] * 9 + ["10"],
            {"official": 0.0, "always": 0.0, "vlmevalkit": 0.0, "lmms-eval": 1.0},
        ),
        # Shared by every mode that normalises: number words, a trailing comma.
        (
            "Two dogs, ",
            ["2 dogs"] * 10,
            {"official": 0.0, "always": 1.0, "vlmevalkit": 1.0, "lmms-eval": 1.0},
        ),
    ],
)
def test_normalisation_modes_follow_their_harness(prediction, answers, expected):
    assert set(expected) == set(vqa.NORMALIZE_RULES)
    assert {mode: vqa_accuracy(prediction, answers, mode) for mode in expected} == expected


def test_single_answer_uses_the_mode_normalisation():
    assert vqa_accuracy("3.", ["3"], "official") == 1.0
    assert vqa_accuracy("3.", ["3"], "vlmevalkit") == 0.0
    assert vqa_accuracy("1,,000", ["1000"], "lmms-eval") == 1.0


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("Two", ["2"] * 9 + ["3"], 1.0),  # number word -> digit
        ("a dog", ["dog"] * 3 + ["cat"] * 7, 0.9),  # article dropped
        ("The Dog!", ["dog"] * 3 + ["cat"] * 7, 0.9),
        ("dont", ["don't"] * 4 + ["no"] * 6, 1.0),  # contraction restored
        ("two", ["2"] * 10, 0.0),  # humans agree: no normalisation in the official variant
        ("red, white", ["red white"] * 2 + ["red"] * 8, 0.6),
    ],
)
def test_soft_accuracy_normalisation(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)
    assert naive_official(prediction, answers) == pytest.approx(expected)


def test_single_answer_is_exact_match_and_exact_match_uses_majority():
    assert vqa_accuracy("Cat.", ["cat"]) == 1.0  # one answer: soft accuracy would be 0 by construction
    assert vqa_accuracy("dog", ["cat"]) == 0.0
    assert exact_match("The cat", ["cat", "cat", "dog"])
    assert not exact_match("dog", ["cat", "cat", "dog"])


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_run_vqa_end_to_end(tmp_path, image_dir, scripted):
    data = tmp_path / "vqa.jsonl"
    _write(
        data,
        [
            {
                "question_id": 1,
                "image": "red.png",
                "question": "What colour?",
                "answers": ["red"] * 10,
                "answer_type": "other",
            },
            {
                "question_id": 2,
                "image": "blue.png",
                "question": "How many?",
                "answers": [{"answer": "2"}] * 3 + [{"answer": "3"}] * 7,
                "answer_type": "number",
            },
            {
                "question_id": 3,
                "image": "green.png",
                "question": "Is it?",
                "answers": ["yes"] * 10,
                "answer_type": "yes/no",
            },
        ],
    )
    script = {"What colour?": "red", "How many?": "two", "Is it?": "Yes."}
    fake = scripted(lambda q: script[q.question.removesuffix(vqa.SUFFIX)])
    out = tmp_path / "out"
    res = vqa.run_vqa(data, image_dir, out, predictor=Predictor(fake, "ckpt"), seed=3)
    assert all(q.question.endswith(vqa.SUFFIX) and q.image.size == (8, 8) for q in fake.asked)
    assert res["soft_accuracy"]["official"] == pytest.approx((1.0 + 0.9 + 0.0) / 3)
    assert res["soft_accuracy"]["always"] == pytest.approx((1.0 + 0.9 + 1.0) / 3)
    assert res["headline"]["value"] == pytest.approx((1.0 + 0.9 + 0.0) / 3)
    assert res["per_answer_type"]["number"] == {"n": 1, "soft_accuracy": pytest.approx(0.9)}
    assert res["exact_match"]["value"] == pytest.approx(2 / 3)  # "two" vs majority "3": no
    assert res["rule"]["name"] == "official" and res["checkpoint"] == "ckpt"
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [x["soft_accuracy"] for x in lines] == pytest.approx([1.0, 0.9, 0.0])
    assert "official" in (out / "results.md").read_text()

    # Re-score the same predictions under the other variant, without a model.
    res2 = vqa.main(
        [
            "--predictions",
            str(out / "predictions.jsonl"),
            "--data",
            str(data),
            "--images",
            str(image_dir),
            "--output",
            str(tmp_path / "re"),
            "--normalize",
            "always",
        ]
    )
    assert res2 == 0
    again = json.loads((tmp_path / "re" / "results.json").read_text())
    assert again["headline"]["value"] == pytest.approx((1.0 + 0.9 + 1.0) / 3)
    assert "--normalize always" in again["command"]


def test_vqa_bad_input(tmp_path, image_dir):
    data = tmp_path / "bad.jsonl"
    _write(
        data,
        [
            {"question_id": 1, "image": "red.png", "question": "q", "answers": ["a"]},
            {"question_id": 2, "image": "red.png", "question": "q", "answers": []},
        ],
    )
    with pytest.raises(DataError, match=r"bad.jsonl line 2: field 'answers'"):
        vqa.load_vqa(data, image_dir)
    _write(data, [{"question_id": 1, "image": "nope.png", "question": "q", "answers": ["a"]}])
    with pytest.raises(DataError, match=r"line 1: field 'image': file .*nope.png not found"):
        vqa.load_vqa(data, image_dir)


def _colours(q) -> list[str]:
    """The colour names of a query's images, in order (the fixture's images are plain colours)."""
    names = {(255, 0, 0): "red", (0, 0, 255): "blue", (0, 128, 0): "green"}
    return [names[im.getpixel((0, 0))] for im in q.images]


def test_several_images_per_question(tmp_path, image_dir, scripted):
    """`image` a list: the images reach the model in order, as a list, their markers where the question has
    them or in front of it; a one-image record still gives one image."""
    data = tmp_path / "multi.jsonl"
    records = [
        {
            "question_id": 1,
            "image": ["red.png", "blue.png"],
            "question": "Which is red?",
            "answers": ["first"],
        },
        {
            "question_id": 2,
            "image": ["green.png", "red.png", "blue.png"],
            "question": "Is <image> brighter than <image> and <image>?",
            "answers": ["yes"],
        },
        {"question_id": 3, "image": "blue.png", "question": "What colour?", "answers": ["blue"]},
        {"question_id": 4, "image": ["green.png"], "question": "What colour?", "answers": ["green"]},
    ]
    _write(data, records)
    fake = scripted(lambda q: " ".join(_colours(q)))
    out = tmp_path / "out"
    res = vqa.run_vqa(data, image_dir, out, predictor=Predictor(fake, "ckpt"), suffix="")
    assert [_colours(q) for q in fake.asked] == [
        ["red", "blue"],
        ["green", "red", "blue"],
        ["blue"],
        ["green"],
    ]
    assert isinstance(fake.asked[0].image, list) and not isinstance(fake.asked[2].image, list)
    assert [q.user_text() for q in fake.asked] == [
        "<image><image>\nWhich is red?",
        "Is <image> brighter than <image> and <image>?",
        "<image>\nWhat colour?",
        "<image>\nWhat colour?",
    ]
    assert res["n_items"] == 4 and res["soft_accuracy"]["official"] == pytest.approx(0.5)
    # A re-score needs no image files, lists included.
    again = vqa.run_vqa(data, None, tmp_path / "re", predictions_file=out / "predictions.jsonl", suffix="")
    assert again["soft_accuracy"] == res["soft_accuracy"]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {"image": ["red.png", "blue.png"], "question": "Is <image> red?"},
            r"1 <image> marker\(s\) but the record 2",
        ),
        ({"image": "red.png", "question": "<image> or <image>?"}, r"2 <image> marker\(s\) but the record 1"),
        ({"image": [], "question": "q"}, "field 'image' must be a file name or a non-empty list"),
        ({"image": ["red.png", 3], "question": "q"}, "field 'image' must be a file name or a non-empty list"),
        ({"image": ["red.png", "nope.png"], "question": "q"}, "field 'image': file .*nope.png not found"),
    ],
)
def test_several_images_bad_input(tmp_path, image_dir, record, message):
    data = tmp_path / "bad.jsonl"
    _write(data, [{"question_id": 1, "answers": ["a"], **record}])
    with pytest.raises(DataError, match=rf"line 1: .*{message}"):
        vqa.load_vqa(data, image_dir)


def test_several_images_answered_by_a_real_checkpoint(tmp_path, image_dir, tiny_root):
    """Through a tiny stage output: each answer is the one `generate_messages` gives for the conversation
    built by hand (markers in front or where the question has them, images in order)."""
    from PIL import Image

    from llava_ft.data.conversation import Message
    from llava_ft.inference import load_assistant
    from llava_ft.testing.tiny_llava import write_tiny_stage_output

    assistant = load_assistant(str(write_tiny_stage_output(tiny_root, tmp_path / "ckpt")), device="cpu")
    data = tmp_path / "multi.jsonl"
    records = [
        {"question_id": 1, "image": ["red.png", "blue.png"], "question": "Which is red?", "answers": ["a"]},
        {"question_id": 2, "image": ["blue.png", "red.png"], "question": "Which is red?", "answers": ["a"]},
        {
            "question_id": 3,
            "image": ["blue.png", "green.png"],
            "question": "Is <image> like <image>?",
            "answers": ["a"],
        },
    ]
    _write(data, records)
    res = vqa.run_vqa(
        data, image_dir, tmp_path / "out", predictor=Predictor(assistant, "ckpt", max_new_tokens=5)
    )
    predictions = [
        json.loads(x)["prediction"] for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    ]
    texts = ["<image><image>\nWhich is red?", "<image><image>\nWhich is red?", "Is <image> like <image>?"]
    expected = [
        assistant.generate_messages(
            [
                (
                    [Message("user", text + vqa.SUFFIX)],
                    [Image.open(image_dir / f).convert("RGB") for f in rec["image"]],
                )
            ],
            max_new_tokens=5,
        )[0]
        for text, rec in zip(texts, records)
    ]
    assert predictions == expected and res["n_items"] == 3
    assert expected[0] != expected[1], "the image order must change the answer for the test to mean anything"
