"""`sdpa_packed`: attention within each sample of packed rows, for devices without flash-attn or flex_attention.

Plain sdpa with a block-diagonal mask still computes all L x L scores of a packed row; here each sample is
attended on its own, as flash-attn's varlen kernel does, so attention costs about sum(len_i^2) per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "sdpa_packed"
BUCKET_RATIO, BUCKET_SLACK = 1.25, 32
"""Samples share a bucket while its longest is at most BUCKET_RATIO times their length or BUCKET_SLACK tokens
longer: padding stays bounded, and short samples do not each cost a call."""

Spans = list[list[tuple[int, int]]]
"""Per row, the (start, end) token span of each sample, covering the row."""


def packed_spans(position_ids: torch.Tensor) -> Spans:
    """Sample spans of each row of [R, L] position_ids: a new sample wherever the position does not go up by one
    (restarts at 0 per sample, padding tail included, as `PackedCollator` writes them)."""
    pos = position_ids.detach().cpu()
    new = torch.ones_like(pos, dtype=torch.bool)
    new[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    spans = []
    length = pos.shape[1]
    for row in new:
        starts = row.nonzero().flatten().tolist()
        spans.append(list(zip(starts, starts[1:] + [length])))
    return spans


@dataclass
class Bucket:
    gather: torch.Tensor
    """[n * length] positions in the flattened [rows * L] tokens; a sample's padding repeats its last token."""
    keep: torch.Tensor | None
    """Which of the n * length outputs are real tokens (None: all)."""
    n: int
    length: int


@dataclass
class PackedPlan:
    """How the samples of packed rows are grouped into SDPA calls (`plan_packed`)."""

    rows: int
    length: int
    buckets: list[Bucket]
    order: torch.Tensor
    """Puts the buckets' real outputs, concatenated, back into flattened row order."""
    samples: int


def plan_packed(spans: Spans, length: int, device: torch.device | str = "cpu") -> PackedPlan:
    """Buckets of similar-length samples (longest first) over rows of `length` tokens, and the order that puts
    their outputs back; built once per forward and shared by every layer."""
    starts = np.array([r * length + s for r, row in enumerate(spans) for s, _ in row], dtype=np.int64)
    lengths = np.array([e - s for row in spans for s, e in row], dtype=np.int64)
    by_length = np.argsort(-lengths, kind="stable")
    buckets, placed = [], []
    i = 0
    while i < len(by_length):
        longest = int(lengths[by_length[i]])
        j = i + 1
        while j < len(by_length) and (
            lengths[by_length[j]] * BUCKET_RATIO >= longest or longest - lengths[by_length[j]] <= BUCKET_SLACK
        ):
            j += 1
        members = by_length[i:j]
        lens, firsts = lengths[members], starts[members]
        offsets = np.arange(longest)
        gather = firsts[:, None] + np.minimum(offsets[None, :], lens[:, None] - 1)
        real = (offsets[None, :] < lens[:, None]).reshape(-1)
        placed.append(gather.reshape(-1)[real])
        keep = None if real.all() else torch.from_numpy(np.flatnonzero(real)).to(device)
        buckets.append(Bucket(torch.from_numpy(gather.reshape(-1)).to(device), keep, len(members), longest))
        i = j
    positions = np.concatenate(placed)
    order = np.empty_like(positions)
    order[positions] = np.arange(len(positions))
    return PackedPlan(len(spans), length, buckets, torch.from_numpy(order).to(device), len(lengths))


def packed_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_plan: PackedPlan | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature: query [B, H, L, D], key/value [B, KV, L, D] -> [B, L, H, D].

    The samples of all rows are sorted by length into a few buckets, each right-padded to its longest sample
    and run as one causal SDPA call: right padding needs no mask (a causal query never sees the positions
    after it), and the padded queries' outputs are dropped. The samples' spans come from `packed_plan`
    (`LlavaModel` plans once per forward) or from the position_ids, which restart at 0 per sample. With a
    padding mask (padded batches, generation) this is transformers' own sdpa with its mask."""
    if attention_mask is not None or query.shape[2] != key.shape[2]:  # padding, or a KV cache in use
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if getattr(module, "sliding_window", None):
        raise ValueError(
            "sdpa_packed is plain causal attention: use sdpa or flex_attention for sliding-window layers"
        )
    rows, heads, length, dim = query.shape
    if packed_plan is None:
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            raise ValueError("sdpa_packed without an attention mask needs position_ids or packed_plan")
        packed_plan = plan_packed(_spans_per_row(position_ids, rows), length, query.device)
    if (packed_plan.rows, packed_plan.length) != (rows, length):
        raise ValueError(
            f"packed_plan is for {packed_plan.rows} rows of {packed_plan.length} tokens, but the attention "
            f"input is {rows} rows of {length}"
        )
    dropout = dropout if module.training else 0.0
    # [B, H, L, D] -> [B * L, H, D]: one token per index, so a bucket gathers its samples' tokens in one call.
    q, k, v = (x.transpose(1, 2).reshape(rows * length, x.shape[1], dim) for x in (query, key, value))
    outs = []
    for b in packed_plan.buckets:
        qb, kb, vb = (
            x.index_select(0, b.gather).view(b.n, b.length, x.shape[1], dim).transpose(1, 2)
            for x in (q, k, v)
        )
        out = F.scaled_dot_product_attention(
            qb, kb, vb, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=kb.shape[1] != heads
        )
        out = out.transpose(1, 2).reshape(b.n * b.length, heads, dim)
        outs.append(out if b.keep is None else out.index_select(0, b.keep))
    out = torch.cat(outs).index_select(0, packed_plan.order)
    return out.view(rows, length, heads, dim), None


def _spans_per_row(position_ids: torch.Tensor, rows: int) -> Spans:
    spans = packed_spans(position_ids)
    return spans * rows if len(spans) == 1 and rows > 1 else spans  # [1, L] positions shared by every row


def packed_sdpa_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """sdpa's 4-D mask where there is padding; None (causal within each sample's span) where there is none,
    rather than the L x L block-diagonal mask per row transformers would build for packed rows and ignore."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Make `attn_implementation="sdpa_packed"` known to transformers (idempotent)."""
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)


register()
