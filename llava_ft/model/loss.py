"""Causal-LM loss from the LLM's final hidden states, without materialising the whole vocabulary's logits.

`chunked` computes logits only for positions with a target, a checkpointed chunk at a time; `fused` is
liger-kernel's fused linear cross-entropy (GPU), which never builds them. Both equal HF's `ForCausalLMLoss`.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llava_ft.constants import IGNORE_INDEX

log = logging.getLogger("llava_ft")

LossMode = Literal["plain", "chunked", "fused"]


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with positions, as HF shifts them: position t predicts labels[t + 1]; the last predicts none."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def liger_installed() -> bool:
    # liger-kernel is optional (extra [gpu]); importing its loss tells whether it can load here.
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import (  # noqa: F401
            LigerFusedLinearCrossEntropyLoss,
        )
    except ImportError:
        return False
    return True


def is_plain_linear(head: nn.Module) -> bool:
    """A head whose output is exactly `hidden @ weight.T (+ bias)` with a dense weight (what liger fuses):
    not 4-bit (bitsandbytes subclasses nn.Linear), not wrapped by a LoRA layer, and not a ZeRO-3 partitioned
    parameter (`ds_id`), which is gathered only when the module itself is called."""
    return (
        isinstance(head, nn.Linear)
        and type(head).forward is nn.Linear.forward
        and not hasattr(head.weight, "ds_id")
    )


def _chunk_loss_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # HF upcasts logits to fp32 before the cross-entropy; so do we.
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _fused_loss_sum(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # liger-kernel is optional (extra [gpu]): imported only where it runs.
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    # The kernel multiplies its operands directly (no autocast inside): give it the head's dtype.
    hidden = hidden.to(head.weight.dtype)
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, hidden, targets, head.bias)


def causal_lm_loss(
    hidden: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor,
    *,
    mode: Literal["chunked", "fused"] = "chunked",
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = 1024,
    checkpoint_chunks: bool = True,
) -> torch.Tensor:
    """HF's causal-LM loss of `head(hidden)` against unshifted `labels` ([B, T, H] and [B, T]).

    Labels are shifted here (a position predicts the next label); the sum over targets is divided by their
    count, or by `num_items_in_batch` when the Trainer passes it (gradient accumulation), as HF does.
    Positions without a target cost nothing: they are dropped before the head. With no target at all the
    result is what HF gives: NaN for the mean, 0 with `num_items_in_batch` (the graph is kept either way).
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} do not match labels {tuple(labels.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    targets = shift_labels(labels).reshape(-1).to(hidden.device)
    keep = targets != IGNORE_INDEX
    flat = hidden.reshape(-1, hidden.shape[-1])
    selected, targets = flat[keep], targets[keep]

    if mode == "fused" and not is_plain_linear(head):
        raise ValueError(
            f"model.loss fused needs a dense nn.Linear output head, got {type(head).__name__}; use chunked"
        )
    if not selected.shape[0]:
        # Nothing to train here: a zero that still reaches the head and the decoder, so every rank's gradient
        # hooks (DDP, ZeRO) fire as on other micro-batches.
        total = head(flat[:1]).float().sum() * 0.0
    elif mode == "fused":
        total = _fused_loss_sum(head, selected, targets)
    else:
        total = sum(
            checkpoint(_chunk_loss_sum, head, h, t, use_reentrant=False)
            if checkpoint_chunks and torch.is_grad_enabled()
            else _chunk_loss_sum(head, h, t)
            for h, t in zip(selected.split(chunk_size), targets.split(chunk_size))
        )
    total = total.float()
    if num_items_in_batch is None:
        return total / keep.sum()  # 0 / 0 = NaN when nothing is a target, as HF's mean
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def resolve_loss_mode(setting: str, *, on_gpu: bool, head: nn.Module | None = None) -> LossMode:
    """auto: fused when liger-kernel is installed and on GPU (with a dense head), else chunked on GPU, plain on
    CPU. An explicit `fused` that cannot run here (no liger-kernel, no GPU: e.g. a GPU run's saved config
    loaded for chat on CPU) becomes chunked, which gives the same loss, with a warning."""
    if setting not in ("auto", "plain", "chunked", "fused"):
        raise ValueError(f"model.loss: {setting!r} is not one of auto, plain, chunked, fused")
    fused_ok = on_gpu and liger_installed()
    if setting == "fused" and not fused_ok:
        why = "liger-kernel is not installed (pip install -e .[gpu])" if on_gpu else "there is no GPU"
        log.warning(
            "model.loss fused: %s; using the chunked loss (same value, logits built chunk by chunk)", why
        )
        return "chunked"
    if setting != "auto":
        return setting  # type: ignore[return-value]
    if not on_gpu:
        return "plain"
    return "fused" if fused_ok and (head is None or is_plain_linear(head)) else "chunked"
