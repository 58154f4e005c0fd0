"""Every shipped config loads and validates; bad keys and values are named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llava_ft.cli import main as cli_main
from llava_ft.config import ConfigError, LoraSection, TrainSection, load_config, parse_overrides
from llava_ft.model.build import check_names

CONFIGS = sorted((Path(__file__).parents[2] / "configs").rglob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.llm and cfg.data.train and cfg.train.output_dir
    if any(src.format == "llava" for src in cfg.data.train):
        assert cfg.model.vision is not None
    if cfg.train.init_from:
        assert cfg.trainable.llm != "frozen" or cfg.trainable.projector == "full"


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "configs" / "deepspeed").glob("*.json")))
def test_deepspeed_configs_parse(path):
    stage = json.loads(path.read_text())["zero_optimization"]["stage"]
    assert stage in (2, 3)


def test_overrides_and_errors(tmp_path):
    cfg = load_config(CONFIGS[0], parse_overrides(["--train.lr", "1e-3", "--data.packing", "true"]))
    assert cfg.train.lr == 1e-3 and cfg.data.packing is True
    with pytest.raises(
        ConfigError, match=r"^override --train\.lrr: unknown key; did you mean --train\.lr\?$"
    ):
        load_config(CONFIGS[0], {"train.lrr": 1})
    with pytest.raises(ConfigError, match="trainable.llm: 'half' is not one of"):
        load_config(CONFIGS[0], {"trainable.llm": "half"})
    with pytest.raises(ConfigError, match="train.batch_size: expected an integer"):
        load_config(CONFIGS[0], {"train.batch_size": 2.5})
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="full cannot train a 4-bit LLM"):
        load_config(None, {"trainable.llm": "full", "model.load_in_4bit": True})
    for mode in ("full", "lora"):
        with pytest.raises(
            ConfigError, match=f"^<overrides>: trainable.vision is {mode} but model.vision is null$"
        ):
            load_config(None, {"trainable.vision": mode, "model.vision": None})
    cfg = load_config(None, {"trainable.vision": "full", "model.vision.model": "x", "train.vision_lr": 1e-5})
    assert cfg.trainable.vision == "full" and cfg.train.vision_lr == 1e-5
    with pytest.raises(ConfigError, match="trainable.vision: 'half' is not one of"):
        load_config(None, {"trainable.vision": "half"})


def test_empty_section_takes_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("model:\n  llm: /x\ntrain:\n  # lr: 1e-3\n  # seed: 1\nlora:\n")
    cfg = load_config(path)
    assert cfg.train == TrainSection() and cfg.lora == LoraSection()


def test_empty_optional_section_is_named(tmp_path):
    """model.vision: (nothing) could mean null or defaults: refused, while an explicit null stays a text model."""
    path = tmp_path / "vision.yaml"
    path.write_text("model:\n  llm: /x\n  vision:\n    # model: ViT-B-16\n")
    with pytest.raises(ConfigError, match=r"vision\.yaml: model\.vision: the section is empty"):
        load_config(path)
    assert load_config(path, parse_overrides(["--model.vision", "null"])).model.vision is None
    assert load_config(path, parse_overrides(["--model.vision.pool", "2"])).model.vision.pool == 2
    path.write_text("model:\n  llm: /x\n  vision: null\n")
    assert load_config(path).model.vision is None
    path.write_text("data:\n  train:\n    -\n")
    with pytest.raises(ConfigError, match=r"data\.train\[0\]: empty entry"):
        load_config(path)


def test_string_fields_keep_their_text(tmp_path):
    cfg = load_config(None, parse_overrides(["--train.output_dir", "0755", "--name", "1.10"]))
    assert cfg.train.output_dir == "0755" and cfg.name == "1.10"
    cfg = load_config(
        None, parse_overrides(["--train.init_from=1_000", "--lora.target_modules", "[q, 0755]"])
    )
    assert cfg.train.init_from == "1_000" and cfg.lora.target_modules == ["q", "0755"]
    assert load_config(None, parse_overrides(["--name", "'0755'"])).name == "0755"  # YAML quoting still works
    assert load_config(None, parse_overrides(["--train.init_from", "null"])).train.init_from is None
    # the same in a file, and an override (parsed or programmatic) replaces the file's text
    path = tmp_path / "strings.yaml"
    path.write_text("name: 1.10\ntrain:\n  output_dir: 0755\ndata:\n  train:\n    - path: 0644\n")
    cfg = load_config(path)
    assert cfg.name == "1.10" and cfg.train.output_dir == "0755" and cfg.data.train[0].path == "0644"
    assert load_config(path, {"name": 7}).name == "7"
    assert load_config(path, parse_overrides(["--train", "{lr: 1}"])).train.output_dir == "work_dirs/run"
    # a key given twice: the last wins, and it is applied after a section override given before it
    args = ["--train.output_dir", "a", "--train", "{lr: 1}", "--train.output_dir", "007"]
    assert load_config(None, parse_overrides(args)).train.output_dir == "007"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train.epochs", "-1"),
        ("train.epochs", "0"),
        ("train.epochs", "inf"),
        ("train.batch_size", "0"),
        ("train.grad_accum", "0"),
        ("train.lr", "nan"),
        ("train.lr", "-1e-4"),
        ("train.projector_lr", "inf"),
        ("train.projector_lr", "-1"),
        ("train.vision_lr", "nan"),
        ("train.vision_lr", "-1e-5"),
        ("train.warmup_ratio", "1"),
        ("train.warmup_ratio", "-0.1"),
        ("train.warmup_ratio", "nan"),
        ("train.weight_decay", "-0.01"),
        ("train.max_grad_norm", "nan"),
        ("train.max_grad_norm", "-1"),
        ("train.logging_steps", "0"),
        ("train.save_steps", "-1"),
        ("train.save_total_limit", "-3"),
        ("train.dataloader_workers", "-1"),
        ("lora.r", "0"),
        ("lora.vision_r", "-8"),
        ("lora.dropout", "1"),
        ("lora.dropout", "-0.1"),
    ],
)
def test_bad_numbers_are_named(key, value):
    with pytest.raises(ConfigError, match=rf"{CONFIGS[0].name}: {re.escape(key)} must be"):
        load_config(CONFIGS[0], parse_overrides([f"--{key}", value]))


def test_number_edges_accepted():
    args = [
        "--train.warmup_ratio",
        "0",
        "--train.weight_decay",
        "0",
        "--train.max_grad_norm",
        "0",
        "--train.lr",
        "0",
    ]
    cfg = load_config(CONFIGS[0], parse_overrides(args))
    t = cfg.train
    assert (t.warmup_ratio, t.weight_decay, t.max_grad_norm, t.lr) == (0, 0, 0, 0)  # lr 0: a pipeline check
    # with max_steps set, epochs is ignored: 0 is fine, a negative value still is not
    cfg = load_config(CONFIGS[0], parse_overrides(["--train.max_steps", "10", "--train.epochs", "0"]))
    assert cfg.train.max_steps == 10 and cfg.train.epochs == 0
    with pytest.raises(ConfigError, match="train.epochs must be"):
        load_config(CONFIGS[0], parse_overrides(["--train.max_steps", "10", "--train.epochs", "-1"]))


@pytest.mark.parametrize(
    "override, problem",
    [
        (["--train.lr_scheduler", "cosin"], "train.lr_scheduler: 'cosin' is not one of"),
        (["--train.optim", "adam"], "train.optim: 'adam' is not one of"),
    ],
)
def test_unknown_transformers_names_are_refused_when_the_config_loads(override, problem):
    """Names handed to transformers (scheduler, optimizer) fail at load, naming the field, not minutes later
    when the run is built."""
    with pytest.raises(ConfigError, match=rf"{CONFIGS[0].name}: {problem}"):
        load_config(CONFIGS[0], parse_overrides(override))


LLAVA_FT_NAMES = [
    (["--model.projector", "mlp"], "model.projector: unknown projector kind 'mlp'"),
    (["--data.train", "[{path: x.json, format: llva}]"], r"data.train\[0\].format: 'llva' is not one of"),
    (["--data.template", "internlm2"], "data.template: 'internlm2' is not one of"),
    (["--model.attn_implementation", "flsh"], "model.attn_implementation: 'flsh' is not one of"),
]


@pytest.mark.parametrize("override, problem", LLAVA_FT_NAMES)
def test_unknown_llava_ft_names_are_refused_before_anything_loads(override, problem):
    """llava_ft's own names (projector, data format, template, attention) are checked by check_names where
    they are defined, naming the field (after the config file, when given)."""
    cfg = load_config(CONFIGS[0], parse_overrides(override))
    with pytest.raises(ConfigError, match=rf"{CONFIGS[0].name}: {problem}"):
        check_names(cfg, CONFIGS[0])
    with pytest.raises(ConfigError, match=rf"^{problem}"):
        check_names(cfg)


@pytest.mark.parametrize("override, problem", LLAVA_FT_NAMES)
def test_train_command_refuses_unknown_names_before_the_run_starts(
    override, problem, capsys, monkeypatch, tmp_path
):
    def no_run(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr("llava_ft.train.run.train", no_run)
    # The config's data file is there, so the names are what is refused (a missing file is reported first).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "identity").mkdir(parents=True)
    (tmp_path / "data" / "identity" / "identity.jsonl").write_text("")
    assert cli_main.main(["train", str(CONFIGS[0]), *override]) == 2
    assert re.search(rf"llava-ft: error: {re.escape(str(CONFIGS[0]))}: {problem}", capsys.readouterr().err)


@pytest.mark.parametrize(
    "override, problem",
    [
        (["--train.report_to", "no-such-tracker"], "train.report_to: 'no-such-tracker' is not installed"),
        (["--train.deepspeed", "nothere.json"], "train.deepspeed: nothere.json: no such file"),
    ],
)
def test_training_machine_checks_only_when_training(override, problem):
    """What only the training machine can tell fails at load for training; a stage output's config read for chat,
    export or a later stage elsewhere must still load (its DeepSpeed file or tracker may be absent there)."""
    with pytest.raises(ConfigError, match=rf"{CONFIGS[0].name}: {problem}"):
        load_config(CONFIGS[0], parse_overrides(override), for_training=True)
    load_config(CONFIGS[0], parse_overrides(override))
    cfg = load_config(CONFIGS[0], parse_overrides(["--train.report_to", "all"]), for_training=True)
    assert cfg.train.report_to == "all"  # transformers' "every installed integration"


def test_overrides_reach_into_list_entries():
    """`--data.train.0.path` (or `[0]`) sets one entry of data.train; its other keys and entries stay."""
    path = Path(__file__).parents[2] / "configs" / "tiny" / "finetune.yaml"
    base = load_config(path)
    cfg = load_config(
        path, parse_overrides(["--data.train.0.path", "mine.json", "--data.train[0].image_folder", "0755"])
    )
    assert cfg.data.train[0].path == "mine.json"
    assert cfg.data.train[0].image_folder == "0755"  # a string field keeps the text as written
    assert cfg.data.train[0].format == base.data.train[0].format and len(cfg.data.train) == len(
        base.data.train
    )
    with pytest.raises(ConfigError, match=r"--data.train\[5\].path: data.train has 1 entry \(index 0..0\)"):
        load_config(path, parse_overrides(["--data.train.5.path", "x.json"]))
    with pytest.raises(ConfigError, match=r"--train.lr\[0\]: train.lr is not a list"):
        load_config(path, parse_overrides(["--train.lr.0", "1"]))


def test_anyres_section_is_checked():
    base = {"model.vision.model": "x", "model.vision.anyres.max_tiles": 4}
    cfg = load_config(None, dict(base))
    assert cfg.model.vision.anyres.max_tiles == 4 and cfg.model.vision.image_aspect is None
    problems = {
        "model.vision.image_aspect": ("pad", "squashes the base view"),
        "model.vision.pool": (2, "needs model.vision.pool 1"),
        "model.vision.anyres.grid_pinpoints": ([[336]], r"grid_pinpoints\[0\]: expected \[height, width\]"),
        "model.vision.anyres.max_image_tokens": (0, "max_image_tokens"),
        "data.max_image_tokens": (0, "data.max_image_tokens"),
    }
    for key, (value, problem) in problems.items():
        with pytest.raises(ConfigError, match=problem):
            load_config(None, {**base, key: value})
