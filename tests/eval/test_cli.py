"""The eval scripts' command line: user errors as one `error:` line, re-scoring without images, resume notice."""

import json
from pathlib import Path

import pytest

from llava_ft.eval import arguments, mmbench, pope, vqa
from llava_ft.testing.tiny_llava import write_tiny_stage_output

COLOURS = ["red", "blue", "green"]
N = 4


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _vqa_rows(image: str = "red.png") -> list[dict]:
    return [
        {"question_id": i, "image": image, "question": f"q{i}?", "answers": ["yes"] * 10} for i in range(N)
    ]


def _pope_rows(image: str = "red.png") -> list[dict]:
    return [{"question_id": i, "image": image, "text": f"Is there {i}?", "label": "yes"} for i in range(N)]


def _error_line(capsys) -> str:
    """The one `error:` line a user error leaves on stderr (model loading may print progress before it), and
    no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture
def fake_model(monkeypatch, scripted):
    fake = scripted(lambda q: "yes")
    monkeypatch.setattr(arguments, "load_assistant", lambda ckpt, load_4bit=False, overrides=None: fake)
    monkeypatch.setattr(arguments, "stage_fingerprint", lambda ckpt: "sha256:w")
    return fake


def predict_argv(data: Path, images: Path, output: Path) -> list[str]:
    return ["--checkpoint", "ck", "--data", str(data), "--images", str(images), "--output", str(output)]


# ------------------------------------------------------------------------------------------ user errors


def test_missing_image_is_one_error_line(tmp_path, image_dir, fake_model, capsys):
    rows = _vqa_rows()
    rows[3]["image"] = "nope.png"
    data = _write(tmp_path / "vqa_bad.jsonl", rows)
    argv = predict_argv(data, image_dir, tmp_path / "o")
    assert vqa.main(argv) == 2
    line = _error_line(capsys)
    assert line.endswith(f"vqa_bad.jsonl line 4: field 'image': file {image_dir / 'nope.png'} not found")
    assert fake_model.asked == []


def test_bad_json_line_is_one_error_line(tmp_path, image_dir, fake_model, capsys):
    data = tmp_path / "pope.jsonl"
    data.write_text(json.dumps(_pope_rows()[0]) + "\n{not json\n")
    argv = predict_argv(data, image_dir, tmp_path / "o")
    assert pope.main(argv) == 2
    assert _error_line(capsys).endswith(
        "pope.jsonl line 2: not valid JSON (Expecting property name enclosed in double quotes)"
    )


def test_missing_predictions_file_is_one_error_line(tmp_path, capsys):
    data = _write(tmp_path / "vqa.jsonl", _vqa_rows())
    argv = [
        "--predictions",
        str(tmp_path / "nope.jsonl"),
        "--data",
        str(data),
        "--output",
        str(tmp_path / "o"),
    ]
    assert vqa.main(argv) == 2
    assert "nope.jsonl" in _error_line(capsys)


def test_wrong_checkpoint_folder_is_one_error_line(tmp_path, image_dir, capsys):
    data = _write(tmp_path / "pope.jsonl", _pope_rows())
    wrong = tmp_path / "no-such-checkpoint"
    argv = [
        "--checkpoint",
        str(wrong),
        "--data",
        str(data),
        "--images",
        str(image_dir),
        "--output",
        str(tmp_path),
    ]
    assert pope.main(argv) == 2
    assert _error_line(capsys).endswith(f"error: {wrong}: not a folder")


def test_bugs_keep_their_traceback(tmp_path, image_dir, monkeypatch, scripted):
    """Only bad input is reported as an error line: anything else is a bug and must show where it happened."""
    monkeypatch.setattr(arguments, "stage_fingerprint", lambda ckpt: "sha256:w")
    broken = scripted(lambda q: 1 / 0)
    monkeypatch.setattr(arguments, "load_assistant", lambda ckpt, load_4bit=False, overrides=None: broken)
    data = _write(tmp_path / "vqa.jsonl", _vqa_rows())
    argv = ["--checkpoint", "ck", "--data", str(data), "--images", str(image_dir), "--output", str(tmp_path)]
    with pytest.raises(ZeroDivisionError):
        vqa.main(argv)
    # A plain ValueError (a damaged weights file, say) is not a user error either: llava-ft re-raises it too.
    monkeypatch.setattr(
        arguments,
        "load_assistant",
        lambda ckpt, load_4bit=False, overrides=None: (_ for _ in ()).throw(ValueError("x")),
    )
    with pytest.raises(ValueError, match="^x$"):
        vqa.main(argv)


def test_resume_refusal_of_retrained_weights_with_a_real_checkpoint(tmp_path, image_dir, capsys):
    """The documented refusal, end to end: a stage retrained in place under the same path."""
    models, ckpt, out = tmp_path / "models", tmp_path / "stage", tmp_path / "out"
    write_tiny_stage_output(models, ckpt, seed=0)
    data = _write(tmp_path / "pope.jsonl", _pope_rows())
    argv = ["--checkpoint", str(ckpt), "--data", str(data), "--images", str(image_dir), "--output", str(out)]
    assert pope.main([*argv, "--max-new-tokens", "2", "--limit", "2"]) == 0
    before = (out / "predictions.jsonl").read_bytes()
    old = json.loads(before.splitlines()[0])["weights"]
    write_tiny_stage_output(models, ckpt, seed=1)
    capsys.readouterr()
    assert pope.main([*argv, "--max-new-tokens", "2"]) == 2
    line = _error_line(capsys)
    assert f"predictions.jsonl line 1: predicted with weights '{old}', this run uses 'sha256:" in line
    assert line.endswith("; use a fresh --output directory")
    assert (out / "predictions.jsonl").read_bytes() == before


def test_refused_resume_in_mmbench_is_one_error_line(tmp_path, monkeypatch, scripted, capsys):
    tsv = tmp_path / "bench.tsv"
    mmbench.write_mmbench_tsv(
        [{"index": 0, "question": "q", "options": ["a", "b"], "answer": "A", "category": "c",
          "l2-category": "l", "image": __import__("PIL.Image").Image.new("RGB", (8, 8))}],
        tsv,
    )  # fmt: skip
    monkeypatch.setattr(
        arguments, "load_assistant", lambda ckpt, load_4bit=False, overrides=None: scripted(lambda q: "A")
    )
    argv = ["--checkpoint", "ck", "--data", str(tsv), "--output", str(tmp_path / "o")]
    monkeypatch.setattr(arguments, "stage_fingerprint", lambda ckpt: "sha256:aa")
    assert mmbench.main(argv) == 0
    monkeypatch.setattr(arguments, "stage_fingerprint", lambda ckpt: "sha256:bb")
    capsys.readouterr()
    assert mmbench.main(argv) == 2
    assert _error_line(capsys).endswith(
        "predicted with weights 'sha256:aa', this run uses 'sha256:bb'; use a fresh --output directory"
    )


# ------------------------------------------------------------------------------------------ re-scoring


@pytest.mark.parametrize(("module", "rows"), [(vqa, _vqa_rows), (pope, _pope_rows)])
@pytest.mark.parametrize("images", ["none", "empty_folder"])
def test_rescore_needs_no_images(tmp_path, module, rows, images, capsys):
    """A re-score reads no pixels: neither --images nor the image files may be required."""
    data = _write(tmp_path / "data.jsonl", rows(image="not/on/disk.png"))
    preds = _write(tmp_path / "preds.jsonl", [{"question_id": i, "prediction": "yes"} for i in range(N)])
    argv = ["--predictions", str(preds), "--data", str(data), "--output", str(tmp_path / "o")]
    if images == "empty_folder":
        (tmp_path / "empty").mkdir()
        argv += ["--images", str(tmp_path / "empty")]
    assert module.main(argv) == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["n_items"] == N and res["headline"]["value"] == 1.0


@pytest.mark.parametrize("module", [vqa, pope])
def test_predicting_still_needs_images(tmp_path, module, fake_model, capsys):
    data = _write(tmp_path / "data.jsonl", _vqa_rows() if module is vqa else _pope_rows())
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--checkpoint", "ck", "--data", str(data), "--output", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "--images is required with --checkpoint" in capsys.readouterr().err
    assert fake_model.asked == []


# ------------------------------------------------------------------------------------------ resume notice


def test_resume_says_how_many_predictions_it_reused(tmp_path, image_dir, fake_model, capsys):
    data = _write(tmp_path / "vqa.jsonl", _vqa_rows())
    out = tmp_path / "out"
    argv = ["--checkpoint", "ck", "--data", str(data), "--images", str(image_dir), "--output", str(out)]
    assert vqa.main([*argv, "--limit", "1"]) == 0
    assert "resuming" not in capsys.readouterr().err  # nothing to reuse: nothing said
    assert vqa.main(argv) == 0
    err = capsys.readouterr().err
    assert f"resuming: 1 of {N} predictions reused from {out / 'predictions.jsonl'}\n" in err
    assert len(fake_model.asked) == N


@pytest.mark.parametrize("bench", ["vqa", "pope"])
def test_bad_data_is_reported_before_the_model_loads(bench, tmp_path, image_dir, monkeypatch, capsys):
    """Loading a real model takes minutes: a missing image must not wait for it."""
    monkeypatch.setattr(arguments, "load_assistant", lambda *a, **k: pytest.fail("the model loaded first"))
    rows = _vqa_rows() if bench == "vqa" else _pope_rows()
    rows[1]["image"] = "nope.png"
    data = _write(tmp_path / f"{bench}.jsonl", rows)
    module = vqa if bench == "vqa" else pope
    assert module.main(predict_argv(data, image_dir, tmp_path / "o")) == 2
    assert _error_line(capsys).endswith(f"line 2: field 'image': file {image_dir / 'nope.png'} not found")
