"""Packing: several samples per training row, planned ahead from their lengths.

A row is later collated by `PackedCollator` with position_ids restarting at 0 per sample and no attention
mask, which makes transformers build a block-diagonal causal mask (samples cannot see each other) as long
as no KV cache is passed: the model must be called with `use_cache=False`.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from llava_ft.data.conversation import DataError


def plan_packs(lengths: Sequence[int], max_length: int, *, shuffle_seed: int | None) -> list[list[int]]:
    """Best-fit decreasing bin packing of sample indices into rows of at most `max_length` tokens.

    Every index appears exactly once. The seed only breaks ties between equal lengths and orders the rows,
    so the number of rows (and the multiset of row loads) does not depend on it: `len()` of a packed dataset
    stays the same across epochs, which the Trainer's step count relies on. `shuffle_seed=None` keeps
    index order for ties and rows in creation order.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    for i, n in enumerate(lengths):
        if not 1 <= n <= max_length:
            # The tokenizer truncates to max_length; a longer sample here means mismatched settings.
            raise DataError(f"sample {i}", f"length {n} is outside [1, max_length={max_length}]")

    order = list(range(len(lengths)))
    rng = random.Random(shuffle_seed) if shuffle_seed is not None else None
    if rng is not None:
        rng.shuffle(order)
    order.sort(key=lambda i: lengths[i], reverse=True)  # stable: ties keep the (shuffled) order

    rows: list[list[int]] = []
    # Open rows as (free tokens, row id), kept sorted so the tightest fit is one bisect away.
    free: list[tuple[int, int]] = []
    smallest = min(lengths, default=1)
    for i in order:
        n = lengths[i]
        pos = bisect.bisect_left(free, (n, -1))
        if pos < len(free):
            room, row = free.pop(pos)
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - n >= smallest:  # rows that nothing can fill any more are closed for good
            bisect.insort(free, (room - n, row))

    if rng is not None:
        rng.shuffle(rows)
    return rows


@dataclass
class PackStats:
    rows: int
    samples: int
    real_tokens: int
    pad_share: float
    """Share of padding if every row is padded to max_length (an upper bound: collation pads to the longest row)."""


class PackedDataset(Dataset):
    """Item i is the list of samples packed into row i; collate it with `PackedCollator`.

    `lengths[j]` must be `len(dataset[j]["input_ids"])` (image tokens included), known up front so planning
    never loads a sample. With a seed, `set_epoch(e)` re-plans with seed + e (`train.trainer.DatasetEpoch` calls it
    at each epoch start, a resumed one included); the row count does not change.
    """

    def __init__(self, dataset: Dataset, lengths: Sequence[int], max_length: int, seed: int | None = 0):
        if len(lengths) != len(dataset):  # type: ignore[arg-type]
            raise ValueError(f"{len(lengths)} lengths for a dataset of {len(dataset)} samples")  # type: ignore[arg-type]
        self.dataset = dataset
        self.lengths = list(lengths)
        self.max_length = max_length
        self.seed = seed
        self.epoch: int | None = None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.epoch:  # called by accelerate and by the Trainer callback: plan once
            return
        seed = None if self.seed is None else self.seed + epoch
        self.rows = plan_packs(self.lengths, self.max_length, shuffle_seed=seed)
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        samples = []
        for j in self.rows[index]:
            sample = self.dataset[j]
            if len(sample["input_ids"]) != self.lengths[j]:
                raise DataError(
                    f"sample {j}",
                    f"has {len(sample['input_ids'])} tokens but its planned length is {self.lengths[j]}",
                )
            samples.append(sample)
        return samples

    def stats(self) -> PackStats:
        real = sum(self.lengths)
        slots = len(self.rows) * self.max_length
        return PackStats(
            rows=len(self.rows),
            samples=len(self.lengths),
            real_tokens=real,
            pad_share=1 - real / slots if slots else 0.0,
        )
