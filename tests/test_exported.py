"""Export folders open where stage outputs do: an hf-llava or merged-llm export of the tiny finetune stage answers
as the stage itself (greedy answers, option log-probabilities), in Python and through `llava-ft chat`."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_ft.cli.main import main
from llava_ft.eval import pope
from llava_ft.export import export_checkpoint
from llava_ft.exported import EXPORT_INFO, folder_kind, load_export
from llava_ft.inference import Assistant, Query, load_assistant
from llava_ft.stage import stage_fingerprint
from llava_ft.testing.tiny_chain import write_tiny_chain
from llava_ft.testing.tiny_llava import write_tiny_stage_output

MAX_NEW = 8
OPTIONS = ["Yes", "No", "A red one"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, Path]:
    """The finetune stage of the tiny chain and its two exports."""
    root = tmp_path_factory.mktemp("chain")
    _, finetune = write_tiny_chain(root)
    folders = {"stage": finetune}
    for fmt in ("hf-llava", "merged-llm"):
        folders[fmt] = export_checkpoint(finetune, root / fmt, fmt=fmt, verify=False).output
    return folders


@pytest.fixture(scope="module")
def stage_assistant(chain) -> Assistant:
    return load_assistant(str(chain["stage"]), device="cpu")


def _images() -> list[Image.Image]:
    gen = torch.Generator().manual_seed(0)
    noise = Image.frombytes(
        "RGB", (37, 23), bytes(torch.randint(0, 256, (37 * 23 * 3,), generator=gen).tolist())
    )
    return [Image.new("RGB", (40, 30), (200, 10, 10)), noise]


def _text_queries() -> list[Query]:
    return [Query("hello there"), Query("Is this a longer text-only question, or not?")]


def _image_queries() -> list[Query]:
    red, noise = _images()
    return [Query("What colour is the shape?", red), Query("Describe the image.", noise)]


def assert_answers_alike(a: Assistant, b: Assistant, queries: list[Query]) -> None:
    assert a.generate(queries, max_new_tokens=MAX_NEW) == b.generate(queries, max_new_tokens=MAX_NEW)
    got = torch.tensor(a.option_logprobs(queries, OPTIONS))
    want = torch.tensor(b.option_logprobs(queries, OPTIONS))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_hf_llava_export_answers_as_the_stage(chain, stage_assistant):
    exported = load_assistant(str(chain["hf-llava"]), device="cpu")
    assert exported.has_vision and exported.template.name == stage_assistant.template.name
    assert exported.stop_ids == stage_assistant.stop_ids
    assert exported.model.llm.get_input_embeddings().weight.shape == (
        stage_assistant.model.llm.get_input_embeddings().weight.shape
    )
    for image in _images():  # the export's LlavaImageProcessor read back as llava_ft's preprocessing
        torch.testing.assert_close(exported.processor(image), stage_assistant.processor(image))
    assert_answers_alike(exported, stage_assistant, _image_queries() + _text_queries())


def test_merged_llm_export_answers_text_as_the_stage(chain, stage_assistant):
    exported = load_assistant(str(chain["merged-llm"]), device="cpu")
    assert not exported.has_vision
    assert_answers_alike(exported, stage_assistant, _text_queries())
    with pytest.raises(ValueError, match="text-only"):
        exported.generate(_image_queries()[:1])


@pytest.mark.parametrize("fmt", ["hf-llava", "merged-llm"])
def test_export_without_info_file_finds_its_template(chain, stage_assistant, tmp_path, fmt):
    """An export folder without llava_ft's record (written by other tools, or by hand) still opens: the
    template is the one its Jinja renders like, and hf-llava's added `<image>` row is recognised."""
    copy = shutil.copytree(chain[fmt], tmp_path / fmt)
    (copy / EXPORT_INFO).unlink()
    assert folder_kind(copy) == fmt
    exported = load_assistant(str(copy), device="cpu")
    assert exported.template.name == stage_assistant.template.name
    queries = _text_queries() + (_image_queries() if fmt == "hf-llava" else [])
    assert_answers_alike(exported, stage_assistant, queries)


def test_unknown_chat_template_is_one_error(chain, tmp_path):
    copy = shutil.copytree(chain["merged-llm"], tmp_path / "merged")
    (copy / EXPORT_INFO).unlink()
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    for jinja in copy.glob("chat_template.jinja"):
        jinja.write_text(config["chat_template"])
    with pytest.raises(ValueError, match="renders like none of llava_ft's templates"):
        load_export(copy)


def chat(argv: list, capsys, monkeypatch) -> tuple[int, list[str], str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    rc = main(["chat", *map(str, argv), "--max-new-tokens", str(MAX_NEW)])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err


def test_chat_command_opens_exports(chain, tmp_path, capsys, monkeypatch):
    image = tmp_path / "red.png"
    _images()[0].save(image)
    argv = ["--image", image, "--question", "What colour is it?"]
    rc, want, _ = chat([chain["stage"], *argv], capsys, monkeypatch)
    assert rc == 0 and len(want) == 1
    assert chat([chain["hf-llava"], *argv], capsys, monkeypatch)[:2] == (0, want)

    rc, out, err = chat([chain["merged-llm"], *argv], capsys, monkeypatch)
    assert rc == 2 and not out and len(err.strip().splitlines()) == 1 and "text-only" in err
    rc, out, _ = chat([chain["merged-llm"], "--question", "hello there"], capsys, monkeypatch)
    assert rc == 0 and len(out) == 1

    rc, out, err = chat([chain["hf-llava"], "--model.llm", tmp_path, "--question", "hi"], capsys, monkeypatch)
    assert rc == 2 and "--model.llm apply to stage outputs" in err


def test_not_a_model_folder_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    (tmp_path / "notes.txt").write_text("not a model")
    rc, out, err = chat([tmp_path, "--question", "hi"], capsys, monkeypatch)
    assert rc == 2 and not out
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"llava-ft chat: error: {tmp_path}: ")
    assert (
        "not a llava_ft stage output" in err
        and "nor an export" in err
        and "llava_ft.yaml" in err
        and "config.json" in err
    )


def test_fingerprint_of_an_export_follows_its_files(chain, tmp_path):
    copy = shutil.copytree(chain["merged-llm"], tmp_path / "merged")
    before = stage_fingerprint(copy)
    assert before == stage_fingerprint(chain["merged-llm"]) != stage_fingerprint(chain["hf-llava"])
    config = copy / "generation_config.json"
    config.write_text(config.read_text().replace("{", '{"note": 1,', 1))
    assert stage_fingerprint(copy) != before


def test_moved_base_and_moved_export(tmp_path, capsys, monkeypatch):
    """Export after the base models moved (with the flags that name them), then move the export and delete the
    stage and its bases: chat answers from the export alone, as the stage did."""
    root = tmp_path / "train"
    _, finetune = write_tiny_chain(root)
    moved = tmp_path / "moved_bases"
    shutil.move(root / "bases", moved)
    out = tmp_path / "export"
    capsys.readouterr()  # what building the chain printed

    rc = main(["export", str(finetune), "--output", str(out), "--no-verify"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "pass --model.llm DIR" in err

    bases = [
        "--model.llm",
        str(moved / "llm_internlm2"),
        "--model.vision.model",
        f"local-dir:{moved}/clip_open_clip",
    ]
    stage = load_assistant(
        str(finetune),
        device="cpu",
        overrides={k.removeprefix("--"): v for k, v in zip(bases[::2], bases[1::2], strict=True)},
    )
    query = _image_queries()[:1]
    want = stage.generate(query, max_new_tokens=MAX_NEW)
    assert main(["export", str(finetune), "--output", str(out), "--no-verify", *bases]) == 0
    capsys.readouterr()

    far = shutil.copytree(out, tmp_path / "elsewhere" / "export")
    for folder in (root, moved, out):
        shutil.rmtree(folder)
    assert load_assistant(str(far), device="cpu").generate(query, max_new_tokens=MAX_NEW) == want
    image = tmp_path / "noise.png"
    query[0].image.save(image)
    rc, lines, _ = chat([far, "--image", image, "--question", query[0].question], capsys, monkeypatch)
    assert rc == 0 and lines == want


def test_eval_script_runs_on_an_export(chain, tmp_path):
    """An evaluation script predicts with an export, and its predictions name the export's fingerprint."""
    images = tmp_path / "images"
    images.mkdir()
    _images()[0].save(images / "red.png")
    rows = [
        {"question_id": i, "image": "red.png", "text": f"Is there a {i}?", "label": "yes"} for i in range(2)
    ]
    data = tmp_path / "pope.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    argv = ["--checkpoint", str(chain["hf-llava"]), "--data", str(data), "--images", str(images)]
    assert pope.main([*argv, "--output", str(out), "--max-new-tokens", "2"]) == 0
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2
    assert {p["weights"] for p in predictions} == {stage_fingerprint(chain["hf-llava"])}


def test_tokenizer_template_round_trips(tmp_path):
    """A stage trained with the tokenizer's own chat template: the export records the Jinja training rendered
    with (the export's own is rewritten for processors), and opens with it."""
    stage = write_tiny_stage_output(tmp_path, tmp_path / "stage", llm_mode="lora", template="tokenizer")
    out = export_checkpoint(stage, tmp_path / "llava", fmt="hf-llava", verify=False).output
    exported, original = load_assistant(str(out), device="cpu"), load_assistant(str(stage), device="cpu")
    assert exported.template.name == "tokenizer"
    assert (exported.stop_ids, exported.stop_strings) == (original.stop_ids, original.stop_strings)
    assert_answers_alike(exported, original, _text_queries() + _image_queries())
