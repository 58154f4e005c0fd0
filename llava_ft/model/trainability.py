"""Per-component trainability from config: frozen | full | lora | qlora. Logs what is frozen."""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

from peft import LoraConfig, get_peft_model
from torch import nn

from llava_ft.config import ConfigError, LoraSection, TrainableSection

log = logging.getLogger("llava_ft")


def vision_lora_targets(tower: nn.Module) -> list[str]:
    """Full names of the tower's Linear layers in the blocks up to the one whose output is used (`tower.block`):
    later blocks never reach the loss, so adapters there would be trainable in name only. nn.MultiheadAttention
    (open_clip) is targeted whole, because it reads `out_proj.weight` directly and a LoRA on out_proj alone
    would never receive a gradient."""
    mha = [name for name, m in tower.named_modules() if isinstance(m, nn.MultiheadAttention)]
    names = mha + [
        name
        for name, m in tower.named_modules()
        if isinstance(m, nn.Linear) and not any(name.startswith(f"{outer}.") for outer in mha)
    ]
    return sorted(name for name in names if not _HEAD.search(name) and _in_used_block(tower, name))


def _in_used_block(tower: nn.Module, name: str) -> bool:
    """Whether `name` lies outside the block list, or in a block up to the one whose output is used."""
    last = getattr(tower, "block", None)
    found = _BLOCK_INDEX.search(name)
    return last is None or found is None or int(found.group(1)) <= last


# open_clip's, transformers' and timm's (open_clip's SigLIP trunk) block lists.
_BLOCK_INDEX = re.compile(r"\.(?:resblocks|layers|blocks)\.(\d+)\.")
# What follows the blocks: open_clip's ln_post, proj, attn_pool, head; transformers' post_layernorm and
# SigLIP's head; the timm trunk's norm, attn_pool, fc_norm and head. The tower returns a block's tokens, so
# these only shape the pooled output, which nothing uses.
_HEAD = re.compile(
    r"^model\.(?:vision_model\.|trunk\.)?(?:ln_post|proj|attn_pool|head|post_layernorm|norm|fc_norm)(?:\.|$)"
)


def open_used_tower(tower: nn.Module) -> int:
    """Open every parameter of the tower that reaches the loss (patch, class and position embeddings, norms,
    the blocks up to `tower.block`); returns how many parameters stay frozen as unused."""
    frozen = 0
    for name, p in tower.named_parameters():
        used = not _HEAD.search(name) and _in_used_block(tower, name)
        p.requires_grad_(used)
        frozen += 0 if used else p.numel()
    return frozen


def count_params(module: nn.Module | None) -> tuple[int, int]:
    """(trainable, total). 4-bit weights are packed two per byte: count their logical elements."""
    if module is None:
        return 0, 0
    trainable = total = 0
    for p in module.parameters():
        n = p.numel()
        if hasattr(p, "quant_state") and p.quant_state is not None:
            n = int(p.quant_state.shape.numel())
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def apply_trainability(model: nn.Module, trainable: TrainableSection, lora: LoraSection) -> None:
    """Freeze everything, then open what the config names. `model` is a LlavaModel."""
    for p in model.parameters():
        p.requires_grad_(False)

    if trainable.llm == "full":
        for p in model.llm.parameters():
            p.requires_grad_(True)
    elif trainable.llm in ("lora", "qlora"):
        # "all-linear" is peft's: every Linear (bitsandbytes' Linear4bit too) except the output head.
        if isinstance(lora.target_modules, list):
            _check_targets(model.llm, lora.target_modules)
        cfg = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        )
        with peft_wrap():
            model.llm = get_peft_model(model.llm, cfg)

    if model.projector is not None and trainable.projector == "full":
        for p in model.projector.parameters():
            p.requires_grad_(True)

    if model.vision_tower is not None and trainable.vision == "full":
        unused = open_used_tower(model.vision_tower)
        if unused:
            log.info(
                "vision    full: %s parameters after block %d (later blocks, pooling head) stay frozen: they "
                "never reach the loss",
                f"{unused:,}",
                model.vision_tower.block,
            )
    elif model.vision_tower is not None and trainable.vision == "lora":
        targets = vision_lora_targets(model.vision_tower)
        cfg = LoraConfig(
            r=lora.vision_r, lora_alpha=lora.vision_alpha, lora_dropout=lora.dropout, target_modules=targets
        )
        with peft_wrap():
            model.vision_tower = get_peft_model(model.vision_tower, cfg)

    log_trainability(model, trainable)


@contextlib.contextmanager
def peft_wrap() -> Iterator[None]:
    """Around wrapping a model in peft: peft reads transformers' deprecated `is_gradient_checkpointing` alias,
    a FutureWarning at every LoRA stage and load that the user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


def _check_targets(llm: nn.Module, targets: list[str]) -> None:
    """Every name in lora.target_modules must match a module (peft's rule: the name, or its last dotted parts).
    peft refuses only when none matches; a list written for another architecture would otherwise adapt a part
    of the layers and train on without a word."""
    names = [name for name, _ in llm.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unmatched:
        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, m in llm.named_modules() if isinstance(m, nn.Linear)}
        )
        raise ConfigError(
            f"lora.target_modules: {unmatched} match no module of this LLM; its linear layers are {linear} "
            "(or use all-linear)"
        )


def log_trainability(model: nn.Module, trainable: TrainableSection) -> dict[str, dict[str, int]]:
    parts = {"llm": model.llm, "projector": model.projector, "vision": model.vision_tower}
    summary = {}
    for name, module in parts.items():
        n_train, n_total = count_params(module)
        if module is None:
            continue
        mode = getattr(trainable, name)
        state = "trainable" if n_train else "frozen"
        log.info(
            "%-9s %-7s %-9s %12s trainable / %12s params", name, mode, state, f"{n_train:,}", f"{n_total:,}"
        )
        summary[name] = {"trainable": n_train, "total": n_total}
    return summary
