"""Every shipped config loads and validates; bad keys and values are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_ft.config import ConfigError, load_config, parse_overrides

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
    with pytest.raises(ConfigError, match=r"train: unknown key\(s\) \['lrr'\]"):
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
