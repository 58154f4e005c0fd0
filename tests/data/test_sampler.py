"""LengthGroupedSampler: a permutation per epoch, reproducible from (seed, epoch), batches of similar length."""

from __future__ import annotations

import random

import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader

from llava_ft.data.sampler import LengthGroupedSampler

_rng = random.Random(0)
LENGTHS = [_rng.randint(16, 64) if _rng.random() < 0.5 else _rng.randint(200, 1024) for _ in range(2000)]


def padded_slots(order: list[int], batch_size: int) -> int:
    """Tokens a padded batching of `order` would compute (every batch padded to its longest sample)."""
    return sum(
        max(LENGTHS[i] for i in order[k : k + batch_size]) * len(order[k : k + batch_size])
        for k in range(0, len(order), batch_size)
    )


def test_every_index_once_per_epoch_and_reproducible() -> None:
    sampler = LengthGroupedSampler(LENGTHS, batch_size=8, seed=3)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(len(LENGTHS))) and len(sampler) == len(LENGTHS)
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]

    resumed = LengthGroupedSampler(LENGTHS, batch_size=8, seed=3)  # e.g. a fresh process resuming at epoch 2
    resumed.set_epoch(2)
    assert list(resumed) == orders[2]


def test_batches_are_grouped_by_length() -> None:
    sampler = LengthGroupedSampler(LENGTHS, batch_size=8, seed=0)
    order = list(sampler)
    shuffled = torch.randperm(len(LENGTHS), generator=torch.Generator().manual_seed(0)).tolist()
    real = sum(LENGTHS)
    grouped_pad = 1 - real / padded_slots(order, 8)
    random_pad = 1 - real / padded_slots(shuffled, 8)
    assert grouped_pad < 0.05 < 0.3 < random_pad
    assert max(LENGTHS) in [LENGTHS[i] for i in order[:8]]  # longest batch first: memory errors surface early


def test_set_epoch_reaches_the_sampler_through_accelerate() -> None:
    """The Trainer calls set_epoch on accelerate's data loader; it must reach our sampler."""
    lengths = LENGTHS[:64]
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=1)
    loader = prepare_data_loader(
        DataLoader(range(len(lengths)), batch_size=4, sampler=sampler), put_on_device=False
    )
    loader.set_epoch(5)
    assert sampler.epoch == 5
    expected = LengthGroupedSampler(lengths, batch_size=4, seed=6)  # epoch 5 of seed 1 == epoch 0 of seed 6
    assert torch.cat(list(loader)).tolist() == list(expected)
