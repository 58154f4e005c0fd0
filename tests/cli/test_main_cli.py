"""`llava-ft --version`, `config show` and `--log-level`, through the real entry point."""

from __future__ import annotations

import logging

import datasets.utils.logging
import pytest
import transformers.utils.logging
import yaml

from llava_ft.cli.main import main, package_version
from llava_ft.config import load_config, parse_overrides, to_dict

CONFIG = """\
model:
  llm: models/llm
data:
  train:
  - path: data/train.json
  template: vicuna_v1
train:
  output_dir: out
"""


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(autouse=True)
def _restore_log_levels():
    names = ["llava_ft", "transformers", "datasets", "httpx", "PIL", "accelerate", "torch"]
    levels = {n: logging.getLogger(n).level for n in names}
    hf = transformers.utils.logging.get_verbosity(), datasets.utils.logging.get_verbosity()
    yield
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)
    transformers.utils.logging.set_verbosity(hf[0])
    datasets.utils.logging.set_verbosity(hf[1])


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out == f"llava-ft {package_version()}\n"
    assert package_version()[0].isdigit()


def test_config_show_prints_the_resolved_config(config, capsys):
    overrides = ["--data.max_length", "512", "--lora.r", "8"]
    assert main(["config", "show", str(config), *overrides]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == to_dict(load_config(config, parse_overrides(overrides)))
    assert shown["data"]["max_length"] == 512 and shown["lora"]["r"] == 8
    assert shown["model"]["llm"] == "models/llm"
    assert shown["train"]["seed"] == 42  # defaults filled in


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["missing.yaml"], "missing.yaml"),
        (["{config}", "--data.bogus", "1"], "bogus"),
        (["{config}", "--data.template", "no-such-template"], "data.template"),
        (["{config}", "--data.max_length"], "--data.max_length has no value"),
    ],
)
def test_config_show_errors_are_one_line_exit_2(config, tmp_path, capsys, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    rc = main(["config", "show", *[a.format(config=config) for a in args]])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    assert err.startswith("llava-ft: error: ") and err.count("\n") == 1, err
    assert expected in err


def test_config_show_loads_no_model(config, capsys, monkeypatch):
    """The config's model paths do not exist; showing it must not try to open them."""

    def refuse(*args, **kwargs):
        raise AssertionError("config show loaded a model")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", refuse)
    assert main(["config", "show", str(config)]) == 0


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
def test_log_level_sets_llava_ft_and_quiets_other_libraries(config, capsys, where, level):
    command = ["config", "show", str(config)]
    argv = ["--log-level", level, *command] if where == "before" else [*command, "--log-level", level]
    assert main(argv) == 0
    expected = getattr(logging, level.upper())
    others = logging.INFO if level == "debug" else max(expected, logging.WARNING)
    assert logging.getLogger("llava_ft").getEffectiveLevel() == expected
    assert transformers.utils.logging.get_verbosity() == others
    assert datasets.utils.logging.get_verbosity() == others
    for name in ("httpx", "PIL", "accelerate"):
        assert logging.getLogger(name).getEffectiveLevel() == others


def test_log_level_default_hides_other_libraries_info(config, caplog):
    caplog.set_level(logging.NOTSET)
    assert main(["config", "show", str(config)]) == 0
    logging.getLogger("llava_ft.cli").info("ours")
    logging.getLogger("accelerate.state").info("theirs")
    logging.getLogger("PIL.Image").info("theirs")
    logging.getLogger("accelerate.state").warning("their warning")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["ours", "their warning"]


def test_log_level_rejects_an_unknown_level(config, capsys):
    with pytest.raises(SystemExit) as e:
        main(["config", "show", str(config), "--log-level", "loud"])
    assert e.value.code == 2
    assert "--log-level" in capsys.readouterr().err
