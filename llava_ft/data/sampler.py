"""Length-grouped sampling for padded batches.

The grouping itself is transformers' `get_length_grouped_indices` (shuffle, sort by length inside mega-batches
of `mega_batch_mult * batch_size`, longest batch first). transformers' own `LengthGroupedSampler` is not used
because its order comes from a generator that only advances: it has no `set_epoch`, so a run resumed from a
checkpoint (a fresh generator) sees different epochs than the uninterrupted run, and the Trainer only passes it
lengths from a `datasets.Dataset` column (otherwise it loads every sample, images included, to measure them).
Here the order of epoch e is a pure function of (seed, e); the Trainer calls `set_epoch` through accelerate.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices


class LengthGroupedSampler(Sampler[int]):
    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega_batch_mult: int = 50):
        """`batch_size` is the global batch that should share a length (per-device batch x accumulation x ranks)."""
        if batch_size < 1 or mega_batch_mult < 1:
            raise ValueError(
                f"batch_size and mega_batch_mult must be positive, got {batch_size}, {mega_batch_mult}"
            )
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        if not self.lengths:
            return iter([])
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(
            get_length_grouped_indices(
                self.lengths, self.batch_size, self.mega_batch_mult, generator=generator
            )
        )
