"""Stage chains (init_from): the weights fingerprint evaluation records, which adapter and which LLM a chain of
stages loads."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from llava_ft.config import DataSource
from llava_ft.export import load_merged
from llava_ft.model.build import build_model
from llava_ft.stage import (
    CONFIG_NAME,
    PROJECTOR_NAME,
    STAGE_NAME,
    VISION_NAME,
    apply_stage_weights,
    load_stage,
    read_stage_config,
    stage_chain,
    stage_fingerprint,
    trained_llm,
)
from llava_ft.testing.tiny_llava import tiny_config, write_tiny_stage_output
from llava_ft.train.run import train


def test_fingerprint_follows_the_weights_of_the_stage_and_its_init_from(tiny_root, tmp_path):
    first = write_tiny_stage_output(tiny_root, tmp_path / "pretrain", seed=0)
    second = write_tiny_stage_output(tiny_root, tmp_path / "finetune", seed=1)
    _set_init_from(second, first)

    before = stage_fingerprint(second)
    assert before == stage_fingerprint(second) and before.startswith("sha256:")
    (second / "summary.json").write_text("{}")  # run reports are not weights
    assert stage_fingerprint(second) == before

    write_tiny_stage_output(tiny_root, tmp_path / "pretrain", seed=2)  # the earlier stage retrained in place
    assert stage_fingerprint(second) != before
    changed = stage_fingerprint(second)
    projector = second / "projector.safetensors"
    projector.write_bytes(projector.read_bytes()[:-1] + b"\x00")
    assert stage_fingerprint(second) != changed


def _set_init_from(stage, init_from) -> None:
    """Make `stage` an older, chained stage output: no stage.json, so loading follows train.init_from."""
    (stage / STAGE_NAME).unlink(missing_ok=True)
    cfg = yaml.safe_load((stage / CONFIG_NAME).read_text())
    cfg["train"]["init_from"] = None if init_from is None else str(init_from)
    (stage / CONFIG_NAME).write_text(yaml.safe_dump(cfg))


def _logits(stage) -> torch.Tensor:
    _, _, _, model = load_merged(stage)
    ids = torch.tensor([[5, 9, 11, 3, 7, 2]])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_a_later_lora_stage_supersedes_the_adapter_it_started_from(tiny_root, tmp_path):
    """A LoRA stage that continued from another LoRA stage saved the whole, continued adapter: loading must apply
    it alone, not stacked on the earlier one (which would add the earlier stage's update twice over)."""
    first = write_tiny_stage_output(tiny_root, tmp_path / "sft1", seed=0, vision_backend=None)
    second = write_tiny_stage_output(tiny_root, tmp_path / "sft2", seed=1, vision_backend=None)
    alone = _logits(second)
    _set_init_from(second, first)
    torch.testing.assert_close(_logits(second), alone)
    assert not torch.allclose(_logits(first), alone)


def test_a_stage_after_a_full_llm_stage_builds_on_its_llm(tiny_root, text_file, tmp_path, caplog):
    """init_from a stage that trained the whole LLM: the next stage trains on that llm/ (not on model.llm's
    original base), and loading the new stage applies its adapter to it."""
    full = write_tiny_stage_output(tiny_root, tmp_path / "full", seed=0, vision_backend=None, llm_mode="full")
    assert trained_llm(full) == full / "llm" and stage_chain(full) == [full]
    cfg = tiny_config(tiny_root, llm_mode="lora", vision_backend=None)
    cfg.data.train = [DataSource(path=str(text_file), format="text")]
    cfg.data.max_length = 64
    t = cfg.train
    t.output_dir, t.init_from, t.max_steps, t.batch_size, t.lr, t.report_to = (
        str(tmp_path / "lora"), str(full), 1, 2, 0.0, "none"
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="llava_ft"):
        train(cfg)
    assert "init_from trained the whole LLM there" in caplog.text
    lora = tmp_path / "lora"
    # Self-contained: the chain ends at the new stage, whose model.llm is the full stage's LLM.
    assert stage_chain(lora) == [lora] and trained_llm(lora).resolve() == (full / "llm").resolve()
    assert Path(read_stage_config(lora).model.llm) == (full / "llm").resolve()
    # With a zero learning rate the LoRA update is zero: the stage computes what the full stage's LLM does.
    torch.testing.assert_close(_logits(lora), _logits(full))


def test_a_stage_retrained_in_place_drops_the_parts_it_no_longer_trains(tiny_root, tmp_path, caplog):
    """A LoRA run, then a projector-only run into the same folder: the old adapter must go, else loading the
    folder would still apply it."""
    out = write_tiny_stage_output(tiny_root, tmp_path / "stage", llm_mode="lora")
    assert (out / "llm_adapter").is_dir()
    with caplog.at_level(logging.WARNING, logger="llava_ft"):
        write_tiny_stage_output(tiny_root, out, llm_mode="frozen")
    assert not (out / "llm_adapter").exists() and (out / "projector.safetensors").is_file()
    assert "removing llm_adapter left by an earlier run" in caplog.text
    _, _, _, model = load_merged(out)
    assert not any("lora_" in name for name, _ in model.named_parameters())


def test_a_tower_trained_in_full_counts_in_the_fingerprint_and_goes_when_retrained_without(
    tiny_root, tmp_path, caplog
):
    out = write_tiny_stage_output(tiny_root, tmp_path / "stage", vision_mode="full")
    tower = out / VISION_NAME
    assert tower.is_file() and stage_fingerprint(out) == stage_fingerprint(out)
    before = stage_fingerprint(out)
    tower.write_bytes(tower.read_bytes()[:-1] + b"\x00")
    assert stage_fingerprint(out) != before
    with caplog.at_level(logging.WARNING, logger="llava_ft"):
        write_tiny_stage_output(tiny_root, out, vision_mode="frozen")
    assert not tower.exists() and f"removing {VISION_NAME} left by an earlier run" in caplog.text


def test_tower_weights_that_do_not_fit_are_named(tiny_root, tmp_path):
    stage = write_tiny_stage_output(tiny_root, tmp_path / "stage", vision_mode="full")
    (stage / PROJECTOR_NAME).unlink()  # the tower is what is checked
    _, model = build_model(tiny_config(tiny_root, vision_backend="hf"))  # another tower's names
    with pytest.raises(ValueError, match=f"{VISION_NAME}: does not fit this model's vision tower"):
        apply_stage_weights(model, stage)
    _, model = build_model(tiny_config(tiny_root, vision_backend=None))
    with pytest.raises(ValueError, match="has vision tower weights but this model has no vision tower"):
        apply_stage_weights(model, stage)


@pytest.mark.parametrize("backend", ["open_clip", "hf"])
def test_tower_weights_go_under_a_tower_lora_a_later_stage_wraps_it_in(tiny_root, tmp_path, backend):
    """A LoRA stage on a tower trained in full: peft has renamed the tower's layers (`base_layer`) by the time
    init_from's weights are applied."""
    from safetensors.torch import load_file

    from llava_ft.model.trainability import apply_trainability

    stage = write_tiny_stage_output(tiny_root, tmp_path / "full", vision_backend=backend, vision_mode="full")
    saved = load_file(str(stage / VISION_NAME))
    cfg = tiny_config(tiny_root, vision_backend=backend, vision_mode="lora")
    _, model = build_model(cfg)
    apply_trainability(model, cfg.trainable, cfg.lora)
    apply_stage_weights(model, stage, adapters="init")
    tower = {
        n.removeprefix("base_model.model.").replace(".base_layer.", "."): p
        for n, p in model.vision_tower.named_parameters()
        if "lora_" not in n
    }
    assert any(".base_layer." in n for n, _ in model.vision_tower.named_parameters())
    assert saved and all(torch.equal(tower[n], t) for n, t in saved.items())


def test_a_full_tower_stage_on_a_tower_lora_is_refused_with_what_works(tiny_root, tmp_path):
    """The LLM's advice (merge into a merged-llm export) would drop the tower: the tower's says to keep LoRA."""
    from llava_ft.model.trainability import apply_trainability

    stage = write_tiny_stage_output(tiny_root, tmp_path / "lora", vision_mode="lora")
    cfg = tiny_config(tiny_root, vision_mode="full")
    _, model = build_model(cfg)
    apply_trainability(model, cfg.trainable, cfg.lora)
    with pytest.raises(
        ValueError, match="not train LoRA on vision_tower; keep trainable.vision lora to continue"
    ):
        apply_stage_weights(model, stage, adapters="init")


def test_init_from_an_adapter_with_other_lora_settings_is_refused(tiny_root, tmp_path):
    """Continuing an adapter on fewer target modules would silently drop most of the earlier stage's update."""
    import pytest

    from llava_ft.model.build import build_model
    from llava_ft.model.trainability import apply_trainability
    from llava_ft.stage import apply_stage_weights

    first = write_tiny_stage_output(tiny_root, tmp_path / "first", llm_mode="lora")
    cfg = tiny_config(tiny_root, llm_mode="lora")
    cfg.lora.target_modules = ["q_proj"]
    _, model = build_model(cfg)
    apply_trainability(model, cfg.trainable, cfg.lora)
    with pytest.raises(ValueError, match="the adapter does not fit this stage's LoRA"):
        apply_stage_weights(model, first, adapters="init")
    cfg = tiny_config(tiny_root, llm_mode="lora")  # the same settings continue fine
    _, model = build_model(cfg)
    apply_trainability(model, cfg.trainable, cfg.lora)
    apply_stage_weights(model, first, adapters="init")


def _damage_projector(stage: Path) -> Path:
    path = stage / "projector.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    return path


def _damage_vision(stage: Path) -> Path:
    path = stage / VISION_NAME
    path.write_bytes(path.read_bytes()[:100])
    return path


def _drop_adapter_weights(stage: Path) -> Path:
    (stage / "llm_adapter" / "adapter_model.safetensors").unlink()
    return stage / "llm_adapter"


def _break_template(stage: Path) -> Path:
    (stage / "template.json").write_text("{")
    return stage / "template.json"


def _drop_template(stage: Path) -> Path:
    (stage / "template.json").unlink()
    return stage / "template.json"


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (_damage_projector, "damaged or truncated"),
        (_damage_vision, "damaged or truncated"),
        (_drop_adapter_weights, "without adapter_model.safetensors"),
        (_break_template, "not valid JSON"),
        (_drop_template, "missing"),
    ],
)
def test_damaged_stage_files_are_named_before_the_model_loads(
    tiny_root, tmp_path, monkeypatch, capsys, damage, problem
):
    """These once gave a raw SafetensorError traceback, peft's "Repo id must be in the form ...", or a json
    error without the file name, and only after the whole model had loaded."""
    import llava_ft.model.build
    import llava_ft.stage
    from llava_ft.cli.main import main

    stage = write_tiny_stage_output(
        tiny_root, tmp_path / "stage", llm_mode="lora", vision_backend="open_clip", vision_mode="full"
    )
    bad = damage(stage)

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before the stage files were checked")

    monkeypatch.setattr(llava_ft.model.build, "build_model", no_build)
    monkeypatch.setattr(llava_ft.stage, "build_model", no_build)  # load_stage builds with its own import
    for argv in (
        ["chat", str(stage), "--question", "hi"],
        ["export", str(stage), "--output", str(tmp_path / "o")],
    ):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"error: {bad}: " in err and problem in err, err
    assert not (tmp_path / "o").exists()


def test_damaged_weights_are_named_when_loading_too(tiny_root, tmp_path):
    """apply_stage_weights (also used when a stage starts from init_from) reports the file, not SafetensorError."""
    stage = write_tiny_stage_output(
        tiny_root, tmp_path / "stage", llm_mode="lora", vision_backend="open_clip"
    )
    cfg = read_stage_config(stage)
    _, model = build_model(cfg)
    path = stage / "projector.safetensors"
    path.write_bytes(path.read_bytes()[:-8])  # header intact, data cut short
    with pytest.raises(ValueError, match="projector.safetensors: cannot read it .*damaged or truncated"):
        apply_stage_weights(model, stage, adapters="load")
    path.unlink()
    _drop_adapter_weights(stage)
    with pytest.raises(FileNotFoundError, match="llm_adapter: LoRA adapter folder without adapter_model"):
        apply_stage_weights(model, stage, adapters="load")


def test_a_stage_config_reads_from_anywhere(tmp_path, monkeypatch):
    """A stage trained with `--train.deepspeed configs/deepspeed/zero3.json` (relative) and a tracker this machine
    lacks is still read by chat, export and later stages from another folder."""
    from llava_ft.config import dump_config, load_config, parse_overrides
    from llava_ft.stage import absolute_paths

    repo = Path(__file__).parents[1]
    monkeypatch.chdir(repo)
    overrides = ["--train.deepspeed", "configs/deepspeed/zero3.json", "--train.report_to", "no-such-tracker"]
    cfg = load_config(repo / "configs" / "tiny" / "finetune.yaml", parse_overrides(overrides))
    stage = tmp_path / "stage"
    stage.mkdir()
    dump_config(absolute_paths(cfg), stage / CONFIG_NAME)
    monkeypatch.chdir(tmp_path)
    again = read_stage_config(stage)
    assert again.train.deepspeed == str(repo / "configs" / "deepspeed" / "zero3.json")
    assert again.train.report_to == "no-such-tracker"


def _state(stage) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in stage.model.state_dict().items()}


def test_a_finetune_loads_without_its_pretrain_and_with_moved_base_models(tmp_path):
    """The finetune holds the pretrain's projector, so the pretrain folder may go; base models that moved are
    given as overrides, and the loaded model is bit-identical to the one before the move."""
    from llava_ft.testing.tiny_chain import write_tiny_chain

    pretrain, finetune = write_tiny_chain(tmp_path / "old")
    saved = (finetune / PROJECTOR_NAME).read_bytes()
    assert saved == (pretrain / PROJECTOR_NAME).read_bytes()
    before = _state(load_stage(finetune))
    chained = (
        tmp_path / "old" / "chained"
    )  # the finetune as an older output: the chain supplies the projector
    shutil.copytree(finetune, chained)
    (chained / STAGE_NAME).unlink()
    (chained / PROJECTOR_NAME).unlink()
    assert stage_chain(chained) == [pretrain, chained] and stage_chain(finetune) == [finetune]
    for k, v in _state(load_stage(chained)).items():
        assert torch.equal(v, before[k]), k
    (tmp_path / "old").rename(tmp_path / "new")
    moved, bases = tmp_path / "new" / "finetune", tmp_path / "new" / "bases"
    (tmp_path / "new" / "pretrain").rename(tmp_path / "new" / "pretrain.renamed")
    with pytest.raises(FileNotFoundError) as e:
        load_stage(moved)
    old_llm = tmp_path / "old" / "bases" / "llm_internlm2"
    assert str(e.value) == f"`{moved / CONFIG_NAME}`: model.llm {old_llm} not found; pass --model.llm DIR"
    with pytest.raises(
        FileNotFoundError, match="model.vision.model .* not found; pass --model.vision.model DIR"
    ):
        load_stage(moved, overrides={"model.llm": str(bases / "llm_internlm2")})
    overrides = {
        "model.llm": str(bases / "llm_internlm2"),
        "model.vision.model": str(bases / "clip_open_clip"),
    }
    after = _state(load_stage(moved, overrides=overrides))
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


def test_an_older_chained_output_without_its_init_from_says_to_re_save(tiny_root, tmp_path):
    first = write_tiny_stage_output(tiny_root, tmp_path / "pretrain", seed=0)
    second = write_tiny_stage_output(tiny_root, tmp_path / "finetune", seed=1)
    _set_init_from(second, first)
    first.rename(tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match="train.init_from .* not found; .*re-save"):
        load_stage(second)


def test_serve_and_eval_take_the_base_model_flags(tiny_root, tmp_path, capsys):
    """serve reports a moved base with its flag (exit 2, before the page starts); eval passes the flags on."""
    import argparse

    from llava_ft.cli.main import main
    from llava_ft.eval.arguments import add_common_args
    from llava_ft.stage import base_overrides

    stage = write_tiny_stage_output(tmp_path / "bases", tmp_path / "stage", llm_mode="lora")
    (tmp_path / "bases").rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["serve", str(stage)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llava-ft serve: error: `") and err.endswith("; pass --model.llm DIR\n"), err
    parser = argparse.ArgumentParser()
    add_common_args(parser)
    args = parser.parse_args(["--checkpoint", "c", "--data", "d", "--output", "o", "--model.llm", "L"])
    assert base_overrides(args) == {"model.llm": "L", "model.vision.model": None}
