"""Packing: plan properties, lossless rows, and isolation through a real LlamaForCausalLM training forward."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from llava_ft.constants import IGNORE_INDEX
from llava_ft.data.collate import Collator, PackedCollator
from llava_ft.data.conversation import DataError
from llava_ft.data.packing import PackedDataset, plan_packs

PAD = 0


def naive_best_fit_decreasing(lengths: list[int], max_length: int) -> list[int]:
    """Textbook BFD (scan all bins), returning the row loads: the reference for plan_packs."""
    loads: list[int] = []
    for n in sorted(lengths, reverse=True):
        fits = [b for b, load in enumerate(loads) if load + n <= max_length]
        if fits:
            best = max(fits, key=lambda b: loads[b])
            loads[best] += n
        else:
            loads.append(n)
    return sorted(loads)


def test_plan_packs_matches_reference_and_keeps_every_index() -> None:
    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(1, 40), rng.randint(40, 128)]) for _ in range(300)]
    rows = plan_packs(lengths, 128, shuffle_seed=None)

    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in row) for row in rows]
    assert max(loads) <= 128
    assert sorted(loads) == naive_best_fit_decreasing(lengths, 128)
    assert len(rows) >= -(-sum(lengths) // 128)


def test_plan_packs_seed_changes_rows_but_not_their_count() -> None:
    rng = random.Random(1)
    lengths = [rng.randint(1, 64) for _ in range(200)]
    plans = [plan_packs(lengths, 128, shuffle_seed=s) for s in range(4)]
    assert len({len(p) for p in plans}) == 1
    assert len({tuple(map(tuple, p)) for p in plans}) == 4
    assert plan_packs(lengths, 128, shuffle_seed=3) == plans[3]


def test_plan_packs_rejects_a_sample_longer_than_a_row() -> None:
    with pytest.raises(DataError, match=r"sample 2: length 9 is outside \[1, max_length=8\]"):
        plan_packs([3, 4, 9], 8, shuffle_seed=None)


def make_samples(lengths: list[int], vocab: int, seed: int) -> list[dict]:
    """Samples whose labels copy input_ids where trained, with varied masks (prompt-masked, all, none but one)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for k, n in enumerate(lengths):
        ids = torch.randint(1, vocab, (n,), generator=g)
        labels = ids.clone()
        if k % 3 == 1:
            labels[: n // 2] = IGNORE_INDEX
        elif k % 3 == 2:
            labels[:-1] = IGNORE_INDEX
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def split_segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    starts = (position_ids == 0).nonzero().flatten().tolist()
    return list(zip(starts, starts[1:] + [len(position_ids)]))


def test_packed_rows_keep_every_sample_and_label() -> None:
    lengths = [5, 17, 3, 30, 12, 9, 1, 22, 8, 14]
    samples = make_samples(lengths, vocab=50, seed=0)
    packed = PackedDataset(samples, lengths, max_length=32, seed=0)
    collate = PackedCollator(pad_token_id=PAD, row_length=32)

    recovered, pad_tokens = Counter(), 0
    for start in range(0, len(packed), 2):
        batch = collate([packed[i] for i in range(start, min(start + 2, len(packed)))])
        assert "attention_mask" not in batch and batch["input_ids"].shape[1] <= 32
        for ids, labels, pos in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
            for a, b in split_segments(pos):
                assert pos[a:b].tolist() == list(range(b - a))
                # No loss across a boundary: after the shift, the token before a segment predicts this label.
                assert labels[a] == IGNORE_INDEX
                recovered[(tuple(ids[a:b].tolist()), tuple(labels[a + 1 : b].tolist()))] += 1
            pad_tokens += int((labels == IGNORE_INDEX).sum())

    expected = Counter((tuple(s["input_ids"].tolist()), tuple(s["labels"][1:].tolist())) for s in samples)
    padding = [key for key in recovered if key not in expected]
    assert all(set(ids) == {PAD} and set(labels) <= {IGNORE_INDEX} for ids, labels in padding)
    assert recovered - Counter({key: recovered[key] for key in padding}) == expected

    stats = packed.stats()
    assert (stats.rows, stats.samples, stats.real_tokens) == (len(packed), len(lengths), sum(lengths))
    assert stats.pad_share == pytest.approx(1 - sum(lengths) / (32 * len(packed)))


def test_packed_dataset_replans_per_epoch_and_checks_lengths() -> None:
    lengths = [random.Random(2).randint(1, 20) for _ in range(40)]
    packed = PackedDataset(make_samples(lengths, 50, 0), lengths, max_length=24, seed=5)
    first = [list(r) for r in packed.rows]
    packed.set_epoch(1)
    assert packed.rows != first and len(packed.rows) == len(first)
    packed.set_epoch(0)
    assert packed.rows == first

    wrong = PackedDataset(make_samples([4, 6], 50, 0), [4, 5], max_length=24, seed=None)
    with pytest.raises(DataError, match="sample 1: has 6 tokens but its planned length is 5"):
        wrong[0]


@pytest.fixture(params=["sdpa", "eager"])
def tiny_llama(request) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
    )
    model = LlamaForCausalLM._from_config(config, attn_implementation=request.param)
    assert model.config._attn_implementation == request.param
    return model.train()  # the training forward; dropout is 0 so outputs are deterministic


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Independent reference: per-token cross-entropy of next-token predictions, summed."""
    return F.cross_entropy(
        logits[..., :-1, :].reshape(-1, logits.shape[-1]),
        labels[..., 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def n_targets(labels: torch.Tensor) -> int:
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


LENGTHS = [9, 5, 14, 3, 11, 7, 16, 2]
ROW = 24


def packed_batch() -> tuple[list[dict], dict, list[list[int]]]:
    samples = make_samples(LENGTHS, vocab=64, seed=1)
    packed = PackedDataset(samples, LENGTHS, max_length=ROW, seed=0)
    batch = PackedCollator(pad_token_id=PAD, row_length=ROW)([packed[i] for i in range(len(packed))])
    assert (batch["input_ids"] == PAD).any(), "the test must include a padding segment"
    return samples, batch, packed.rows


def test_packed_loss_and_logits_equal_unpacked(tiny_llama: LlamaForCausalLM) -> None:
    model = tiny_llama
    samples, batch, rows = packed_batch()

    # Reference 1: every sample on its own, no padding, no packing.
    alone = [model(input_ids=s["input_ids"][None], use_cache=False).logits[0] for s in samples]
    reference_sum = sum(summed_loss(logits, s["labels"]) for logits, s in zip(alone, samples))

    # Reference 2: a right-padded batch with an attention mask.
    padded = Collator(pad_token_id=PAD)(samples)
    out_padded = model(
        input_ids=padded["input_ids"],
        attention_mask=padded["attention_mask"],
        labels=padded["labels"],
        use_cache=False,
    )
    # Packed: position_ids restart per sample, no attention mask, no cache.
    out_packed = model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        labels=batch["labels"],
        use_cache=False,
    )

    for k, s in enumerate(samples):
        n = len(s["input_ids"])
        assert (out_padded.logits[k, :n] - alone[k]).abs().max() < 1e-5
    order = [j for row in rows for j in row]
    # Each row holds its samples in plan order, then at most one all-padding segment.
    segments = [(r, a, b) for r, pos in enumerate(batch["position_ids"]) for a, b in split_segments(pos)]
    real = [(r, a, b) for r, a, b in segments if (batch["input_ids"][r, a:b] != PAD).any()]
    assert len(real) == len(samples)
    for j, (r, a, b) in zip(order, real):
        assert torch.equal(batch["input_ids"][r, a:b], samples[j]["input_ids"])
        assert (out_packed.logits[r, a:b] - alone[j]).abs().max() < 1e-5

    assert n_targets(batch["labels"]) == n_targets(padded["labels"])
    packed_sum = summed_loss(out_packed.logits, batch["labels"])
    torch.testing.assert_close(packed_sum, reference_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        summed_loss(out_padded.logits, padded["labels"]), reference_sum, rtol=1e-5, atol=1e-5
    )
    # HF's loss is the mean over target tokens: the same mean packed and padded.
    torch.testing.assert_close(out_packed.loss, out_padded.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        out_packed.loss * n_targets(batch["labels"]), reference_sum, rtol=1e-5, atol=1e-5
    )

    # Same gradients, so training is unchanged by packing.
    out_padded.loss.backward()
    grads_padded = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out_packed.loss.backward()
    for p, g in zip(model.parameters(), grads_padded):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_packed_samples_leak_when_the_cache_is_on(tiny_llama: LlamaForCausalLM) -> None:
    """The trap: with use_cache left at its default, transformers skips packed-sequence detection."""
    model = tiny_llama
    assert model.config.use_cache is True
    _, batch, _ = packed_batch()
    isolated = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    leaking = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    first = split_segments(batch["position_ids"][0])[0][1]  # the first sample sees nothing else either way
    assert (leaking[0, :first] - isolated[0, :first]).abs().max() < 1e-5
    assert (leaking - isolated).abs().max() > 0.05
