"""After a few real training steps, exactly the components the config names have changed."""

from __future__ import annotations

import logging
import shutil
import warnings

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import nn
from transformers import TrainerCallback

from llava_ft.config import ConfigError, ModelSection, RunConfig, TrainableSection
from llava_ft.constants import IMAGE_TOKEN_INDEX
from llava_ft.model.build import build_model
from llava_ft.model.trainability import apply_trainability
from llava_ft.stage import VISION_NAME, load_stage
from llava_ft.testing.tiny_llava import tiny_config
from llava_ft.testing.tiny_llm import write_tiny_qwen2
from llava_ft.train.run import train


class Snapshot(TrainerCallback):
    """Copies every parameter when training starts (after trainability and init_from are applied)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before: dict, model) -> dict[str, bool]:
    return {n: not torch.equal(before[n], p.detach()) for n, p in model.named_parameters()}


def test_pretrain_changes_only_the_projector(llava_cfg, tmp_path):
    snap = Snapshot()
    cfg = llava_cfg(tmp_path / "pretrain", stage="pretrain", llm_mode="frozen")
    result = train(cfg, callbacks=[snap])
    diff = changed(snap.before, result.model)
    projector = [n for n in diff if n.startswith("projector.")]
    others = [n for n in diff if not n.startswith("projector.")]
    assert projector and all(diff[n] for n in projector)
    assert others and not any(diff[n] for n in others)
    assert (tmp_path / "pretrain" / "projector.safetensors").is_file()
    assert not (tmp_path / "pretrain" / "llm_adapter").exists()
    summary = result.summary
    assert summary["params"]["llm"]["trainable"] == 0 and summary["params"]["vision"]["trainable"] == 0


def test_finetune_changes_projector_and_lora_only(llava_cfg, tmp_path):
    pre = llava_cfg(tmp_path / "pretrain", stage="pretrain", llm_mode="frozen", max_steps=2)
    pretrained = train(pre).model.projector.state_dict()

    snap = Snapshot()
    cfg = llava_cfg(tmp_path / "finetune", stage="finetune", llm_mode="lora")
    cfg.train.init_from = str(tmp_path / "pretrain")
    result = train(cfg, callbacks=[snap])
    # init_from really loaded the pretrain projector before training began.
    for k, v in pretrained.items():
        assert torch.equal(snap.before[f"projector.{k}"], v)
    diff = changed(snap.before, result.model)
    lora = [n for n in diff if "lora_" in n]
    projector = [n for n in diff if n.startswith("projector.")]
    frozen = [n for n in diff if n not in lora and n not in projector]
    assert lora and projector and frozen
    assert all(diff[n] for n in projector)
    # lora_A may stay put for a step while lora_B starts at zero; across 4 steps both move.
    assert all(diff[n] for n in lora)
    assert not any(diff[n] for n in frozen), [n for n in frozen if diff[n]][:5]
    assert any(n.startswith("vision_tower.") for n in frozen) and any(n.startswith("llm.") for n in frozen)
    out = tmp_path / "finetune"
    assert (out / "llm_adapter" / "adapter_model.safetensors").is_file()
    assert (out / "projector.safetensors").is_file() and (out / "llava_ft.yaml").is_file()


def test_lora_targets_that_match_nothing_are_refused(tiny_root):
    """A list written for another architecture: peft adapts the names that match and is silent about the rest."""
    cfg = tiny_config(tiny_root, llm_mode="lora")
    cfg.lora.target_modules = ["q_proj", "wqkv"]  # wqkv: InternLM2's remote-code name, not this loader's
    _, model = build_model(cfg)
    with pytest.raises(
        ConfigError, match=r"\['wqkv'\] match no module of this LLM; its linear layers are \["
    ):
        apply_trainability(model, cfg.trainable, cfg.lora)
    cfg.lora.target_modules = ["q_proj", "v_proj"]
    _, model = build_model(cfg)
    apply_trainability(model, cfg.trainable, cfg.lora)
    assert any("lora_A" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("llm_kind", ["internlm2", "llama", "qwen2"])
def test_all_linear_adapts_every_linear_but_the_output_head(tiny_root, llm_kind):
    if llm_kind == "qwen2":
        llm_dir = tiny_root / "llm_qwen2"
        if not (llm_dir / "config.json").exists():
            write_tiny_qwen2(llm_dir, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
        cfg = RunConfig(model=ModelSection(llm=str(llm_dir), dtype="float32"),
                        trainable=TrainableSection(llm="lora", projector="frozen"))  # fmt: skip
    else:
        cfg = tiny_config(tiny_root, llm_mode="lora", vision_backend=None, llm_kind=llm_kind)
    assert cfg.lora.target_modules == "all-linear"
    _, model = build_model(cfg)
    head = model.llm.get_output_embeddings()
    linear = {n for n, m in model.llm.named_modules() if isinstance(m, nn.Linear) and m is not head}
    apply_trainability(model, cfg.trainable, cfg.lora)
    adapted = {
        n.removeprefix("base_model.model.") for n, m in model.llm.named_modules() if isinstance(m, LoraLayer)
    }
    assert adapted == linear and len(linear) == 14  # 7 per decoder layer


def test_wrapping_in_lora_keeps_librarys_deprecation_noise_out(tiny_root):
    """peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: a FutureWarning at
    every LoRA stage and load that the user cannot act on, so it is kept out; other warnings still show."""
    cfg = tiny_config(tiny_root, llm_mode="lora")
    _, model = build_model(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_trainability(model, cfg.trainable, cfg.lora)
        warnings.warn("a warning of our own", UserWarning, stacklevel=1)
    messages = [str(w.message) for w in caught]
    assert not any("is_gradient_checkpointing" in m for m in messages), messages
    assert "a warning of our own" in messages


@pytest.mark.parametrize("backend", ["open_clip", "hf"])
def test_vision_full_opens_exactly_the_part_of_the_tower_that_reaches_the_loss(tiny_root, backend, caplog):
    """Blocks after the feature layer and the pooling head get no gradient: opening them would make them
    trainable in name only (counted, handed to the optimizer, saved, never changed)."""
    cfg = tiny_config(tiny_root, llm_mode="frozen", vision_backend=backend, vision_mode="full")
    _, model = build_model(cfg)
    tower = model.vision_tower
    for p in tower.parameters():
        p.requires_grad_(True)
    tower(torch.randn(2, 3, tower.image_size, tower.image_size)).sum().backward()
    reaches = {n for n, p in tower.named_parameters() if p.grad is not None}
    with caplog.at_level(logging.INFO, logger="llava_ft"):
        apply_trainability(model, cfg.trainable, cfg.lora)
    opened = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert opened == reaches
    assert len(opened) < len(list(tower.parameters()))  # the last block and the head stay frozen
    assert any("embedding" in n for n in opened)
    assert "stay frozen: they never reach the loss" in caplog.text
    assert not any(p.requires_grad for p in model.llm.parameters())
    assert all(p.requires_grad for p in model.projector.parameters())


def _image_logits(model) -> torch.Tensor:
    """Logits of a prompt with one random image: they depend on every used tower weight."""
    size = model.vision_tower.image_size
    ids = torch.tensor([[5, *[IMAGE_TOKEN_INDEX] * model.num_image_tokens, 9, 11, 3]])
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval().llm(inputs_embeds=model.embed(ids, pixels), use_cache=False).logits


def test_vision_full_trains_the_tower_at_vision_lr_and_its_output_reloads(llava_cfg, tmp_path):
    snap = Snapshot()
    out = tmp_path / "pretrain"
    cfg = llava_cfg(out, stage="pretrain", llm_mode="frozen", vision_lr=1e-3, projector_lr=2e-3)
    cfg.trainable.vision = "full"
    result = train(cfg, callbacks=[snap])
    model = result.model
    opened = {n for n, p in model.named_parameters() if p.requires_grad}
    tower = {n for n in opened if n.startswith("vision_tower.")}
    projector = {n for n in opened if n.startswith("projector.")}
    assert tower and opened == tower | projector
    diff = changed(snap.before, model)
    assert {n for n, moved in diff.items() if moved} == opened
    assert result.summary["params"]["vision"]["trainable"] > 0

    names = {id(p): n for n, p in model.named_parameters()}
    by_lr: dict[float, set[str]] = {}
    for group in result.trainer.optimizer.param_groups:
        by_lr.setdefault(group["initial_lr"], set()).update(names[id(p)] for p in group["params"])
    assert by_lr == {1e-3: tower, 2e-3: projector}

    saved = load_file(str(out / VISION_NAME))
    assert {f"vision_tower.{k}" for k in saved} == tower
    assert torch.equal(_image_logits(load_stage(out).model), _image_logits(model))


def _tower_base(name: str) -> str:
    """A tower parameter's name in the bare tower, for a tower wrapped in peft LoRA."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def test_later_stages_continue_from_a_tower_trained_in_full(llava_cfg, tmp_path):
    pre = llava_cfg(tmp_path / "pretrain", stage="pretrain", llm_mode="frozen", max_steps=2)
    pre.trainable.vision = "full"
    tuned = {n: p.detach().clone() for n, p in train(pre).model.vision_tower.named_parameters()}

    # A finetune with the tower frozen starts from the tuned tower and carries its file.
    snap = Snapshot()
    finetune = tmp_path / "finetune"
    ft = llava_cfg(
        finetune, stage="finetune", llm_mode="lora", max_steps=2, init_from=str(tmp_path / "pretrain")
    )
    result = train(ft, callbacks=[snap])
    for n, t in tuned.items():
        assert torch.equal(snap.before[f"vision_tower.{n}"], t), n
    assert (finetune / VISION_NAME).read_bytes() == (tmp_path / "pretrain" / VISION_NAME).read_bytes()
    shutil.rmtree(tmp_path / "pretrain")  # the finetune holds what it needs
    assert torch.equal(_image_logits(load_stage(finetune).model), _image_logits(result.model))

    # A LoRA stage on the tuned tower: the tower's weights go in first, under peft's names, then the adapter.
    snap = Snapshot()
    lora = tmp_path / "vision_lora"
    cfg = llava_cfg(lora, stage="finetune", llm_mode="lora", max_steps=2, init_from=str(finetune))
    cfg.trainable.vision = "lora"
    result = train(cfg, callbacks=[snap])
    wrapped = {
        _tower_base(n.removeprefix("vision_tower.")): t
        for n, t in snap.before.items()
        if n.startswith("vision_tower.") and "lora_" not in n
    }
    assert wrapped.keys() == tuned.keys()
    assert all(torch.equal(wrapped[n], t) for n, t in tuned.items())
    assert (lora / VISION_NAME).is_file() and (lora / "vision_adapter").is_dir()
    assert torch.equal(_image_logits(load_stage(lora).model), _image_logits(result.model))
