"""`sdpa_packed`: SDPA run once per sample inside packed rows, for devices without flash-attn or flex_attention.

With plain sdpa a packed row of L tokens gets a block-diagonal mask, and the kernel still computes all L x L
scores: packing then saves the padding but pays full-row attention (on the tiny CPU model, packed rows of 2048
ran at 0.82x padded slot tokens/s). Here each sample is its own causal SDPA call, the way flash-attn's varlen
kernel treats packed rows, so attention costs sum(len_i^2) instead of L^2 per row.

Without a padding mask, no 4-D mask is built (for packed rows transformers would otherwise build an L x L
block-diagonal one per row, 134 MB at L = 8192, only to have it ignored): the samples' spans come from the
position_ids, which restart at 0 per sample (`LlavaModel` computes them once per forward and passes
`packed_spans`; any other caller gets them from the `position_ids` the decoder layers pass down). With a
padding mask (padded batches, generation) this is transformers' own sdpa with its mask.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "sdpa_packed"

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


def packed_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_spans: Spans | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function signature: query [B, H, L, D], key/value [B, KV, L, D] -> [B, L, H, D]."""
    if attention_mask is not None or query.shape[2] != key.shape[2]:  # padding, or a KV cache in use
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if getattr(module, "sliding_window", None):
        raise ValueError(
            "sdpa_packed is plain causal attention: use sdpa or flex_attention for sliding-window layers"
        )
    if packed_spans is None:
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            raise ValueError("sdpa_packed without an attention mask needs position_ids or packed_spans")
        packed_spans = _spans_per_row(position_ids, query.shape[0])
    if len(packed_spans) != query.shape[0] or any(s[-1][1] != query.shape[2] for s in packed_spans):
        raise ValueError(
            f"packed_spans cover {[s[-1][1] for s in packed_spans]} tokens in {len(packed_spans)} rows, but the "
            f"attention input is {query.shape[0]} rows of {query.shape[2]}"
        )
    gqa = query.shape[1] != key.shape[1]
    dropout = dropout if module.training else 0.0
    rows = []
    for r, spans in enumerate(packed_spans):
        parts = [
            F.scaled_dot_product_attention(
                query[r : r + 1, :, s:e],
                key[r : r + 1, :, s:e],
                value[r : r + 1, :, s:e],
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
                enable_gqa=gqa,
            )
            for s, e in spans
        ]
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def _spans_per_row(position_ids: torch.Tensor, rows: int) -> Spans:
    spans = packed_spans(position_ids)
    return spans * rows if len(spans) == 1 and rows > 1 else spans  # [1, L] positions shared by every row


def packed_sdpa_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """sdpa's 4-D mask where there is padding; None (causal within each sample's span) where there is none."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Make `attn_implementation="sdpa_packed"` known to transformers (idempotent)."""
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)


register()
