"""After a few real training steps, exactly the components the config names have changed."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import TrainerCallback

from llava_ft.config import ConfigError, ModelSection, RunConfig, TrainableSection
from llava_ft.model.build import build_model
from llava_ft.model.trainability import apply_trainability
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
