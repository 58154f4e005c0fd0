"""`llava-ft config show CONFIG [--section.key value ...]`: the resolved config (file, overrides, defaults) as YAML.

Reads and checks the config as `train` would, without loading a model or touching data, so an override can be
tried out before a run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from llava_ft.config import RunConfig, load_config, parse_overrides, to_dict
from llava_ft.model import names


def check_names(cfg: RunConfig, source: str | Path | None) -> None:
    """model.build.check_names, with torch and transformers imported only when the config names an attention
    implementation (the names they know): reading a config answers at once otherwise."""
    names.check_names(cfg, source, attention=_attention_names if cfg.model.attn_implementation else None)


def _attention_names() -> list[str]:
    from llava_ft.model.build import attn_implementations  # imports torch: only when needed (start-up time)

    return attn_implementations()


def cmd_config_show(args: argparse.Namespace, extra: list[str]) -> int:
    cfg = load_config(args.config, parse_overrides(extra))
    check_names(cfg, args.config)
    sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("config", help="inspect a run config: show")
    sub = p.add_subparsers(dest="config_command", required=True)
    show = sub.add_parser(
        "show",
        help="print the resolved config (file + --section.key value overrides + defaults) as YAML",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("config", help="YAML config file")
    show.set_defaults(func=cmd_config_show, takes_extra=True)
