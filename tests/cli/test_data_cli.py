"""`data preview` / `data check` through `main([...])` on tiny generated files and a real tokenizer."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import mistral_common
import pytest
from PIL import Image
from transformers import LlamaTokenizer

from llava_ft.cli.data import add_data_commands, main
from llava_ft.testing.quirks import quirks_records, write_quirks

N_IMG = 4
# internlm/internlm2-chat-1_8b's official chat template (tokenizer_config.json).
INTERNLM2_JINJA = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
RECORDS = [
    {"id": "1", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat.\nReally."},
        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes  sure."}]},
    {"id": "2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there"}]},
]  # fmt: skip


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_tok")
    shutil.copy(
        Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", root / "tokenizer.model"
    )
    tok = LlamaTokenizer.from_pretrained(root)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(root / "tok")
    return root / "tok"


@pytest.fixture(scope="module")
def tok(tok_dir):
    return LlamaTokenizer.from_pretrained(tok_dir)


def write(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def messages_of(record: dict) -> list[dict]:
    roles = {"human": "user", "gpt": "assistant"}
    return [{"role": roles[t["from"]], "content": t["value"]} for t in record["conversations"]]


def test_preview_json_matches_official_template(tmp_path, capsys, tok_dir, tok):
    data = write(tmp_path / "d.jsonl", RECORDS)
    common = [
        "--data",
        data,
        "--template",
        "internlm2_chat",
        "--tokenizer",
        tok_dir,
        "--num-image-tokens",
        N_IMG,
    ]
    code, out, _ = run(capsys, "preview", *common, "--json", "--limit", 0)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["source"] for r in rows] == [f"{data}:1", f"{data}:2"]
    for row, record in zip(rows, RECORDS):
        text = tok.apply_chat_template(messages_of(record), tokenize=False, chat_template=INTERNLM2_JINJA)
        want: list[int] = []
        for k, part in enumerate(text.split("<image>")):
            want += [-200] * N_IMG if k else []
            want += tok(part, add_special_tokens=False)["input_ids"]
        assert row["input_ids"] == want
        trained = [i for i, label in zip(row["input_ids"], row["labels"]) if label != -100]
        answers = [m["content"] + "<|im_end|>" for m in messages_of(record) if m["role"] == "assistant"]
        assert tok.decode(trained) == "".join(answers)


def test_preview_text_highlights_trained_and_images(tmp_path, capsys, tok_dir):
    data = write(tmp_path / "d.jsonl", RECORDS)
    code, out, _ = run(capsys, "preview", "--data", data, "--template", "internlm2_chat", "--tokenizer", tok_dir,
                       "--index", 0)  # fmt: skip
    assert code == 0
    assert f"{data}:1: " in out and f"{data}:2" not in out
    assert out.count("<image x576>") == 1
    green = re.findall(r"\x1b\[32m(.*?)\x1b\[0m", out, flags=re.S)
    assert green[1:] == ["A cat.\nReally.<|im_end|>", "Yes  sure.<|im_end|>"]  # [0]: the legend
    assert "What is it?<|im_end|>\n<|im_start|>assistant\n" in out  # untrained, shown plain


def test_check_reports_and_exit_codes(tmp_path, capsys, tok_dir, tok):
    data = write(
        tmp_path / "d.jsonl", [*RECORDS, "{oops", {"conversations": [{"from": "human", "value": "x"}]}]
    )
    common = [
        "--data",
        data,
        "--template",
        "internlm2_chat",
        "--tokenizer",
        tok_dir,
        "--num-image-tokens",
        N_IMG,
    ]
    code, out, err = run(capsys, "check", *common)
    assert code == 1 and "--skip-bad" in err
    assert (
        f"{data}:3: malformed JSON line" in out
        and f"{data}:4: conversation must end with an assistant" in out
    )
    assert "4 records read, 2 bad" in out
    # Lengths against the tokenizer itself: the text-only record is the shorter one.
    short = tok.apply_chat_template(messages_of(RECORDS[1]), tokenize=False, chat_template=INTERNLM2_JINJA)
    n_short = len(tok(short, add_special_tokens=False)["input_ids"])
    longest = int(re.search(r"max (\d+)", out).group(1))
    assert re.search(rf"p50 {n_short}\b", out) and longest > n_short

    code, out, _ = run(capsys, "check", *common, "--skip-bad", "--max-length", longest - 1)
    assert code == 0
    assert "kept 2, truncated 1, dropped 0" in out and f"max {longest - 1}" in out
    code, out, _ = run(capsys, "check", *common, "--skip-bad", "--max-length", N_IMG)
    assert "dropped (images do not fit): 1" in out


def test_errors_name_the_record(tmp_path, capsys, tok_dir):
    two_rounds = {"conversations": RECORDS[1]["conversations"] * 2}
    data = write(tmp_path / "d.jsonl", [two_rounds, {"conversations": [{"from": "bot", "value": "x"}]}])
    code, _, err = run(capsys, "preview", "--data", data, "--template", "plain", "--tokenizer", tok_dir)
    assert code == 2 and f"{data}:1: plain template takes one user" in err
    code, _, err = run(capsys, "preview", "--data", data, "--template", "vicuna_v1", "--tokenizer", tok_dir)
    assert code == 2 and f"{data}:2: turn 0: unknown role 'bot'" in err
    code, _, err = run(capsys, "preview", "--data", data, "--template", "vicuna_v1", "--tokenizer", tok_dir,
                       "--index", 5)  # fmt: skip
    assert code == 2


def test_preview_index_converts_only_the_chosen_record(tmp_path, capsys, tok_dir):
    bad_roles = {"conversations": [{"from": "gpt", "value": "answer first"}]}
    data = write(tmp_path / "d.jsonl", [RECORDS[1], "{oops", bad_roles, RECORDS[0]])
    common = ["--data", data, "--template", "internlm2_chat", "--tokenizer", tok_dir, "--json"]
    code, out, err = run(capsys, "preview", *common, "--index", 3)  # records 1 and 2 before it are bad
    assert code == 0, err
    assert json.loads(out)["source"] == f"{data}:4"  # raw records counted: a bad line is still a record
    code, _, err = run(capsys, "preview", *common, "--index", 2)
    assert code == 2 and f"{data}:3: message 0: expected role 'user'" in err
    code, _, err = run(capsys, "preview", *common, "--index", 1)
    assert code == 2 and f"{data}:2: malformed JSON line" in err
    code, _, err = run(capsys, "preview", *common, "--index", 4)
    assert code == 2 and f"{data}: no record at index 4 (the file has 4 records)" in err


def test_check_with_image_folder_reports_missing_images(tmp_path, capsys, tok_dir, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the default cache keeps the image verdicts
    data = write(tmp_path / "d.jsonl", [*RECORDS, {**RECORDS[0], "image": "sub/y.png"}])
    images = tmp_path / "images"
    images.mkdir()
    common = ["check", "--data", data, "--template", "internlm2_chat", "--tokenizer", tok_dir,
              "--num-image-tokens", N_IMG]  # fmt: skip
    assert run(capsys, *common)[0] == 0  # no folder given: images are not looked at
    code, out, err = run(capsys, *common, "--image-folder", images)
    assert code == 1 and "--skip-bad" in err
    assert "3 records read, 2 bad" in out and "kept 1," in out
    assert f"{data}:1: image x.png: file not found in {images}" in out
    assert f"{data}:3: image sub/y.png: file not found in {images}" in out
    (images / "x.png").touch()  # there, but empty: opened and refused
    (images / "sub").mkdir()
    Image.new("RGB", (4, 3)).save(images / "sub" / "y.png")
    code, out, _ = run(capsys, *common, "--image-folder", images)
    assert code == 1 and "3 records read, 1 bad" in out
    assert f"{data}:1: image x.png: not a readable image (empty file)" in out
    Image.new("RGB", (4, 3)).save(images / "x.png")
    code, out, _ = run(capsys, *common, "--image-folder", images)
    assert code == 0 and "3 records read, 0 bad" in out
    code, _, err = run(capsys, *common, "--image-folder", tmp_path / "nowhere")
    assert code == 2 and f"{tmp_path / 'nowhere'}: image folder not found" in err


def test_check_and_prepare_name_each_bad_image_with_its_record(tmp_path, capsys, tok_dir, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    quirks = write_quirks(tmp_path / "images")
    data = write(tmp_path / "q.jsonl", quirks_records(quirks))
    common = ["--data", data, "--template", "internlm2_chat", "--tokenizer", tok_dir, "--num-image-tokens", N_IMG,
              "--image-folder", quirks.folder]  # fmt: skip
    code, out, err = run(capsys, "check", *common)
    assert code == 1 and "5 bad record(s)" in err
    assert f"{len(quirks.names)} records read, 5 bad" in out and f"kept {len(quirks.good)}," in out
    for line, name in enumerate(quirks.names, start=1):
        named = [row for row in out.splitlines() if row.strip().startswith(f"{data}:{line}: ")]
        if name in quirks.bad:
            assert len(named) == 1 and f"image {name}: " in named[0] and quirks.bad[name] in named[0]
        else:
            assert not named
    assert f"{quirks.folder}: images {len(quirks.names)}: 5 bad (1 missing), 12 decoded" in out

    cache = tmp_path / "cache"
    code, _, err = run(capsys, "prepare", *common, "--output", cache)  # as training: stops without skip_bad
    [error] = [line for line in err.splitlines() if "error:" in line]  # stderr holds the progress bars too
    assert code == 2 and f"error: {data}:9: image truncated.jpg: image data is corrupt" in error
    assert error.endswith("; 4 more record(s) with bad images (data.skip_bad skips them)")
    code, out, _ = run(capsys, "prepare", *common, "--output", cache, "--skip-bad")
    assert (
        code == 0
        and f"{len(quirks.names)} records read, 5 bad" in out
        and f"{data}:13: image missing.jpg" in out
    )
    assert "0 decoded" in out  # the verdicts of the run before, cached with the prepared data


def test_registers_under_a_parent_parser():
    parser = argparse.ArgumentParser(prog="llava-ft")
    add_data_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["data", "check", "--data", "d.jsonl", "--template", "plain", "--tokenizer", "t"]
    )
    assert args.func.__name__ == "cmd_check" and args.num_image_tokens is None and not args.skip_bad


# ---------------------------------------------------------------- --config: the data as a training config reads it


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny training config on disk (open_clip tower of 4x4 patches: 16 image tokens) with two data files."""
    from llava_ft.config import DataSource, dump_config
    from llava_ft.testing.tiny_llava import tiny_config

    root = tmp_path_factory.mktemp("cfg_run")
    cfg = tiny_config(root / "models")
    (root / "img").mkdir()
    Image.new("RGB", (4, 3)).save(root / "img" / "x.png")
    first = write(root / "a.jsonl", RECORDS)
    second = write(root / "b.jsonl", [{**RECORDS[0], "image": "gone.png"}, RECORDS[1]])
    cfg.data.train = [DataSource(str(first), image_folder=str(root / "img")),
                      DataSource(str(second), format="llava", image_folder=str(root / "img"))]  # fmt: skip
    cfg.data.max_length = 64
    cfg.data.cache_dir = str(root / "cache")
    dump_config(cfg, root / "run.yaml")
    return root, cfg


def test_check_with_config_reads_every_file_as_training_does(tiny_run, capsys):
    from llava_ft.model.build import build_vision

    root, cfg = tiny_run
    tokens = build_vision(cfg.model).num_tokens
    assert tokens == 16
    code, out, err = run(capsys, "check", "--config", root / "run.yaml")
    # The tower's count, not the 576 default; both files; the config's image folder checked.
    assert f"{tokens} image tokens per image, template internlm2_chat" in err
    assert f"{root / 'a.jsonl'}: 2 records read, 0 bad" in out
    assert f"{root / 'b.jsonl'}: 2 records read, 1 bad" in out and "gone.png" in out
    assert code == 1 and "1 bad record(s)" in err
    # Flags win over the config: one file, and the image count given.
    code, out, _ = run(capsys, "preview", "--config", root / "run.yaml", "--data", root / "a.jsonl",
                       "--num-image-tokens", 3, "--json")  # fmt: skip
    rows = [json.loads(line) for line in out.splitlines()]  # stdout: JSON lines only
    assert code == 0 and len(rows) == 2
    assert rows[0]["input_ids"].count(-200) == 3


def test_prepare_with_config_warms_the_cache_training_reads(tiny_run, capsys, monkeypatch):
    from llava_ft.data import prepare as prep
    from llava_ft.data.dataset import build_dataset
    from llava_ft.data.templates import get_template
    from llava_ft.data.tokenizer import load_tokenizer
    from llava_ft.model.build import build_vision

    root, cfg = tiny_run
    code, out, _ = run(capsys, "prepare", "--config", root / "run.yaml", "--data", root / "a.jsonl",
                       "--image-folder", root / "img")  # fmt: skip
    assert code == 0 and f"cached ({root / 'cache'}" in out
    monkeypatch.setattr(prep, "_build", lambda *a: pytest.fail("a cache miss: the data was tokenized again"))
    cfg.data.train = cfg.data.train[:1]
    tok = load_tokenizer(cfg.model.llm)
    tokens = build_vision(cfg.model).num_tokens
    dataset, stats = build_dataset(cfg.data, tok, get_template(cfg.data.template, tok), image_tokens=tokens)
    assert len(dataset) == stats.kept == 2


def test_without_config_the_file_template_and_tokenizer_are_required(capsys):
    code, _, err = run(capsys, "check", "--data", "x.jsonl")
    assert code == 2 and "--template, --tokenizer required (or --config CONFIG.yaml" in err


def test_check_counts_trimmed_opening_assistant_turns(tmp_path, capsys, tok_dir):
    greeting = {"from": "gpt", "value": "Hi! How can I help?"}
    opens_with_assistant = {"conversations": [greeting, *RECORDS[1]["conversations"]]}
    data = write(tmp_path / "d.jsonl", [opens_with_assistant, RECORDS[1], opens_with_assistant])
    common = ["--data", data, "--template", "internlm2_chat", "--tokenizer", tok_dir]
    code, out, _ = run(capsys, "check", *common)
    assert code == 0 and "kept 3" in out and "trimmed 2 (opening assistant turn left out)" in out
    code, out, _ = run(capsys, "preview", *common, "--index", 0)
    assert "opening assistant turn trimmed" in out and "How can I help" not in out


def test_check_with_anyres_config_prints_the_image_token_distribution(tiny_run, tmp_path, capsys):
    import copy

    from llava_ft.config import AnyresSection, DataSource, dump_config
    from llava_ft.model.vision import image_token_rule

    root, base = tiny_run
    cfg = copy.deepcopy(base)
    cfg.model.vision.anyres = AnyresSection()
    geometry = image_token_rule(cfg.model.vision)
    sizes = {"wide.png": (20, 90), "tall.png": (130, 30), "big.png": (100, 100)}  # (height, width)
    for name, (height, width) in sizes.items():
        Image.new("RGB", (width, height)).save(tmp_path / name)
    q, a = {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A shape."}
    two = {"from": "human", "value": "<image> or <image>?"}
    records = [{"image": "wide.png", "conversations": [q, a]}, {"image": "tall.png", "conversations": [q, a]},
               {"image": ["big.png", "wide.png"], "conversations": [two, a]},
               {"conversations": [{"from": "human", "value": "Hi"}, a]}]  # fmt: skip
    cfg.data.train = [DataSource(str(write(tmp_path / "d.jsonl", records)))]  # images beside the file
    cfg.data.max_length = 512
    dump_config(cfg, tmp_path / "run.yaml")

    code, out, err = run(capsys, "check", "--config", tmp_path / "run.yaml")
    count = {name: geometry.num_tokens(*size) for name, size in sizes.items()}
    per_image = sorted([count["wide.png"], count["tall.png"], count["big.png"], count["wide.png"]])
    per_sample = sorted([count["wide.png"], count["tall.png"], count["big.png"] + count["wide.png"]])
    assert code == 0 and "any-resolution image tokens by image size" in err
    assert (
        f"image tokens per image: min {per_image[0]}  median {per_image[1]}  p95 {per_image[-1]}  "
        f"max {per_image[-1]}  (4)" in out
    )
    assert (
        f"image tokens per sample: min {per_sample[0]}  median {per_sample[1]}  p95 {per_sample[-1]}  "
        f"max {per_sample[-1]}  (3)" in out
    )
    # prepare (what training caches) prints it too.
    code, out, _ = run(capsys, "prepare", "--config", tmp_path / "run.yaml")
    assert code == 0 and f"image tokens per sample: min {per_sample[0]}" in out
    # Preview shows each image's own span.
    code, out, _ = run(capsys, "preview", "--config", tmp_path / "run.yaml", "--index", 2)
    assert code == 0 and f"<image x{count['big.png']}>" in out and f"<image x{count['wide.png']}>" in out
    # A fixed-size config prints no distribution.
    code, out, _ = run(capsys, "check", "--config", root / "run.yaml")
    assert "records read" in out and "image tokens per image" not in out
