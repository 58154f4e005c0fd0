"""`llava-ft` command line: train | data | config | chat | export | serve | eval."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import socket
import sys

import datasets.utils.logging
import torch.distributed as dist
import transformers.utils.logging

import llava_ft
from llava_ft.cli import chat, data, export, serve
from llava_ft.cli import config as config_cli
from llava_ft.cli import eval as eval_cli
from llava_ft.config import ConfigError, load_config, parse_overrides
from llava_ft.data.conversation import DataError
from llava_ft.model.build import check_names
from llava_ft.train.preflight import preflight
from llava_ft.train.run import train

LOG_LEVELS = ("debug", "info", "warning", "error")
# Libraries whose INFO lines would bury llava_ft's own; they speak at WARNING and above unless --log-level debug.
OTHER_LOGGERS = (
    "transformers",
    "datasets",
    "accelerate",
    "DeepSpeed",
    "deepspeed",
    "peft",
    "httpx",
    "httpcore",
    "urllib3",
    "filelock",
    "PIL",
    "matplotlib",
    "open_clip",
    "timm",
)


def _setup_logging(level_name: str = "info") -> None:
    """llava_ft logs at `level_name`; other libraries at WARNING (or the chosen level when higher), and at INFO
    under debug, since their DEBUG lines (HTTP, file locks, image plugins) are rarely what one is looking for."""
    level = getattr(logging, level_name.upper())
    others = logging.INFO if level == logging.DEBUG else max(level, logging.WARNING)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=others)
    logging.getLogger("llava_ft").setLevel(level)
    for name in OTHER_LOGGERS:
        logging.getLogger(name).setLevel(others)
    # torch's INFO lines are compiler statistics at exit, noise even when debugging llava_ft.
    logging.getLogger("torch").setLevel(max(level, logging.WARNING))
    # Both keep their own library logger and handler, set through their own API.
    transformers.utils.logging.set_verbosity(others)
    datasets.utils.logging.set_verbosity(others)


def package_version() -> str:
    try:
        return importlib.metadata.version("llava_ft")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return getattr(llava_ft, "__version__", "unknown")


def _add_log_level(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """--log-level on `parser` and every subcommand under it, so it may be given before or after the command;
    below the top its default is left unset, so a later position only overrides an earlier one."""
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info" if top else argparse.SUPPRESS,
        help="llava_ft's log level (default info); other libraries log warnings and errors only, and also "
        "their INFO lines with debug",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                _add_log_level(sub, top=False)


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    cfg = load_config(args.config, parse_overrides(extra), for_training=True)
    check_names(cfg, args.config)
    if cfg.train.deepspeed and "RANK" not in os.environ:
        _single_process_group()
    if args.preflight:
        print("\n".join(preflight(cfg).lines()))
    else:
        result = train(cfg, resume=args.resume if args.resume != "auto" else True, overwrite=args.overwrite)
        if int(os.environ.get("RANK", "0")) == 0:  # once, not once per torchrun process
            print(f"stage output: {result.output_dir}")
    _shut_down_distributed()
    return 0


def _single_process_group() -> None:
    """DeepSpeed outside a launcher: describe a one-process group, as torchrun would, rather than let DeepSpeed
    look for MPI (which fails with "No module named 'mpi4py'")."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))


def _shut_down_distributed() -> None:
    """Under torchrun: every rank done, then the process group closed before exit. Left to interpreter shutdown,
    gloo's threads can be torn down mid-flight (a rank aborts with "terminate called without an active
    exception" after the stage output is written, failing the run)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llava-ft", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train", help="run one training stage from a YAML config (+ --section.key value overrides)"
    )
    p.add_argument("config", help="YAML config file")
    once = p.add_mutually_exclusive_group()
    once.add_argument(
        "--preflight",
        action="store_true",
        help="check the run before starting it: two steps on the longest samples into a temporary folder, a "
        "reload and one answer; prints step time, peak memory and an estimate of the whole run",
    )
    once.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=False,
        help="resume from the newest checkpoint-N in the output folder, or from the folder given",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in an output folder holding an earlier run's checkpoint-N folders (removes them)",
    )
    p.set_defaults(func=cmd_train, takes_extra=True)

    data.add_data_commands(sub)
    for module in (config_cli, chat, export, serve, eval_cli):
        module.add_commands(sub)
    _add_log_level(parser, top=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    _setup_logging(args.log_level)
    if extra and not getattr(args, "takes_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args, extra) if getattr(args, "takes_extra", False) else args.func(args)
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, ConfigError | DataError | FileNotFoundError):
            print(f"llava-ft: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
