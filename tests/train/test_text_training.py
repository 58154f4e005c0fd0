"""Text-only SFT / incremental pretraining trains with full, lora and qlora (4-bit NF4 on CPU), loss falling."""

from __future__ import annotations

import logging

import pytest
from transformers import AttentionInterface

from llava_ft.config import ConfigError, DataSource, validate
from llava_ft.model import attention
from llava_ft.testing.tiny_llava import tiny_config
from llava_ft.train.run import train


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_text_training_loss_falls(mode, tiny_root, text_file, tmp_path):
    cfg = tiny_config(tiny_root, llm_mode=mode, vision_backend=None)
    cfg.data.train = [DataSource(path=str(text_file), format="text")]
    cfg.data.max_length = 64
    cfg.lora.r, cfg.lora.alpha = 8, 16
    t = cfg.train
    t.output_dir, t.max_steps, t.batch_size, t.lr, t.logging_steps, t.report_to = (
        str(tmp_path),
        12,
        4,
        1e-2,
        1,
        "none",
    )
    t.warmup_ratio = 0.0
    result = train(cfg)
    losses = [h["loss"] for h in result.summary["loss_history"]]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    names = {p.name for p in tmp_path.iterdir()}
    assert {"llava_ft.yaml", "template.json", "summary.json"} <= names
    assert ("llm" in names) == (mode == "full") and ("llm_adapter" in names) == (mode != "full")
    if mode == "qlora":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in result.model.llm.modules())


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_packed_training_runs_per_sample_attention(mode, tiny_root, text_file, tmp_path, caplog, monkeypatch):
    """data.packing on CPU: rows of pack_length, sdpa_packed chosen by default and given the rows' plan through
    the peft wrapper too, loss falling."""
    samples_seen: list[int] = []
    real = attention.packed_sdpa_forward

    def spy(*args, packed_plan=None, **kwargs):
        samples_seen.append(0 if packed_plan is None else packed_plan.samples)
        return real(*args, packed_plan=packed_plan, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa_packed", spy)
    cfg = tiny_config(tiny_root, llm_mode=mode, vision_backend=None)
    cfg.data.train = [DataSource(path=str(text_file), format="text")]
    cfg.data.max_length, cfg.data.packing, cfg.data.pack_length = 64, True, 160
    t = cfg.train
    t.output_dir, t.max_steps, t.batch_size, t.lr, t.logging_steps, t.report_to = (
        str(tmp_path), 10, 2, 1e-2, 1, "none"
    )  # fmt: skip
    t.warmup_ratio = 0.0
    with caplog.at_level(logging.INFO, logger="llava_ft"):
        result = train(cfg)
    assert "packing into rows of 160 tokens" in caplog.text
    assert result.model.causal_lm().config._attn_implementation == "sdpa_packed"
    assert samples_seen and min(samples_seen) > 1  # every call saw packed rows of several samples
    losses = [h["loss"] for h in result.summary["loss_history"]]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_pack_length_shorter_than_max_length_is_refused(tiny_root):
    cfg = tiny_config(tiny_root, llm_mode="full", vision_backend=None)
    cfg.data.max_length, cfg.data.pack_length = 64, 32
    with pytest.raises(ConfigError, match="pack_length 32 is shorter than data.max_length 64"):
        validate(cfg)


@pytest.mark.parametrize("n_files", [1, 2])
def test_data_counts_are_logged_once_per_file_and_once_for_several(
    n_files, tiny_root, text_file, tmp_path, caplog
):
    """One data file: its counts line alone (a total equal to it would repeat it); several: one line per file,
    then their total."""
    cfg = tiny_config(tiny_root, llm_mode="full", vision_backend=None)
    cfg.data.train = [DataSource(path=str(text_file), format="text")] * n_files
    cfg.data.max_length = 64
    t = cfg.train
    t.output_dir, t.max_steps, t.batch_size, t.report_to = str(tmp_path), 1, 4, "none"
    with caplog.at_level(logging.INFO, logger="llava_ft"):
        train(cfg)
    counts = [r.getMessage() for r in caplog.records if "records 32: kept 32" in r.getMessage()]
    assert len(counts) == n_files, counts
    totals = [m for m in caplog.messages if m.startswith("data, all 2 files: records 64: kept 64")]
    assert len(totals) == (n_files == 2), caplog.messages
