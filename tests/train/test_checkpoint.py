"""stage_fingerprint: what evaluation records to refuse resuming over predictions made by other weights."""

from __future__ import annotations

import yaml

from llava_ft.testing.tiny_llava import write_tiny_stage_output
from llava_ft.train.checkpoint import CONFIG_NAME, stage_fingerprint


def test_fingerprint_follows_the_weights_of_the_stage_and_its_init_from(tiny_root, tmp_path):
    first = write_tiny_stage_output(tiny_root, tmp_path / "pretrain", seed=0)
    second = write_tiny_stage_output(tiny_root, tmp_path / "finetune", seed=1)
    cfg = yaml.safe_load((second / CONFIG_NAME).read_text())
    cfg["train"]["init_from"] = str(first)
    (second / CONFIG_NAME).write_text(yaml.safe_dump(cfg))

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
