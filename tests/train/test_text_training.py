"""Text-only SFT / incremental pretraining trains with full, lora and qlora (4-bit NF4 on CPU), loss falling."""

from __future__ import annotations

import pytest

from llava_ft.config import DataSource
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
