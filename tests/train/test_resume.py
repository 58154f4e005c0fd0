"""A run stopped after a checkpoint and resumed ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import pytest
import torch

from llava_ft.config import ConfigError
from llava_ft.testing.callbacks import StopAt
from llava_ft.train.run import train


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_resume_matches_uninterrupted_run(llava_cfg, tmp_path):
    kwargs = dict(stage="finetune", llm_mode="lora", max_steps=6, save_steps=3, save_total_limit=5)
    full_run = train(llava_cfg(tmp_path / "full", **kwargs))
    full = trainable(full_run.model)

    interrupted = llava_cfg(tmp_path / "cut", **kwargs)
    partial = trainable(train(interrupted, callbacks=[StopAt(3)]).model)
    assert (tmp_path / "cut" / "checkpoint-3" / "trainable.safetensors").is_file()
    assert any(not torch.allclose(partial[n], full[n]) for n in full), (
        "stopping early must leave other weights"
    )

    resumed_run = train(llava_cfg(tmp_path / "cut", **kwargs), resume=True)
    resumed = trainable(resumed_run.model)
    assert resumed.keys() == full.keys()
    worst = max(float((resumed[n] - full[n]).abs().max()) for n in full)
    assert worst < 1e-5, worst
    # summary.json counts the whole run, the part before the checkpoint included.
    for key in ("samples", "tokens", "tokens_trained", "pad_share"):
        assert resumed_run.summary[key] == full_run.summary[key], key
    assert resumed_run.summary["samples"] == 6 * 4
    assert resumed_run.summary["train_runtime_s"] > 0 and resumed_run.summary["tokens_per_s"] > 0


def test_resume_without_checkpoint_is_a_clear_error(llava_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(llava_cfg(tmp_path / "none", stage="finetune", llm_mode="lora"), resume=True)


def test_packed_resume_in_a_later_epoch_matches_uninterrupted_run(llava_cfg, tmp_path):
    """Packed rows are re-planned per epoch: a run resumed inside epoch 1 must train epoch 1's rows, not epoch 0's
    (the resumed epoch's batch-skipping loader does not pass the epoch on to the dataset)."""
    kwargs = dict(stage="finetune", llm_mode="lora", max_steps=-1, epochs=3, grad_accum=3, save_steps=1,
                  save_total_limit=50)  # fmt: skip

    def cfg(out):
        c = llava_cfg(out, **kwargs)
        c.data.packing = True
        return c

    full_run = train(cfg(tmp_path / "full"))
    per_epoch = full_run.summary["steps"] // 3
    assert per_epoch >= 2
    stop = per_epoch + 1  # a checkpoint inside epoch 1
    train(cfg(tmp_path / "cut"), callbacks=[StopAt(stop)])
    resumed = train(cfg(tmp_path / "cut"), resume=True)
    full, again = trainable(full_run.model), trainable(resumed.model)
    assert max(float((again[n] - full[n]).abs().max()) for n in full) < 1e-5
    losses = [h["loss"] for h in full_run.summary["loss_history"] if h["step"] > stop]
    assert losses == [h["loss"] for h in resumed.summary["loss_history"] if h["step"] > stop]


def test_resume_from_the_last_checkpoint_takes_no_further_step(llava_cfg, tmp_path):
    """Killed while writing the stage output after its last checkpoint: --resume writes it from that checkpoint
    (the Trainer alone would take one step past max_steps)."""
    kwargs = dict(stage="finetune", llm_mode="lora", max_steps=4, save_steps=2, lr_scheduler="constant")
    full = train(llava_cfg(tmp_path / "run", **kwargs))
    expected = trainable(full.model)
    (tmp_path / "run" / "llava_ft.yaml").unlink()  # the stage output left incomplete
    resumed = train(llava_cfg(tmp_path / "run", **kwargs), resume=True)
    assert resumed.summary["steps"] == 4 and (tmp_path / "run" / "llava_ft.yaml").is_file()
    # Its summary carries the checkpoint's counts (no step was taken in this session).
    for key in ("samples", "tokens", "tokens_trained"):
        assert resumed.summary[key] == full.summary[key] > 0, key
    assert resumed.summary["tokens_per_s"] and resumed.summary["samples_per_s"]
    again = trainable(resumed.model)
    assert max(float((again[n] - expected[n]).abs().max()) for n in expected) == 0.0


def test_resume_with_more_steps_continues_the_run(llava_cfg, tmp_path):
    """A finished run resumed with a larger max_steps trains on to it, as one run of that length would."""
    kwargs = dict(stage="finetune", llm_mode="lora", save_steps=2, lr_scheduler="constant")
    longer = trainable(train(llava_cfg(tmp_path / "long", max_steps=6, **kwargs)).model)
    train(llava_cfg(tmp_path / "run", max_steps=4, **kwargs))
    extended = train(llava_cfg(tmp_path / "run", max_steps=6, **kwargs), resume=True)
    assert extended.summary["steps"] == 6
    again = trainable(extended.model)
    assert max(float((again[n] - longer[n]).abs().max()) for n in longer) < 1e-5
    with pytest.raises(ConfigError, match="checkpoint-6 is at step 6, past this run's 2 steps"):
        train(llava_cfg(tmp_path / "run", max_steps=2, **kwargs), resume=True)


def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused_or_overwrites(llava_cfg, tmp_path):
    """An earlier run's checkpoints would be rotated in place of this run's and picked up by --resume."""
    kwargs = dict(stage="finetune", llm_mode="lora", max_steps=4, save_steps=2)
    train(llava_cfg(tmp_path / "run", lr=5e-3, seed=1, **kwargs))
    with pytest.raises(ConfigError, match="holds checkpoint-2, checkpoint-4 from an earlier run: --resume"):
        train(llava_cfg(tmp_path / "run", **kwargs))
    fresh = trainable(train(llava_cfg(tmp_path / "fresh", **kwargs)).model)
    again = train(llava_cfg(tmp_path / "run", **kwargs), overwrite=True, callbacks=[StopAt(2)])
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = trainable(train(llava_cfg(tmp_path / "run", **kwargs), resume=True).model)
    assert again.summary["steps"] == 2
    assert max(float((resumed[n] - fresh[n]).abs().max()) for n in fresh) < 1e-5
