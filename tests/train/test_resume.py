"""A run stopped after a checkpoint and resumed ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from llava_ft.train.run import train


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_resume_matches_uninterrupted_run(llava_cfg, tmp_path):
    kwargs = dict(stage="finetune", llm_mode="lora", max_steps=6, save_steps=3, save_total_limit=5)
    full = trainable(train(llava_cfg(tmp_path / "full", **kwargs)).model)

    interrupted = llava_cfg(tmp_path / "cut", **kwargs)
    partial = trainable(train(interrupted, callbacks=[StopAt(3)]).model)
    assert (tmp_path / "cut" / "checkpoint-3" / "trainable.safetensors").is_file()
    assert any(not torch.allclose(partial[n], full[n]) for n in full), (
        "stopping early must leave other weights"
    )

    resumed = trainable(train(llava_cfg(tmp_path / "cut", **kwargs), resume=True).model)
    assert resumed.keys() == full.keys()
    worst = max(float((resumed[n] - full[n]).abs().max()) for n in full)
    assert worst < 1e-5, worst


def test_resume_without_checkpoint_is_a_clear_error(llava_cfg, tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(llava_cfg(tmp_path / "none", stage="finetune", llm_mode="lora"), resume=True)
