"""TrainingArguments names as aliases, "did you mean" naming the override or the file, and the global batch."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import yaml

from llava_ft.cli import main as cli_main
from llava_ft.config import (
    TRAIN_ALIASES,
    ConfigError,
    TrainSection,
    dump_config,
    global_batch_line,
    load_config,
    parse_overrides,
)
from llava_ft.train.run import training_arguments


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    return path


ALIAS_VALUES = {
    "learning_rate": "2e-5",
    "per_device_train_batch_size": "3",
    "gradient_accumulation_steps": "5",
    "num_train_epochs": "2",
    "lr_scheduler_type": "linear",
    "dataloader_num_workers": "2",
    "per_device_eval_batch_size": "3",
}


@pytest.mark.parametrize("alias", sorted(TRAIN_ALIASES))
def test_aliases_equal_the_canonical_spellings(alias, tmp_path):
    field = TRAIN_ALIASES[alias]
    value = ALIAS_VALUES[alias]
    canonical = load_config(None, parse_overrides([f"--train.{field}", value]))
    assert getattr(canonical.train, field) != getattr(TrainSection(), field)  # the value takes effect
    assert load_config(None, parse_overrides([f"--train.{alias}", value])) == canonical
    assert load_config(_config(tmp_path, f"train:\n  {alias}: {value}\n")) == canonical
    assert load_config(None, parse_overrides(["--train", f"{{{alias}: {value}}}"])) == canonical


def test_alias_override_replaces_the_files_canonical_spelling(tmp_path):
    path = _config(tmp_path, "train:\n  lr: 1.0e-3\n  grad_accum: 2\n")
    cfg = load_config(path, parse_overrides(["--train.learning_rate", "2e-5"]))
    assert cfg.train.lr == 2e-5 and cfg.train.grad_accum == 2
    dumped = tmp_path / "dumped.yaml"
    dump_config(cfg, dumped)
    assert "learning_rate" not in yaml.safe_load(dumped.read_text())["train"]  # written as llava_ft's name


def test_both_spellings_of_one_field_are_refused(tmp_path):
    path = _config(tmp_path, "train:\n  learning_rate: 1.0e-3\n  lr: 2.0e-4\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: train.learning_rate and train.lr are the same field; give one"
    with pytest.raises(ConfigError) as e:
        load_config(None, parse_overrides(["--train.lr", "1", "--train.learning_rate", "2"]))
    assert str(e.value) == "override --train.lr and --train.learning_rate are the same field; give one"


def test_unknown_key_in_an_override_names_the_override(tmp_path):
    path = _config(tmp_path, "train:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, parse_overrides(["--train.learing_rate", "2e-5"]))
    assert str(e.value) == "override --train.learing_rate: unknown key; did you mean --train.learning_rate?"
    with pytest.raises(ConfigError) as e:
        load_config(path, parse_overrides(["--trian.lr", "2e-5"]))
    assert str(e.value) == "override --trian.lr: unknown key; did you mean --train.lr?"
    with pytest.raises(ConfigError) as e:
        load_config(path, parse_overrides(["--data.train.0.pth", "a.json"]))
    assert str(e.value) == "override --data.train[0].pth: unknown key; did you mean --data.train[0].path?"


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = _config(tmp_path, "train:\n  learing_rate: 1.0e-3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: train.learing_rate: unknown key; did you mean train.learning_rate?"
    path = _config(tmp_path, "train:\n  zzzz: 1\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: train\.zzzz: unknown key; train has "):
        load_config(path)


def test_sectionless_key_is_looked_up_in_every_section(tmp_path):
    path = _config(tmp_path, "train:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, parse_overrides(["--max_steps", "3"]))
    assert (
        str(e.value) == "override --max_steps: unknown key; did you mean --train.max_steps?"
    )  # not the file
    with pytest.raises(ConfigError) as e:
        load_config(path, parse_overrides(["--learning_rate", "3"]))
    assert str(e.value) == "override --learning_rate: unknown key; did you mean --train.learning_rate?"
    with pytest.raises(ConfigError) as e:
        load_config(_config(tmp_path, "packing: true\n"))
    assert str(e.value) == f"{tmp_path / 'x.yaml'}: packing: unknown key; did you mean data.packing?"


def test_a_string_for_the_list_of_data_files_hints_the_list_syntax(tmp_path):
    path = _config(tmp_path, "data:\n  train:\n    - path: a.json\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, parse_overrides(["--data.train", "my.json"]))
    assert str(e.value) == (
        "override --data.train: expected a list, got 'my.json'; set the first entry's path with "
        "--data.train.0.path my.json, or give the whole list: --data.train '[{path: my.json}]'"
    )
    assert (
        load_config(path, parse_overrides(["--data.train.0.path", "my.json"])).data.train[0].path == "my.json"
    )
    cfg = load_config(path, parse_overrides(["--data.train", "[{path: my.json}]"]))
    assert [s.path for s in cfg.data.train] == ["my.json"]


def test_global_batch_derives_the_accumulation(tmp_path, monkeypatch):
    path = _config(tmp_path, "train:\n  batch_size: 16\n  global_batch_size: 256\n")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = load_config(path)
    assert cfg.train.grad_accum == 16
    assert global_batch_line(cfg.train, 1) == "global batch 256 = 16 per device x 16 accumulation x 1 process"
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(path)
    assert cfg.train.grad_accum == 8
    assert (
        global_batch_line(cfg.train, 2) == "global batch 256 = 16 per device x 8 accumulation x 2 processes"
    )
    # the saved config leaves the accumulation out: where it is loaded, it is derived for that process count
    dump_config(cfg, tmp_path / "saved.yaml")
    assert "grad_accum" not in yaml.safe_load((tmp_path / "saved.yaml").read_text())["train"]
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert load_config(tmp_path / "saved.yaml").train.grad_accum == 4
    # an explicit grad_accum that agrees is fine
    agreeing = load_config(path, parse_overrides(["--train.gradient_accumulation_steps", "4"]))
    assert agreeing.train.grad_accum == 4


def test_global_batch_errors(tmp_path, monkeypatch):
    path = _config(tmp_path, "train:\n  batch_size: 16\n  global_batch_size: 256\n")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == (
        f"{path}: train.global_batch_size 256 is not a multiple of batch_size 16 x 3 processes = 48"
    )
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as e:
        load_config(path, parse_overrides(["--train.grad_accum", "16"]))
    assert str(e.value) == (
        f"{path}: train.grad_accum 16 disagrees with train.global_batch_size 256 = 16 per device x 8 "
        "accumulation x 2 processes; drop grad_accum or set it to 8"
    )
    with pytest.raises(ConfigError, match=r"train\.global_batch_size must be >= 1 or null, got 0"):
        load_config(path, parse_overrides(["--train.global_batch_size", "0"]))
    cfg = load_config(path)  # derived for 2 processes, run on 4
    with pytest.raises(ConfigError) as e:
        global_batch_line(cfg.train, 4)
    assert str(e.value) == (
        "train.global_batch_size 256 != batch_size 16 x grad_accum 8 x 4 processes = 512; "
        "load the config where it runs"
    )


def test_shipped_recipes_state_their_global_batch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipes = Path(__file__).parents[1] / "configs" / "llava_internlm2_1_8b"
    pretrain, finetune = load_config(recipes / "pretrain.yaml"), load_config(recipes / "finetune.yaml")
    assert (pretrain.train.global_batch_size, pretrain.train.grad_accum) == (256, 8)
    assert (finetune.train.global_batch_size, finetune.train.grad_accum) == (128, 8)
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert load_config(recipes / "pretrain.yaml").train.grad_accum == 1


def test_training_logs_the_global_batch_at_start(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = load_config(None, parse_overrides(["--train.output_dir", str(tmp_path), "--train.batch_size", "2"]))
    cfg.train.grad_accum = 3
    with caplog.at_level(logging.INFO, logger="llava_ft"):
        args = training_arguments(cfg)
    assert args.gradient_accumulation_steps == 3
    assert "global batch 6 = 2 per device x 3 accumulation x 1 process" in caplog.messages
    cfg.train.global_batch_size = 12  # not what this run has
    with pytest.raises(ConfigError, match=r"^train\.global_batch_size 12 != batch_size 2 x grad_accum 3"):
        training_arguments(cfg)


def test_train_command_names_the_override_not_the_file(tmp_path, capsys, monkeypatch):
    def no_run(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr("llava_ft.train.run.train", no_run)
    path = _config(tmp_path, "train:\n  lr: 1.0e-3\n")
    assert cli_main.main(["train", str(path), "--max_steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "llava-ft: error: override --max_steps: unknown key; did you mean --train.max_steps?" in err
    assert str(path) not in err
