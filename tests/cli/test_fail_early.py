"""Input problems found from files and flags alone fail in one line (`llava-ft: error: ...`, exit code 2, no
traceback) before any model loads; refused weight files, remote code and a full disk say what to do."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llava_ft.cli.main import main
from llava_ft.config import DataSource, ModelSection, RunConfig, VisionSection, dump_config, load_config
from llava_ft.errors import DiskFullError, InputError
from llava_ft.files import atomic_dir, atomic_write_bytes
from llava_ft.model.llm import load_llm
from llava_ft.model.vision import build_vision_tower
from llava_ft.testing.tiny_llava import tiny_config
from llava_ft.testing.tiny_llm import write_tiny_llama
from llava_ft.testing.tiny_vision import write_tiny_hf_clip
from llava_ft.train.run import training_arguments

REPO = Path(__file__).parents[2]
HEAVY = ("torch", "transformers", "datasets", "deepspeed", "gradio")
# main() in a fresh interpreter, then which heavy libraries it imported: none means no model could have loaded.
PROBE = (
    "import json, sys\n"
    "from llava_ft.cli.main import main\n"
    "try:\n"
    "    rc = main(sys.argv[1:])\n"
    "except SystemExit as e:  # --version, --help\n"
    "    rc = e.code\n"
    f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    "sys.exit(rc)\n"
)


def run_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", PROBE, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def assert_one_line(err: str, *names: str) -> None:
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("llava-ft"), err
    for name in names:
        assert name in err, err


def write_run(tmp_path: Path, **data) -> Path:
    """A training config whose base model is not there: any attempt to load it would fail differently."""
    (tmp_path / "d.jsonl").write_text("")
    cfg = {
        "model": {"llm": str(tmp_path / "no-model"), "vision": None},
        "trainable": {"projector": "frozen"},
        "data": {"train": [{"path": str(tmp_path / "d.jsonl")}], **data},
        "train": {"output_dir": str(tmp_path / "out"), "report_to": "none"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_importing_the_cli_imports_no_heavy_library():
    code = f"import sys, llava_ft.cli.main; print([m for m in {HEAVY!r} if m in sys.modules])"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_version_and_help_import_no_heavy_library(tmp_path):
    for argv in (["--version"], ["--help"]):
        proc = run_cli(*argv, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


@pytest.mark.parametrize(
    "case, names",
    [
        ("missing data", ["run.yaml: data.train[0].path", "nope.jsonl: no such file"]),
        ("missing image folder", ["run.yaml: data.train[0].image_folder", "no-images: no such folder"]),
        ("unknown template", ["data.template: 'internlm2_chta'", "did you mean 'internlm2_chat'?"]),
        ("nothing to resume", ["--resume: no checkpoint-N folder in", "nothing to resume"]),
        ("resume from a non-checkpoint", ["--resume", "not a checkpoint (no trainer_state.json)"]),
    ],
)
def test_train_input_problems_fail_in_one_line_before_heavy_imports(tmp_path, case, names):
    argv: list[str] = []
    if case == "missing data":
        path = write_run(tmp_path)
        argv = ["--data.train", f"[{{path: {tmp_path / 'nope.jsonl'}}}]"]
    elif case == "missing image folder":
        path = write_run(tmp_path)
        argv = ["--data.train", f"[{{path: {tmp_path / 'd.jsonl'}, image_folder: {tmp_path / 'no-images'}}}]"]
    elif case == "unknown template":
        path = write_run(tmp_path, template="internlm2_chta")
    elif case == "nothing to resume":
        path = write_run(tmp_path)
        (tmp_path / "out").mkdir()
        argv = ["--resume"]
    else:
        path = write_run(tmp_path)
        (tmp_path / "not-a-checkpoint").mkdir()
        argv = ["--resume", str(tmp_path / "not-a-checkpoint")]
    proc = run_cli("train", str(path), *argv, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert_one_line(proc.stderr, *names)
    assert proc.stdout.strip() == "[]", proc.stdout  # nothing heavy imported, so no model loaded


def _stage_folder(tmp_path: Path) -> Path:
    """A stage output folder whose files say what it is (nothing to load: the base models are not there)."""
    return _stage_output(tmp_path / "stage")


@pytest.mark.parametrize(
    "case, names",
    [
        ("chat: no folder", ["llava-ft chat: error:", "nowhere: not a folder"]),
        ("chat: not a stage output", ["llava-ft chat: error:", "not a llava_ft stage output"]),
        ("chat: missing image", ["llava-ft chat: error:", "no-image.png"]),
        ("chat: --system on a plain template", ["llava-ft chat: error:", "--system:", "template is plain"]),
        ("serve: no folder", ["llava-ft serve: error:", "nowhere: not a folder"]),
        ("export: no folder", ["llava-ft export: error:", "nowhere: not a folder"]),
        ("export: pooled tower as hf-llava", ["llava-ft export: error:", "model.vision.pool is 2"]),
        ("data: no template", ["--template, --tokenizer required"]),
        ("data: missing data file", ["--data", "nope.jsonl: no such file"]),
        ("data: missing image folder", ["no-images: image folder not found"]),
        ("data: unknown template in the config", ["run.yaml: data.template: 'internlm2_chta'"]),
        ("config: bad override", ["--train.lr_x: unknown key", "did you mean --train.lr?"]),
        ("config: unknown projector", ["run.yaml: model.projector:", "mlp2x_gelux"]),
        ("eval vqa: missing data", ["--data", "nope.jsonl: no such file"]),
        ("eval pope: missing images", ["--images", "no-images: no such folder"]),
        ("eval mmbench: missing data", ["--data", "nope.tsv: no such file"]),
        ("eval vqa: missing predictions", ["--predictions", "nope-preds.jsonl: no such file"]),
    ],
)
def test_command_input_problems_fail_in_one_line_before_heavy_imports(tmp_path, case, names):
    """Every command checks its files and flags before it imports torch (or gradio), so a wrong one answers at
    once: one line, exit code 2."""
    nowhere, data = str(tmp_path / "nowhere"), tmp_path / "d.jsonl"
    data.write_text("")
    eval_common = ["--checkpoint", nowhere, "--output", str(tmp_path / "o")]
    argv = {
        "chat: no folder": ["chat", nowhere, "--question", "hi"],
        "chat: not a stage output": ["chat", str(tmp_path), "--question", "hi"],
        "serve: no folder": ["serve", nowhere],
        "export: no folder": ["export", nowhere, "--output", str(tmp_path / "o")],
        "data: no template": ["data", "preview", "--data", str(data)],
        "data: missing data file": [
            "data",
            "check",
            "--data",
            str(tmp_path / "nope.jsonl"),
            "--template",
            "plain",
            "--tokenizer",
            nowhere,
        ],  # fmt: skip
        "data: missing image folder": [
            "data",
            "prepare",
            "--data",
            str(data),
            "--template",
            "plain",
            "--tokenizer",
            nowhere,
            "--image-folder",
            str(tmp_path / "no-images"),
        ],  # fmt: skip
        "config: bad override": ["config", "show", str(write_run(tmp_path)), "--train.lr_x", "1"],
        "eval vqa: missing data": [
            "eval",
            "vqa",
            *eval_common,
            "--data",
            str(tmp_path / "nope.jsonl"),
            "--images",
            str(tmp_path),
        ],  # fmt: skip
        "eval pope: missing images": [
            "eval",
            "pope",
            *eval_common,
            "--data",
            str(data),
            "--images",
            str(tmp_path / "no-images"),
        ],  # fmt: skip
        "eval mmbench: missing data": ["eval", "mmbench", *eval_common, "--data", str(tmp_path / "nope.tsv")],
        "eval vqa: missing predictions": [
            "eval",
            "vqa",
            "--predictions",
            str(tmp_path / "nope-preds.jsonl"),
            "--data",
            str(data),
            "--output",
            str(tmp_path / "o"),
        ],  # fmt: skip
    }.get(case)
    if case == "chat: missing image":
        argv = [
            "chat",
            str(_stage_folder(tmp_path)),
            "--image",
            str(tmp_path / "no-image.png"),
            "--question",
            "hi",
        ]
    elif case == "chat: --system on a plain template":
        stage = _stage_folder(tmp_path)
        (stage / "template.json").write_text(json.dumps({"name": "plain", "stop_words": []}))
        argv = ["chat", str(stage), "--system", "Be brief.", "--question", "hi"]
    elif case == "export: pooled tower as hf-llava":
        stage = _stage_output(tmp_path / "stage", pool=2)
        argv = ["export", str(stage), "--format", "hf-llava", "--output", str(tmp_path / "o")]
    elif case == "data: unknown template in the config":
        argv = ["data", "check", "--config", str(write_run(tmp_path, template="internlm2_chta"))]
    elif case == "config: unknown projector":
        path = write_run(tmp_path)
        argv = ["config", "show", str(path), "--model.projector", "mlp2x_gelux"]
    proc = run_cli(*argv, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert_one_line(proc.stderr, *names)
    assert proc.stdout.strip() == "[]", proc.stdout  # nothing heavy imported, so no model loaded


def test_config_show_of_a_good_config_imports_no_heavy_library(tmp_path):
    proc = run_cli("config", "show", str(write_run(tmp_path)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "output_dir:" in proc.stdout and proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


def test_config_show_checks_an_attention_implementation_by_transformers_names(tmp_path, capsys):
    path = write_run(tmp_path)
    assert main(["config", "show", str(path), "--model.attn_implementation", "sdpa_typo"]) == 2
    assert_one_line(
        capsys.readouterr().err, "model.attn_implementation: 'sdpa_typo' is not one of", "sdpa_packed"
    )


def test_data_preview_without_template_names_the_flag(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text("")
    assert main(["data", "preview", "--data", str(tmp_path / "d.jsonl"), "--tokenizer", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert_one_line(err, "--template required")


def test_data_check_reports_a_missing_data_file_before_the_tokenizer(tmp_path, capsys):
    path = write_run(tmp_path)
    argv = ["data", "check", "--config", str(path), "--data", str(tmp_path / "nope.jsonl")]
    assert main(argv) == 2
    assert_one_line(capsys.readouterr().err, "--data", "nope.jsonl: no such file")


def _stage_output(folder: Path, **vision) -> Path:
    folder.mkdir()
    cfg = RunConfig(
        model=ModelSection(
            llm=str(folder / "no-llm"), vision=VisionSection(model=str(folder / "no-clip"), **vision)
        )
    )
    dump_config(cfg, folder / "llava_ft.yaml")
    return folder


@pytest.mark.parametrize(
    "change, problem",
    [({"pool": 2}, "model.vision.pool is 2"), ({"projector": "linear"}, "model.projector is linear")],
)
def test_export_refuses_what_hf_llava_cannot_express_before_loading(
    tmp_path, capsys, monkeypatch, change, problem
):
    def refuse(*args, **kwargs):
        raise AssertionError("export loaded the model")

    monkeypatch.setattr("llava_ft.export.load_merged", refuse)
    ckpt = _stage_output(tmp_path / "ckpt", **({"pool": change["pool"]} if "pool" in change else {}))
    if "projector" in change:
        cfg = yaml.safe_load((ckpt / "llava_ft.yaml").read_text())
        cfg["model"]["projector"] = change["projector"]
        (ckpt / "llava_ft.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["export", str(ckpt), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert_one_line(err, str(ckpt), problem, "merged-llm")
    assert not (tmp_path / "o").exists()


def test_remote_code_tokenizer_is_refused_without_trust_remote_code_advice(tmp_path, capsys):
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "xmodel", "auto_map": {"AutoConfig": "c.X"}})
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "XTokenizer", "auto_map": {"AutoTokenizer": ["t.XTokenizer", None]}})
    )
    (tmp_path / "d.jsonl").write_text("")
    argv = [
        "data",
        "check",
        "--data",
        str(tmp_path / "d.jsonl"),
        "--template",
        "plain",
        "--tokenizer",
        str(folder),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert_one_line(err, f"{folder}/tokenizer_config.json", "InternLM2")
    assert "trust_remote_code" not in err


def test_a_pickle_holding_more_than_tensors_is_refused_in_one_line(tmp_path):
    folder = write_tiny_llama(tmp_path / "llm", hidden_size=16, intermediate_size=32, num_layers=1)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**state, "extra": argparse.Namespace(code="runs on load")}, folder / "pytorch_model.bin")
    with pytest.raises(InputError) as e:
        load_llm(folder)
    message = str(e.value)
    assert "\n" not in message and str(folder) in message
    assert "can run code" in message and "safe_serialization=True" in message


def test_a_vision_tower_pickle_holding_more_than_tensors_is_refused(tmp_path):
    folder = write_tiny_hf_clip(tmp_path / "clip", image_size=16, width=16, layers=1)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**state, "extra": argparse.Namespace(code="runs on load")}, folder / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"^model\.vision: .*clip: .*can run code.*safe_serialization=True"):
        build_vision_tower(VisionSection(backend="hf", model=str(folder)))


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_names_the_folder_and_the_space(tmp_path):
    def write(folder: Path) -> None:
        (folder / "part").write_bytes(b"x" * 2048)
        _full()

    with pytest.raises(DiskFullError) as e:
        atomic_dir(tmp_path / "out", write)
    message = str(e.value)
    assert message.startswith(f"{tmp_path}: no space left") and "more than 2.0 KB" in message
    assert " free; " in message
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the partial folder is gone
    with pytest.raises(DiskFullError, match=rf"^{tmp_path}: no space left"):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(Path, "write_bytes", _full)
            atomic_write_bytes(tmp_path / "f.json", b"{}")


def test_a_full_disk_reported_by_torch_save_inside_an_atomic_folder_is_named(tmp_path):
    """torch.save (a stage output's weights) reports ENOSPC as a RuntimeError holding only the system's message;
    atomic_dir names the folder as for an OSError, and a RuntimeError of another kind keeps its traceback."""

    def write(folder: Path) -> None:
        raise RuntimeError(
            "[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: No space left on device"
        )

    with pytest.raises(DiskFullError, match=rf"^{tmp_path}: no space left"):
        atomic_dir(tmp_path / "out", write)

    def broken(folder: Path) -> None:
        raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else"):
        atomic_dir(tmp_path / "out", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_full_disk_in_a_command_is_one_line(tmp_path, capsys, monkeypatch):
    path = write_run(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache" / "x.arrow"))

    monkeypatch.setattr("llava_ft.cli.config.yaml.safe_dump", full)
    assert main(["config", "show", str(path)]) == 2
    assert_one_line(capsys.readouterr().err, f"{tmp_path / 'cache'}: no space left", "free")


def test_log_level_error_keeps_the_progress_bar(tmp_path):
    """--log-level only quiets logs: the Trainer's progress bar stays on whatever llava_ft's level is."""
    cfg = load_config(None, {"train.output_dir": str(tmp_path / "out")})
    before = logging.getLogger().level
    try:
        logging.getLogger().setLevel(logging.ERROR)
        logging.getLogger("transformers").setLevel(logging.ERROR)
        assert training_arguments(cfg).disable_tqdm is False
    finally:
        logging.getLogger().setLevel(before)
        logging.getLogger("transformers").setLevel(logging.NOTSET)


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(
    tiny_root, text_file, tmp_path, capsys, monkeypatch
):
    """torch.save reports ENOSPC as a RuntimeError: `llava-ft train` names the output folder and its space."""
    cfg = tiny_config(tiny_root, llm_mode="lora", vision_backend=None)
    cfg.data.train = [DataSource(path=str(text_file), format="text")]
    cfg.data.max_length = 64
    cfg.train.output_dir = str(tmp_path / "out")
    cfg.train.batch_size, cfg.train.max_steps, cfg.train.save_steps = 2, 2, 1
    cfg.train.report_to = "none"
    path = tmp_path / "run.yaml"
    dump_config(cfg, path)

    def full(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: No space left on device"
        )

    monkeypatch.setattr(torch, "save", full)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err  # with the run's progress bars and library warnings around it
    assert "Traceback" not in err
    lines = re.findall(r"llava-ft: error: [^\r\n]*", err)  # after the progress bar's unfinished line
    assert len(lines) == 1 and lines[0].startswith(f"llava-ft: error: {tmp_path / 'out'}: no space left"), err
    assert " free; " in lines[0]
