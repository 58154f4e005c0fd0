"""Throughput counts of the Trainer wrapper, against the samples a batch was built from."""

from __future__ import annotations

import random

from llava_ft.data.collate import PackedCollator
from llava_ft.train.trainer import packed_counts

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
