import csv
import hashlib
import json
import logging
import re

import pytest
from PIL import Image

from llava_ft.data.conversation import DataError
from llava_ft.eval import arguments, mmbench
from llava_ft.eval.runner import Predictor


def solid(colour: str) -> Image.Image:
    return Image.new("RGB", (8, 8), colour)


ROWS = [
    {
        "index": 0,
        "question": "What animal?",
        "options": ["cat", "dog", "bird", "fish"],
        "answer": "B",
        "category": "animals",
        "l2-category": "perception",
        "image": solid("red"),
    },
    {
        "index": 1,
        "question": "What colour?",
        "options": ["red", "blue"],
        "answer": "A",
        "hint": "Look closely.",
        "category": "colours",
        "l2-category": "perception",
        "image": solid("blue"),
    },
]
RIGHT = {"What animal?": "dog", "What colour?": "red"}


def options_in(prompt: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Z])\. (.*)$", prompt, flags=re.M))


def answer_like_a_model(query) -> str:
    """Picks the right option text, except on the rotation whose A is "bird" (a deliberate mistake); answers
    the colour question as "Based on the image, X" (read as X by VLMEvalKit, as B by XTuner)."""
    opts = options_in(query.question)
    by_text = {v: k for k, v in opts.items()}
    if "What animal?" in query.question:
        return f"The answer is {by_text['cat' if opts['A'] == 'bird' else 'dog']}."
    return f"Based on the image, {by_text['red']}"


@pytest.fixture
def tsv(tmp_path):
    path = tmp_path / "bench.tsv"
    mmbench.write_mmbench_tsv(ROWS, path, circular=True)
    return path


def test_written_rotations_keep_the_right_content(tsv):
    rows = mmbench.load_mmbench_tsv(tsv).rows
    assert [r.index for r in rows] == [0, 1_000_000, 2_000_000, 3_000_000, 1, 1_000_001]
    right = {"What animal?": "dog", "What colour?": "red"}
    for r in rows:
        assert r.options[r.answer] == right[r.question]
        assert sorted(r.options.values()) == sorted(ROWS[r.group]["options"])
    assert rows[1].options == {"A": "dog", "B": "bird", "C": "fish", "D": "cat"} and rows[1].answer == "A"
    # Rotations reference the main row's image by index, resolved on loading.
    assert mmbench.decode_image(rows[2]).getpixel((0, 0)) == (255, 0, 0)
    assert rows[4].options == {"A": "red", "B": "blue"} and rows[4].hint == "Look closely."


def test_prompt_format():
    row = mmbench.MMBenchRow(1, "What colour?", {"A": "red", "B": "blue"}, "A", hint="Look closely.")
    assert mmbench.build_prompt(row) == (
        "Look closely.\nWhat colour?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly."
    )
    cn = mmbench.MMBenchRow(2, "这是什么颜色？", {"A": "红", "B": "蓝"}, "A")
    assert mmbench.build_prompt(cn) == "这是什么颜色？\nA. 红\nB. 蓝\n请直接回答选项字母。"
    assert mmbench.build_prompt(cn, "en").endswith("directly.")


def test_empty_and_nan_options_are_left_out_as_pandas_reads_them(tmp_path):
    path = tmp_path / "b.tsv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer"])
        w.writerow([0, "q", "nan", "x", "None", "", "y", "D"])
        w.writerow([1, "q", "a hint", "x", "z", "NA", "", "B"])
    rows = mmbench.load_mmbench_tsv(path).rows
    assert rows[0].options == {"A": "x", "D": "y"} and rows[0].hint is None
    assert rows[1].options == {"A": "x", "B": "z"}
    pd = pytest.importorskip("pandas")
    df = pd.read_csv(path, sep="\t")  # what VLMEvalKit's build_choices sees
    for r, (_, rec) in zip(rows, df.iterrows()):
        assert r.options == {c: rec[c] for c in "ABCD" if not pd.isna(rec[c])}


def test_circular_scoring_with_one_failing_rotation(tsv, tmp_path, scripted):
    fake = scripted(answer_like_a_model)
    res = mmbench.run_mmbench(tsv, tmp_path / "out", predictor=Predictor(fake, "ck", batch_size=4), seed=1)
    assert len(fake.asked) == 6 and all(q.image is not None for q in fake.asked)
    # Animal question: rotation 2 (A = bird) wrong -> question fails; colour question: both rotations right.
    assert res["headline"] == {**res["scores"]["circular"], "metric": "circular"}
    assert res["scores"]["circular"]["value"] == 0.5 and res["scores"]["circular"]["n"] == 2
    assert res["scores"]["single_all"]["value"] == pytest.approx(5 / 6)
    assert res["scores"]["single_main"]["value"] == 1.0
    assert res["breakdown"]["category"]["circular"] == {
        "animals": {"n": 1, "accuracy": 0.0},
        "colours": {"n": 1, "accuracy": 1.0},
    }
    assert res["breakdown"]["l2-category"]["single_all"]["perception"] == {
        "n": 6,
        "accuracy": pytest.approx(5 / 6),
    }
    assert res["extraction_failures"] == 0
    # XTuner reads "Based on ..." as B: the colour question fails too.
    assert res["other_rules"] == {"xtuner": 0.0}
    lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    wrong = [x for x in lines if not x["correct"]]
    assert [(x["index"], x["extracted"], x["answer"]) for x in wrong] == [
        (2_000_000, "C", "D")
    ]  # A=bird B=fish C=cat D=dog
    assert all(x["question_correct"] == (x["index"] % 1_000_000 == 1) for x in lines)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["data"]["sha256"] == hashlib.sha256(tsv.read_bytes()).hexdigest()
    assert results["rule"]["name"] == "vlmevalkit" and results["checkpoint"] == "ck"
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| circular (every rotation right) | 50.00 [" in md and "## Per category" in md


def test_rescore_with_xtuner_rule_without_a_model(tsv, tmp_path, scripted):
    mmbench.run_mmbench(tsv, tmp_path / "out", predictor=Predictor(scripted(answer_like_a_model), "ck"))
    code = mmbench.main(
        [
            "--predictions",
            str(tmp_path / "out" / "predictions.jsonl"),
            "--data",
            str(tsv),
            "--output",
            str(tmp_path / "xt"),
            "--rule",
            "xtuner",
        ]
    )
    assert code == 0
    res = json.loads((tmp_path / "xt" / "results.json").read_text())
    assert res["rule"]["name"] == "xtuner" and res["headline"]["value"] == 0.0
    assert res["other_rules"] == {"vlmevalkit": 0.5}
    assert res["predictions_from"].endswith("predictions.jsonl") and res["checkpoint"] == "ck"
    assert res["extraction_failures"] == 0  # "B" is a valid letter, just wrong


def test_resume_skips_answered_rows_and_combines(tsv, tmp_path, scripted):
    out = tmp_path / "out"

    def crash_on_second_batch(query, calls=[]):  # noqa: B006 - counts calls across the run
        calls.append(query)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return answer_like_a_model(query)

    with pytest.raises(KeyboardInterrupt):
        mmbench.run_mmbench(
            tsv, out, predictor=Predictor(scripted(crash_on_second_batch), "ck", batch_size=2)
        )
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2

    second = scripted(answer_like_a_model)
    res = mmbench.run_mmbench(tsv, out, predictor=Predictor(second, "ck", batch_size=2))
    assert len(second.asked) == 4 and res["reused_predictions"] == 2
    assert res["scores"]["circular"]["value"] == 0.5 and res["n_rows"] == 6

    third = scripted(answer_like_a_model)
    res = mmbench.run_mmbench(tsv, out, predictor=Predictor(third, "ck"))
    assert third.asked == [] and res["reused_predictions"] == 6

    with pytest.raises(DataError, match="predicted with checkpoint 'ck', this run uses 'other'"):
        mmbench.run_mmbench(tsv, out, predictor=Predictor(second, "other"))
    with pytest.raises(DataError, match="prompt for id 0 differs"):
        mmbench.run_mmbench(tsv, out, predictor=Predictor(second, "ck"), lang="cn")


def test_resume_refuses_predictions_of_other_weights(tsv, tmp_path, scripted):
    """Same checkpoint path, retrained weights: the old predictions must not be mixed into the new score."""
    out = tmp_path / "out"
    res = mmbench.run_mmbench(
        tsv, out, predictor=Predictor(scripted(answer_like_a_model), "ck", weights="sha256:aa")
    )
    assert res["weights"] == "sha256:aa"
    assert "- weights: `sha256:aa`" in (out / "results.md").read_text()
    assert all(json.loads(line)["weights"] == "sha256:aa" for line in (out / "predictions.jsonl").open())
    with pytest.raises(DataError, match="predicted with weights 'sha256:aa', this run uses 'sha256:bb'"):
        mmbench.run_mmbench(
            tsv, out, predictor=Predictor(scripted(answer_like_a_model), "ck", weights="sha256:bb")
        )


def test_cli_with_checkpoint_limit_and_generated_rotations(tmp_path, monkeypatch, scripted):
    plain = tmp_path / "plain.tsv"
    mmbench.write_mmbench_tsv(ROWS, plain)
    fake = scripted(answer_like_a_model)
    monkeypatch.setattr(arguments, "load_assistant", lambda ckpt, load_4bit=False, overrides=None: fake)
    monkeypatch.setattr(arguments, "stage_fingerprint", lambda ckpt: "sha256:" + ckpt)
    argv = [
        "--checkpoint",
        "ckpt-dir",
        "--data",
        str(plain),
        "--output",
        str(tmp_path / "o"),
        "--circular",
        "--limit",
        "1",
        "--batch-size",
        "3",
    ]
    assert mmbench.main(argv) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert len(fake.asked) == 4 and res["n_questions"] == 1 and res["rotations_generated"]
    assert res["headline"]["value"] == 0.0  # the animal question with its failing rotation
    assert res["command"].endswith(" ".join(argv)) and res["checkpoint"] == "ckpt-dir"
    assert res["weights"] == "sha256:ckpt-dir"


def test_circular_flag_refuses_a_file_with_rotations(tsv, tmp_path, scripted):
    with pytest.raises(DataError, match="--circular: the data already has circular rotations"):
        mmbench.run_mmbench(
            tsv, tmp_path / "o", predictor=Predictor(scripted(answer_like_a_model), "c"), circular=True
        )


def _write_tsv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


HEADER = ["index", "question", "A", "B", "C", "D", "answer", "image"]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [[0, "q", "a", "b", "c", "d", "E", ""]],
            r"bench.tsv row 1: column 'answer' is 'E', not one of the non-empty options A-D",
        ),
        (
            [[0, "q", "a", "b", "c", "nan", "D", ""]],
            r"row 1: column 'answer' is 'D', not one of the non-empty options A-C",
        ),
        (
            [[0, "q", "a", "b", "", "", "A", ""], [0, "q", "a", "b", "", "", "A", ""]],
            r"row 2: index 0 repeats .*row 1",
        ),
        ([[0, "q", "a", "b", "", "", "A"]], r"row 1: has 7 fields, the header has 8"),
        ([["x", "q", "a", "b", "", "", "A", ""]], r"row 1: column 'index' is 'x', not an integer"),
        ([[0, "q", "a", "", "", "", "A", ""]], r"row 1: has 1 non-empty option\(s\)"),
        (
            [[0, "q", "a", "b", "", "", "A", "7"]],
            r"row 1: column 'image' is '7': neither an image nor the index",
        ),
    ],
)
def test_bad_tsv_errors_name_row_and_field(tmp_path, rows, message):
    path = tmp_path / "bench.tsv"
    _write_tsv(path, HEADER, rows)
    with pytest.raises(DataError, match=message):
        mmbench.load_mmbench_tsv(path)


def test_bad_base64_image_names_the_row(tmp_path):
    path = tmp_path / "bench.tsv"
    _write_tsv(path, HEADER, [[0, "q", "a", "b", "", "", "A", "!" * 100]])
    row = mmbench.load_mmbench_tsv(path).rows[0]
    with pytest.raises(DataError, match=r"bench.tsv row 1: column 'image' is not a base64-encoded image"):
        mmbench.decode_image(row)


def test_missing_column_is_reported(tmp_path):
    path = tmp_path / "bench.tsv"
    _write_tsv(path, ["index", "question", "A", "B"], [[0, "q", "a", "b"]])
    with pytest.raises(DataError, match=r"bench.tsv header: missing column\(s\) \['answer'\]"):
        mmbench.load_mmbench_tsv(path)


def test_decoded_image_round_trips(tsv):
    img = mmbench.decode_image(mmbench.load_mmbench_tsv(tsv).rows[4])
    assert isinstance(img, Image.Image) and img.getpixel((3, 3)) == (0, 0, 255)


def test_rotation_without_its_main_row_is_ignored_counted_and_reported(tmp_path, scripted, caplog):
    """As VLMEvalKit's circular evaluation, which groups rows under main rows only: the orphan is not scored."""
    path = tmp_path / "bench.tsv"
    rows = [
        [0, "q0", "a", "b", "", "", "A", ""],
        [1_000_000, "q0", "b", "a", "", "", "B", ""],
        [1_000_005, "q5", "x", "y", "", "", "A", "5"],  # main row 5 missing; its image cell names it
        [1, "q1", "c", "d", "", "", "B", ""],
        [1_000_001, "q1", "d", "c", "", "", "A", ""],
    ]
    _write_tsv(path, HEADER, rows)
    with caplog.at_level(logging.WARNING, logger="llava_ft"):
        bench = mmbench.load_mmbench_tsv(path)
    assert [r.index for r in bench.rows] == [0, 1_000_000, 1, 1_000_001]
    assert [(r.index, r.where) for r in bench.orphans] == [(1_000_005, f"{path} row 3")]
    assert "1 rotation row(s) without their main row ignored (first: index 1000005" in caplog.text

    right = {"a", "d"}
    fake = scripted(lambda q: next(k for k, v in options_in(q.question).items() if v in right))
    out = tmp_path / "out"
    res = mmbench.run_mmbench(path, out, predictor=Predictor(fake, "ck"))
    assert len(fake.asked) == 4 and not any(q.question.startswith("q5") for q in fake.asked)
    assert res["orphan_rotations"] == {"n": 1, "indices": [1_000_005]}
    assert res["n_questions"] == 2 and res["n_rows"] == 4 and res["headline"]["value"] == 1.0
    stored = [json.loads(line)["index"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert stored == [0, 1_000_000, 1, 1_000_001]
    md = (out / "results.md").read_text()
    assert "- ignored: 1 rotation rows whose main row is missing (indices 1000005), as VLMEvalKit's" in md
    assert json.loads((out / "results.json").read_text())["orphan_rotations"]["n"] == 1


def test_no_orphans_reported_as_zero(tsv, tmp_path, scripted):
    res = mmbench.run_mmbench(tsv, tmp_path / "out", predictor=Predictor(scripted(answer_like_a_model), "ck"))
    assert res["orphan_rotations"] == {"n": 0, "indices": []}
    assert "ignored" not in (tmp_path / "out" / "results.md").read_text()
