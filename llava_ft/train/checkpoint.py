"""Resumable checkpoint body: every trainable parameter under its full name, gathered under ZeRO-3."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from llava_ft.stage import atomic_save_tensors

TRAINABLE_NAME = "trainable.safetensors"


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: torch.nn.Module, folder: Path, state_dict: dict | None = None) -> None:
    """Resumable checkpoint body: every trainable parameter under its full name."""
    tensors = trainable_state_dict(model)
    if state_dict is not None:
        tensors = {n: state_dict[n] for n in tensors if n in state_dict}
    atomic_save_tensors(tensors, folder / TRAINABLE_NAME)


@contextlib.contextmanager
def gathered_trainable(model: torch.nn.Module):
    """Whole trainable parameters on every rank while saving: ZeRO-3 keeps only a shard of each. Every rank must
    enter (the gather is a collective); elsewhere this does nothing."""
    if not is_deepspeed_zero3_enabled():
        yield
        return
    import deepspeed  # optional: only a ZeRO-3 run needs it

    with deepspeed.zero.GatheredParameters(
        [p for p in model.parameters() if p.requires_grad], modifier_rank=None
    ):
        yield


def load_trainable(model: torch.nn.Module, folder: Path) -> None:
    state = load_file(str(folder / TRAINABLE_NAME))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise RuntimeError(
            f"{folder}: trainable weights do not fit this model: missing {missing[:5]}, unknown {unknown[:5]}"
        )
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].dtype))
