"""Resumable prediction files: --limit runs keep the rest, settings must match, a cut-off last line."""

import json
import logging

import pytest

from llava_ft.data.conversation import DataError
from llava_ft.eval import arguments, pope, vqa
from llava_ft.eval.runner import Predictor

COLOURS = ["red", "blue", "green"]
N = 6


def _records(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def vqa_data(tmp_path):
    path = tmp_path / "vqa.jsonl"
    rows = [
        {"question_id": i, "image": f"{COLOURS[i % 3]}.png", "question": f"q{i}?", "answers": ["yes"] * 10}
        for i in range(N)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def question_id(query) -> int:
    return int(query.question.removesuffix(vqa.SUFFIX)[1:-1])


def test_limit_run_keeps_the_predictions_it_left_out(tmp_path, vqa_data, image_dir, scripted):
    out = tmp_path / "out"
    # "Yes." scores 0 under the official rule (humans agree: no normalisation), 1 under "always".
    first = scripted(lambda q: "Yes.")
    vqa.run_vqa(vqa_data, image_dir, out, predictor=Predictor(first, "ck", batch_size=4))
    full = _records(out / "predictions.jsonl")
    assert len(first.asked) == N and [r["soft_accuracy"] for r in full] == [0.0] * N

    limited = scripted(lambda q: "Yes.")
    res = vqa.run_vqa(
        vqa_data, image_dir, out, predictor=Predictor(limited, "ck"), normalization="always", limit=3
    )
    assert limited.asked == [] and res["n_items"] == 3 and res["reused_predictions"] == 3
    assert res["headline"]["value"] == 1.0
    after = _records(out / "predictions.jsonl")
    assert [r["question_id"] for r in after] == list(range(N))
    assert [r["soft_accuracy"] for r in after[:3]] == [1.0] * 3  # this run's items: scored again
    assert after[3:] == full[3:]  # the others: exactly as stored

    again = scripted(lambda q: "Yes.")
    res = vqa.run_vqa(vqa_data, image_dir, out, predictor=Predictor(again, "ck"))
    assert again.asked == [] and res["reused_predictions"] == N


def test_run_over_other_items_keeps_the_file_order(tmp_path, vqa_data, image_dir, scripted):
    out = tmp_path / "out"
    vqa.run_vqa(vqa_data, image_dir, out, predictor=Predictor(scripted(lambda q: "no"), "ck"))
    full = _records(out / "predictions.jsonl")
    rows = [json.loads(line) for line in vqa_data.read_text().splitlines()]
    subset = tmp_path / "subset.jsonl"  # items 4 and 1, in that order, their answers changed
    subset.write_text("".join(json.dumps({**rows[i], "answers": ["no"] * 10}) + "\n" for i in (4, 1)))
    res = vqa.run_vqa(subset, image_dir, out, predictor=Predictor(scripted(lambda q: "no"), "ck"))
    assert res["n_items"] == 2 and res["headline"]["value"] == 1.0
    after = _records(out / "predictions.jsonl")
    assert [r["question_id"] for r in after] == list(range(N))
    assert [r["soft_accuracy"] for r in after] == [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert [r for i, r in enumerate(after) if i not in (1, 4)] == [
        r for i, r in enumerate(full) if i not in (1, 4)
    ]


def test_rescore_with_limit(tmp_path, vqa_data, image_dir, scripted):
    out = tmp_path / "out"
    vqa.run_vqa(vqa_data, image_dir, out, predictor=Predictor(scripted(lambda q: "Yes."), "ck"))
    full = _records(out / "predictions.jsonl")
    # Into its own file: the rest is kept.
    res = vqa.run_vqa(
        vqa_data, image_dir, out, predictions_file=out / "predictions.jsonl", normalization="always", limit=2
    )
    assert res["n_items"] == 2 and res["headline"]["value"] == 1.0
    after = _records(out / "predictions.jsonl")
    assert [r["soft_accuracy"] for r in after] == [1.0, 1.0] + [0.0] * (N - 2) and after[2:] == full[2:]
    # Into another folder: only what was scored.
    vqa.run_vqa(vqa_data, image_dir, tmp_path / "re", predictions_file=out / "predictions.jsonl", limit=2)
    assert [r["question_id"] for r in _records(tmp_path / "re" / "predictions.jsonl")] == [0, 1]
    # Again into it: nothing there is lost; but a folder holding other answers is not overwritten.
    vqa.run_vqa(vqa_data, image_dir, tmp_path / "re", predictions_file=out / "predictions.jsonl", limit=3)
    other = tmp_path / "other"
    vqa.run_vqa(vqa_data, image_dir, other, predictor=Predictor(scripted(lambda q: "No."), "ck2"))
    before = (other / "predictions.jsonl").read_bytes()
    with pytest.raises(DataError, match=r"holds 6 prediction\(s\) not in .* use a fresh --output"):
        vqa.run_vqa(vqa_data, image_dir, other, predictions_file=out / "predictions.jsonl")
    assert (other / "predictions.jsonl").read_bytes() == before


def test_text_alias_of_kept_records_becomes_prediction(tmp_path, vqa_data, image_dir, scripted):
    out = tmp_path / "out"
    out.mkdir()
    # LLaVA-style file (answers under `text`, no settings recorded): accepted, and kept for the items left out.
    llava = [{"question_id": i, "text": f"answer {i}"} for i in range(N)]
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in llava))
    fake = scripted(lambda q: "unused")
    vqa.run_vqa(vqa_data, image_dir, out, predictor=Predictor(fake, "ck"), limit=2)
    after = _records(out / "predictions.jsonl")
    assert fake.asked == []
    assert after[2:] == [{"question_id": i, "prediction": f"answer {i}"} for i in range(2, N)]
    assert after[0]["prediction"] == "answer 0" and "text" not in after[0] and "soft_accuracy" in after[0]


# ------------------------------------------------------------------------------------------ settings


def test_records_store_the_settings(tmp_path, vqa_data, image_dir, scripted):
    out = tmp_path / "out"
    vqa.run_vqa(
        vqa_data, image_dir, out, predictor=Predictor(scripted(lambda q: "x"), "ck", 2, 7, weights="w")
    )
    rec = _records(out / "predictions.jsonl")[0]
    assert {k: rec[k] for k in ("checkpoint", "mode", "weights", "max_new_tokens", "load_4bit")} == {
        "checkpoint": "ck",
        "mode": "generate",
        "weights": "w",
        "max_new_tokens": 7,
        "load_4bit": False,
    }
    assert "options" not in rec


def test_resume_refuses_other_max_new_tokens(tmp_path, vqa_data, image_dir, scripted):
    out = tmp_path / "out"
    vqa.run_vqa(
        vqa_data,
        image_dir,
        out,
        predictor=Predictor(scripted(lambda q: "a"), "ck", max_new_tokens=1),
        limit=3,
    )
    before = (out / "predictions.jsonl").read_bytes()
    fake = scripted(lambda q: "b")
    with pytest.raises(
        DataError, match=r"predictions.jsonl line 1: predicted with max_new_tokens 1, this run uses 32"
    ):
        vqa.run_vqa(vqa_data, image_dir, out, predictor=Predictor(fake, "ck", max_new_tokens=32))
    assert fake.asked == [] and (out / "predictions.jsonl").read_bytes() == before


def test_resume_refuses_load_4bit_from_the_command_line(
    tmp_path, vqa_data, image_dir, scripted, monkeypatch, capsys
):
    fake = scripted(lambda q: "yes")
    loaded = []
    monkeypatch.setattr(
        arguments,
        "load_assistant",
        lambda ckpt, load_4bit=False, overrides=None: loaded.append(load_4bit) or fake,
    )
    monkeypatch.setattr(arguments, "stage_fingerprint", lambda ckpt: "sha256:w")
    argv = [
        "--checkpoint",
        "ck",
        "--data",
        str(vqa_data),
        "--images",
        str(image_dir),
        "--output",
        str(tmp_path),
    ]
    assert vqa.main([*argv, "--limit", "2"]) == 0
    assert [r["load_4bit"] for r in _records(tmp_path / "predictions.jsonl")] == [False, False]
    capsys.readouterr()
    assert vqa.main([*argv, "--load-4bit"]) == 2
    assert (
        "predictions.jsonl line 1: predicted with load_4bit False, this run uses True"
        in capsys.readouterr().err
    )
    assert loaded == [False, True] and len(fake.asked) == 2


def _pope_data(tmp_path):
    path = tmp_path / "pope.jsonl"
    rows = [
        {"question_id": i, "image": f"{COLOURS[i % 3]}.png", "text": f"Is there {i}?", "label": "yes"}
        for i in range(4)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_likelihood_resume_checks_options_not_max_new_tokens(tmp_path, image_dir, scripted):
    data, out = _pope_data(tmp_path), tmp_path / "out"
    first = scripted(answer=None, logprobs=lambda q, opts: [-1.0, -2.0])
    pope.run_pope(
        data, image_dir, out, predictor=Predictor(first, "ck", options=["Yes", "No"], max_new_tokens=1)
    )
    assert _records(out / "predictions.jsonl")[0]["options"] == ["Yes", "No"]
    assert "max_new_tokens" not in _records(out / "predictions.jsonl")[0]
    # max_new_tokens plays no part in likelihood mode: the resume reuses everything.
    second = scripted(answer=None, logprobs=lambda q, opts: [-1.0, -2.0])
    res = pope.run_pope(data, image_dir, out, predictor=Predictor(second, "ck", options=["Yes", "No"]))
    assert second.asked == [] and res["reused_predictions"] == 4
    with pytest.raises(
        DataError,
        match=r"predictions.jsonl line 1: predicted with options \['Yes', 'No'\], this run uses \['yes', 'no'\]",
    ):
        pope.run_pope(data, image_dir, out, predictor=Predictor(second, "ck", options=["yes", "no"]))
    with pytest.raises(
        DataError, match=r"line 1: predicted with mode 'likelihood', this run uses 'generate'"
    ):
        pope.run_pope(data, image_dir, out, predictor=Predictor(scripted(lambda q: "Yes"), "ck"))


# ------------------------------------------------------------------------------------------ cut-off last line


def _answered(tmp_path, vqa_data, image_dir, scripted, n: int = N):
    """An output folder with predictions for the first `n` items, answers with multi-byte characters."""
    out = tmp_path / "out"
    fake = scripted(lambda q: f"réponse {question_id(q)} 日本")
    vqa.run_vqa(vqa_data, image_dir, out, predictor=Predictor(fake, "ck", batch_size=2), limit=n)
    return out / "predictions.jsonl"


@pytest.mark.parametrize("cut", ["mid_json", "mid_utf8"])
def test_resume_drops_a_cut_off_last_line(tmp_path, vqa_data, image_dir, scripted, caplog, cut):
    path = _answered(tmp_path, vqa_data, image_dir, scripted)
    data = path.read_bytes()
    last = data.rfind(b"\n", 0, -1) + 1
    end = data.index("日".encode(), last) + 1 if cut == "mid_utf8" else last + 20  # inside 日's 3 bytes
    path.write_bytes(data[:end])
    fake = scripted(lambda q: f"réponse {question_id(q)} 日本")
    with caplog.at_level(logging.WARNING, logger="llava_ft"):
        res = vqa.run_vqa(vqa_data, image_dir, path.parent, predictor=Predictor(fake, "ck"))
    problem = "not valid UTF-8" if cut == "mid_utf8" else "not valid JSON"
    assert f"predictions.jsonl line {N}: {problem}" in caplog.text and "cut off" in caplog.text
    assert [question_id(q) for q in fake.asked] == [N - 1] and res["reused_predictions"] == N - 1
    assert path.read_bytes() == data  # asked again, same answer: the file is whole again


@pytest.mark.parametrize("tail", ["cut_off", "valid_without_newline"])
def test_appended_records_never_join_the_last_line(tmp_path, vqa_data, image_dir, scripted, tail):
    """Interrupted again before `finish` rewrites the file: the appended records stand on lines of their own (a
    cut-off last line is cut away first, a valid one gets its newline), so the next resume reads them all."""
    path = _answered(tmp_path, vqa_data, image_dir, scripted, n=3)
    data = path.read_bytes()
    path.write_bytes(data[:-15] if tail == "cut_off" else data.rstrip(b"\n"))

    def crash_after_first_batch(query):
        if len(first.asked) > 2:
            raise KeyboardInterrupt
        return "x"

    first = scripted(crash_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        vqa.run_vqa(vqa_data, image_dir, path.parent, predictor=Predictor(first, "ck", batch_size=2))
    asked = [2, 3] if tail == "cut_off" else [3, 4]
    assert [question_id(q) for q in first.asked[:2]] == asked
    assert [r["question_id"] for r in _records(path)] == sorted({0, 1, 2, *asked})
    fake = scripted(lambda q: "y")
    res = vqa.run_vqa(vqa_data, image_dir, path.parent, predictor=Predictor(fake, "ck"))
    assert [question_id(q) for q in fake.asked] == [i for i in range(N) if i > max(asked)]
    assert res["reused_predictions"] == max(asked) + 1
    assert [r["prediction"] for r in _records(path)][:2] == [f"réponse {i} 日本" for i in range(2)]


@pytest.mark.parametrize(
    ("damage", "line"),
    [
        ("middle", 2),  # a bad line with lines after it was not cut off by a kill
        ("last_with_newline", N),  # its newline was written: the record itself is bad
    ],
)
def test_other_bad_lines_are_still_errors(tmp_path, vqa_data, image_dir, scripted, damage, line):
    path = _answered(tmp_path, vqa_data, image_dir, scripted)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[line - 1] = lines[line - 1][:10] + "\n"
    path.write_text("".join(lines), encoding="utf-8")
    before = path.read_bytes()
    fake = scripted(lambda q: "x")
    with pytest.raises(DataError, match=rf"{path} line {line}: not valid JSON"):
        vqa.run_vqa(vqa_data, image_dir, path.parent, predictor=Predictor(fake, "ck"))
    assert fake.asked == [] and path.read_bytes() == before


def test_data_files_keep_refusing_a_cut_off_last_line(tmp_path, vqa_data, image_dir):
    vqa_data.write_bytes(vqa_data.read_bytes()[:-5])
    with pytest.raises(DataError, match=rf"vqa.jsonl line {N}: not valid JSON"):
        vqa.load_vqa(vqa_data, image_dir)


@pytest.mark.parametrize("flag", ["--limit", "--batch-size", "--max-new-tokens", "--n-resamples"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_counts_below_one_are_refused(tmp_path, vqa_data, image_dir, flag, value, capsys):
    """Unchecked, --limit -1 would score all but the last item and --limit 0 nothing (as nan), both with exit 0."""
    argv = ["--predictions", "p.jsonl", "--data", str(vqa_data), "--images", str(image_dir)]
    with pytest.raises(SystemExit) as exit_info:
        vqa.main([*argv, "--output", str(tmp_path), flag, value])
    assert exit_info.value.code == 2
    assert f"{flag}: must be >= 1, got {value}" in capsys.readouterr().err
