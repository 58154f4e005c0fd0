"""Throughput counts of the Trainer wrapper, against the samples a batch was built from."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llava_ft.data.collate import PackedCollator
from llava_ft.train.checkpoint import TRAINABLE_NAME
from llava_ft.train.trainer import checkpoint_folders, last_checkpoint, packed_counts

EOS = PAD = 2  # no pad token: padding with EOS, which every sample also ends with


def test_packed_counts_keep_eos_tokens_that_equal_the_pad_id():
    rng = random.Random(0)
    rows = []
    for n_samples in (1, 3, 2, 4):
        row = []
        for _ in range(n_samples):
            ids = [1] + [rng.choice([PAD, 5, 6, 7]) for _ in range(rng.randint(1, 6))] + [EOS]
            row.append({"input_ids": ids, "labels": [-100] + ids[1:]})
        rows.append(row)
    full = [{"input_ids": [1, 5, PAD], "labels": [-100, 5, PAD]}] * 10  # a row with no padding segment
    batch = PackedCollator(pad_token_id=PAD, row_length=40)([*rows, full])
    samples = [s for row in [*rows, full] for s in row]
    real, n = packed_counts(batch["input_ids"], batch["labels"], batch["position_ids"], PAD)
    assert (real, n) == (sum(len(s["input_ids"]) for s in samples), len(samples))


def test_last_checkpoint_is_the_newest_complete_one(tmp_path):
    def folder(name: str, *files: str) -> None:
        (tmp_path / name).mkdir()
        for f in files:
            _write_whole(tmp_path / name / f)

    complete = ("trainer_state.json", TRAINABLE_NAME)
    assert last_checkpoint(tmp_path / "missing") is None and checkpoint_folders(tmp_path / "missing") == []
    folder("checkpoint-2", *complete)
    folder("checkpoint-10", *complete)  # after checkpoint-2 by step, before it by name
    folder("checkpoint-12", "trainer_state.json")  # no weights
    folder("checkpoint-14", TRAINABLE_NAME)  # save cut short: no trainer_state.json
    folder("checkpoint-30-old", *complete)  # a copy, not a Trainer checkpoint
    folder("runs", *complete)
    (tmp_path / "checkpoint-40").write_text("")  # a file
    assert [f.name for f in checkpoint_folders(tmp_path)] == [
        "checkpoint-2", "checkpoint-10", "checkpoint-12", "checkpoint-14"
    ]  # fmt: skip
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    (tmp_path / "checkpoint-14" / "trainer_state.json").write_text("{}")
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-14")


def _write_whole(path: Path) -> None:
    """A file of a checkpoint as the Trainer leaves it: JSON state, safetensors weights."""
    if path.name == TRAINABLE_NAME:
        save_file({"w": torch.zeros(2)}, str(path))
    else:
        path.write_text("{}")


@pytest.mark.parametrize(
    "damage",
    [
        ("trainer_state.json", b""),  # killed between open and write, or a full disk
        ("trainer_state.json", b'{"global_step": 4'),  # cut mid-write
        ("trainer_state.json", b"[]"),
        (TRAINABLE_NAME, b"\x08\x00"),  # weights cut short
    ],
)
def test_a_damaged_checkpoint_is_passed_over_with_a_warning(tmp_path, caplog, damage):
    for step in (3, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        for name in ("trainer_state.json", TRAINABLE_NAME):
            _write_whole(tmp_path / f"checkpoint-{step}" / name)
    name, data = damage
    (tmp_path / "checkpoint-6" / name).write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="llava_ft"):
        assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")
    assert f"checkpoint-6: {name} does not" in caplog.text or f"{name} is not a JSON object" in caplog.text
    (tmp_path / "checkpoint-3" / name).write_bytes(data)  # nothing loads: none to resume from, no crash
    assert last_checkpoint(tmp_path) is None
