"""The names a config hands to the code (projector kind, data formats, chat template, attention kernel), checked
without torch, so that reading a config for use reports an unknown one at once, naming the field."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from pathlib import Path

from llava_ft.config import ConfigError, RunConfig
from llava_ft.data.sources import FORMATS
from llava_ft.data.templates import TEMPLATE_NAMES

_MLP_KIND = re.compile(r"mlp(\d+)x_gelu")


def projector_depth(kind: str) -> int:
    """Linear layers of a projector kind; ValueError for an unknown kind (config validation calls it too)."""
    if kind == "linear":
        return 1
    match = _MLP_KIND.fullmatch(kind)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(
            f"unknown projector kind {kind!r}: expected 'linear', 'mlp2x_gelu' or 'mlpNx_gelu' (N >= 1)"
        )
    return int(match.group(1))


def check_names(
    cfg: RunConfig,
    source: str | Path | None = None,
    *,
    attention: Callable[[], list[str]] | None = None,
) -> None:
    """ConfigError, naming the field (after `source`, the config file, when given), for a projector kind, data
    format or chat template the code does not know, and, given `attention` (the names a config may give, which
    transformers lists), for an unknown attention implementation."""
    try:
        _check_names(cfg, attention)
    except ConfigError as e:
        if source is None:
            raise
        raise ConfigError(f"{source}: {e}") from None


def _check_names(cfg: RunConfig, attention: Callable[[], list[str]] | None) -> None:
    try:
        projector_depth(cfg.model.projector)
    except ValueError as e:
        raise ConfigError(f"model.projector: {e}") from None
    for i, src in enumerate(cfg.data.train):
        if src.format not in ("auto", *FORMATS):
            raise ConfigError(f"data.train[{i}].format: {src.format!r} is not one of {['auto', *FORMATS]}")
    check_template(cfg.data.template, "data.template")
    attn = cfg.model.attn_implementation
    # A name with a slash is a hub kernel, which transformers resolves itself.
    if attention is not None and attn is not None and "/" not in attn and attn not in attention():
        raise ConfigError(f"model.attn_implementation: {attn!r} is not one of {attention()}")


def check_template(name: str, where: str) -> None:
    """ConfigError naming `where` for a chat template the code does not know, with the nearest known name."""
    if name not in TEMPLATE_NAMES:
        near = difflib.get_close_matches(name, TEMPLATE_NAMES, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{where}: {name!r} is not one of {list(TEMPLATE_NAMES)}{hint}")
