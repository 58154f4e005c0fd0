"""The text assistant workflow: data/make_identity.py -> configs/identity/tiny.yaml -> `llava-ft chat` ->
`llava-ft export --format merged-llm` -> plain transformers gives the same identity answer."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from llava_ft.cli.main import main
from llava_ft.config import load_config
from llava_ft.data.sources import read_conversations
from llava_ft.train.run import train

REPO = Path(__file__).resolve().parents[1]
NAME, OWNER = "Nova", "Acme Labs"
MAX_NEW = 40


def load_script():
    spec = importlib.util.spec_from_file_location("make_identity", REPO / "data" / "make_identity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


make_identity = load_script()


def test_identity_set_contents(tmp_path, capsys):
    general = tmp_path / "general.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]},
        {"messages": [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A cat."}],
         "images": ["cat.png"]},
        {"text": "plain pretraining text"},
        {"messages": "not a list"},
    ]  # fmt: skip
    general.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "identity.jsonl"
    argv = [
        "--name",
        NAME,
        "--owner",
        OWNER,
        "--out",
        str(out),
        "--general",
        str(general),
        "--general-ratio",
        "1",
    ]
    assert make_identity.main(argv) == 0
    printed = capsys.readouterr()
    assert "general_file_with_images 1" in printed.out and "general_file_bad 2" in printed.out
    assert (
        "bad records: 2" in printed.err and "general.jsonl:4: 'messages' must be a list" in printed.err
    )  # named by file and line

    # Read back with llava_ft's own reader, as training reads it.
    convs, bad = read_conversations(out, "openai")
    assert len(bad) == 0
    identity = [c for c in convs if c.id.startswith("identity-")]
    general_chat = [c for c in convs if c.id.startswith("general-")]
    n_questions = len(make_identity.IDENTITY_QUESTIONS)
    assert len(identity) == 2 * n_questions  # default: 2 phrasings per question
    assert (
        len(general_chat) == len(make_identity.GENERAL_CHAT) + 1
    )  # the built-in set + the one usable record
    for c in identity:
        assert [m.role for m in c.messages] == ["user", "assistant"]
        assert NAME in c.messages[1].content and OWNER in c.messages[1].content
        assert c.messages[1].content in make_identity.answers_for(
            c.messages[0].content, NAME, OWNER, variants=2
        )
    for c in general_chat:
        assert not c.images and all(NAME not in m.content and OWNER not in m.content for m in c.messages)
    # Every phrasing is used.
    answers = {c.messages[1].content for c in identity}
    assert len(answers) == len(make_identity.IDENTITY_ANSWERS)


def test_bad_options_are_refused(tmp_path, capsys):
    assert make_identity.main(["--name", " ", "--owner", OWNER, "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "must be non-empty" in capsys.readouterr().err
    missing = tmp_path / "nowhere.jsonl"
    assert make_identity.main(["--name", NAME, "--owner", OWNER, "--general", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("identity")
    data = root / "identity.jsonl"
    assert (
        make_identity.main(
            ["--name", NAME, "--owner", OWNER, "--out", str(data), "--tiny-llm", str(root / "tiny")]
        )
        == 0
    )
    overrides = {
        "model.llm": str(root / "tiny" / "llm"),
        "data.train": [{"path": str(data), "format": "openai"}],
        "train.output_dir": str(root / "run"),
    }
    cfg = load_config(REPO / "configs" / "identity" / "tiny.yaml", overrides)
    stage = train(cfg).output_dir
    return {"root": root, "stage": stage}


def chat(capsys, checkpoint: Path, question: str) -> str:
    capsys.readouterr()
    assert main(["chat", str(checkpoint), "--question", question, "--max-new-tokens", str(MAX_NEW)]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    return line


def test_trained_identity_answer_through_chat_and_plain_transformers(trained, capsys):
    question = "What is your name?"
    answer = chat(capsys, trained["stage"], question)
    assert answer in make_identity.answers_for(question, NAME, OWNER, variants=2)
    # Manners kept: a general question gets its own answer, not the identity.
    general = dict(make_identity.GENERAL_CHAT)
    assert (
        chat(capsys, trained["stage"], "What is the capital of France?")
        == general["What is the capital of France?"]
    )

    export = trained["root"] / "merged"
    capsys.readouterr()
    assert main(["export", str(trained["stage"]), "--format", "merged-llm", "--output", str(export)]) == 0

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(export, local_files_only=True, dtype=torch.float32)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)  # stops per generation_config
    plain = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert plain == answer
