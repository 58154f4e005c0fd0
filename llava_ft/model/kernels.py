"""Optional liger-kernel fused ops on GPU (`pip install -e .[gpu]`): RMSNorm, SwiGLU MLP and RoPE Triton kernels.

Patched into an already-loaded LLM instance (before LoRA wraps its linears), so the weights, their names and
the checkpoints stay as they are; only forwards change. The fused linear cross-entropy is not patched into the
LLM: `model/loss.py` calls it on the decoder's hidden states (model.loss fused). Without liger-kernel, or on
CPU, nothing here runs and the plain transformers modules are the path.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from llava_ft.model.loss import liger_installed

log = logging.getLogger("llava_ft")


def resolve_liger(setting: bool | None, *, on_gpu: bool | None = None) -> bool:
    """None: use liger-kernel when it is installed and a GPU is present. True where it cannot run (no package,
    no GPU: e.g. a GPU run's saved config loaded for chat on CPU) keeps the plain modules, with a warning."""
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    usable = on_gpu and liger_installed()
    if setting and not usable:
        why = "liger-kernel is not installed (pip install -e .[gpu])" if on_gpu else "there is no CUDA GPU"
        log.warning("model.liger true: %s; keeping the plain RMSNorm, SwiGLU and RoPE", why)
    return usable if setting is None else bool(setting) and usable


def apply_liger_kernels(llm: nn.Module) -> bool:
    """Patch RMSNorm, SwiGLU and RoPE of `llm` (a transformers causal LM) with liger's kernels.
    Returns False (and logs) for a model type liger does not cover."""
    # liger-kernel is optional (extra [gpu]): imported only where it runs.
    from liger_kernel.transformers.monkey_patch import (
        MODEL_TYPE_TO_APPLY_LIGER_FN,
        _apply_liger_kernel_to_instance,
    )

    model_type = getattr(llm.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        log.warning("liger-kernel has no kernels for model type %r: keeping the plain modules", model_type)
        return False
    _apply_liger_kernel_to_instance(
        model=llm,
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
    )
    log.info("liger-kernel: RMSNorm, SwiGLU and RoPE kernels applied to the %s LLM", model_type)
    return True
