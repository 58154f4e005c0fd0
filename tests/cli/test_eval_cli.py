"""`llava-ft eval mmbench|pope|vqa` against the scripts it mirrors (`python eval/<name>.py`): the same flags,
the same files written, the same one-line errors; only the recorded command differs, being the one typed."""

from __future__ import annotations

import json
import logging
import re
import shlex
import sys
from pathlib import Path

import pytest
from PIL import Image

from llava_ft.cli.main import main
from llava_ft.eval import mmbench, pope, vqa
from llava_ft.testing.tiny_llava import write_tiny_stage_output

SCRIPTS = {"mmbench": mmbench, "pope": pope, "vqa": vqa}
N = 3


@pytest.fixture(autouse=True)
def _restore_log_levels():
    """`main` sets the process's log levels; other tests expect them as they were."""
    names = ["llava_ft", "transformers", "datasets", "httpx", "PIL", "accelerate", "torch"]
    levels = {n: logging.getLogger(n).level for n in names}
    yield
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


def run_script(name: str, argv: list[str], monkeypatch) -> int:
    """`python eval/<name>.py ARGV` in this process: sys.argv as the interpreter would set it."""
    monkeypatch.setattr(sys, "argv", [f"eval/{name}.py", *argv])
    return SCRIPTS[name].main()


def mmbench_tsv(path: Path) -> Path:
    rows = [
        {"index": i, "question": f"q{i}?", "options": ["cat", "dog", "cow"], "answer": "AB"[i % 2],
         "category": "c", "l2-category": "l", "image": Image.new("RGB", (8, 8), "red")}
        for i in range(N)
    ]  # fmt: skip
    mmbench.write_mmbench_tsv(rows, path, circular=True)
    return path


def mmbench_predictions(path: Path) -> Path:
    ids = [i + k * mmbench.ROTATION for i in range(N) for k in range(3)]
    path.write_text("".join(json.dumps({"index": i, "prediction": "A"}) + "\n" for i in ids))
    return path


def outputs(folder: Path) -> dict[str, object]:
    """The files a run writes, with the recorded command taken out of the report (compared on its own)."""
    results = json.loads((folder / "results.json").read_text())
    command = results.pop("command")
    md = (folder / "results.md").read_text().replace(f"- command: `{command}`", "- command: ...")
    return {"results": results, "md": md, "predictions": (folder / "predictions.jsonl").read_text()}


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if ": error: " in line]


# ------------------------------------------------------------------------------------------ the command


def test_eval_help_lists_the_three_benchmarks(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name, module in SCRIPTS.items():
        assert re.search(rf"^\s+{name}\s+{re.escape(module.__doc__.split()[0])}", out, re.M), out


def test_eval_without_a_benchmark_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval"])
    assert e.value.code == 2
    assert "llava-ft eval: error: the following arguments are required: BENCHMARK" in capsys.readouterr().err


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_benchmark_takes_the_scripts_flags(name, monkeypatch, capsys):
    """The help of `llava-ft eval NAME` and of `python eval/NAME.py` name the same flags (plus --log-level)."""
    with pytest.raises(SystemExit):
        run_script(name, ["--help"], monkeypatch)
    script = set(re.findall(r"(?<![\w-])--[\w.-]+", capsys.readouterr().out))
    with pytest.raises(SystemExit):
        main(["eval", name, "--help"])
    cli = set(re.findall(r"(?<![\w-])--[\w.-]+", capsys.readouterr().out))
    assert {"--data", "--output", "--checkpoint", "--predictions", "--model.llm"} <= script
    assert cli == script | {"--log-level"}


# ------------------------------------------------------------------------------------------ same files


def test_mmbench_rescore_writes_the_same_files_from_both(tmp_path, monkeypatch, capsys):
    data, preds = mmbench_tsv(tmp_path / "bench.tsv"), mmbench_predictions(tmp_path / "preds.jsonl")
    common = ["--predictions", str(preds), "--data", str(data), "--n-resamples", "50"]
    script_argv = [*common, "--output", str(tmp_path / "script")]
    cli_argv = ["eval", "mmbench", *common, "--output", str(tmp_path / "cli")]
    assert run_script("mmbench", script_argv, monkeypatch) == 0
    script_out = capsys.readouterr().out
    assert main(cli_argv) == 0
    cli_out = capsys.readouterr().out
    assert outputs(tmp_path / "cli") == outputs(tmp_path / "script")
    assert cli_out.replace("cli", "X") == script_out.replace("script", "X")  # the score line
    # Each report records the command as typed, quoted so that it can be pasted back.
    cli_cmd = json.loads((tmp_path / "cli" / "results.json").read_text())["command"]
    script_cmd = json.loads((tmp_path / "script" / "results.json").read_text())["command"]
    assert shlex.split(cli_cmd) == ["llava-ft", *cli_argv]
    assert shlex.split(script_cmd) == ["python", "eval/mmbench.py", *script_argv]
    assert f"- command: `{cli_cmd}`" in (tmp_path / "cli" / "results.md").read_text()


def test_pope_on_a_tiny_checkpoint_gives_the_same_files_from_both(tmp_path, monkeypatch, capsys):
    ckpt = write_tiny_stage_output(tmp_path / "models", tmp_path / "stage")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "images" / "red.png")
    rows = [
        {"question_id": i, "image": "red.png", "text": f"Is there {i}?", "label": "yes"} for i in range(N)
    ]
    data = tmp_path / "pope.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--checkpoint", str(ckpt), "--data", str(data), "--images", str(tmp_path / "images")]
    common += ["--max-new-tokens", "2", "--n-resamples", "20"]
    assert main(["eval", "pope", *common, "--output", str(tmp_path / "cli")]) == 0
    assert run_script("pope", [*common, "--output", str(tmp_path / "script")], monkeypatch) == 0
    capsys.readouterr()
    cli = outputs(tmp_path / "cli")
    assert cli == outputs(tmp_path / "script")
    assert cli["results"]["mode"] == "generate" and cli["results"]["n_items"] == N
    assert cli["results"]["checkpoint"] == str(ckpt)


# ------------------------------------------------------------------------------------------ errors


def test_a_bad_data_file_is_one_error_line_from_both(tmp_path, monkeypatch, capsys):
    data = mmbench_tsv(tmp_path / "bench.tsv")
    lines = data.read_text().splitlines()
    assert lines[1].startswith("0\t")
    lines[1] = "zero" + lines[1][1:]
    data.write_text("\n".join(lines) + "\n")
    argv = ["--predictions", str(mmbench_predictions(tmp_path / "p.jsonl")), "--data", str(data)]
    argv += ["--output", str(tmp_path / "o")]
    assert run_script("mmbench", argv, monkeypatch) == 2
    [script_line] = error_lines(capsys.readouterr().err)
    assert main(["eval", "mmbench", *argv]) == 2
    [cli_line] = error_lines(capsys.readouterr().err)
    assert script_line.startswith("mmbench.py: error: ")
    assert cli_line.startswith("llava-ft: error: ")
    assert cli_line.endswith(f"{data} row 1: column 'index' is 'zero', not an integer")
    assert cli_line.removeprefix("llava-ft: ") == script_line.removeprefix("mmbench.py: ")
    assert not (tmp_path / "o" / "results.json").exists()


def test_predicting_without_images_is_refused_as_by_the_script(tmp_path, capsys):
    data = tmp_path / "vqa.jsonl"
    data.write_text(
        json.dumps({"question_id": 0, "image": "a.png", "question": "q?", "answers": ["x"]}) + "\n"
    )
    with pytest.raises(SystemExit) as e:
        main(["eval", "vqa", "--checkpoint", "ck", "--data", str(data), "--output", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "llava-ft eval vqa: error: --images is required with --checkpoint" in err


@pytest.mark.parametrize("where", ["after the benchmark", "after eval", "before eval"])
def test_log_level_anywhere_in_the_command(where, tmp_path, capsys):
    data, preds = mmbench_tsv(tmp_path / "bench.tsv"), mmbench_predictions(tmp_path / "preds.jsonl")
    rest = ["--predictions", str(preds), "--data", str(data), "--output", str(tmp_path / "o")]
    argv = {
        "after the benchmark": ["eval", "mmbench", *rest, "--log-level", "error"],
        "after eval": ["eval", "--log-level", "error", "mmbench", *rest],
        "before eval": ["--log-level", "error", "eval", "mmbench", *rest],
    }[where]
    assert main(argv) == 0
    assert logging.getLogger("llava_ft").getEffectiveLevel() == logging.ERROR
