"""`llava-ft` command line: train | data | config | chat | export | serve | eval."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import os
import socket
import sys
from pathlib import Path

import llava_ft
from llava_ft.config import ConfigError, load_config, parse_overrides
from llava_ft.data.conversation import DataError
from llava_ft.errors import InputError, is_disk_full
from llava_ft.files import disk_full

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
    # Both set their library logger's level when first imported, from these variables (their documented
    # switch); the command imports them later, or already has (in a test), where the level set above holds.
    os.environ["TRANSFORMERS_VERBOSITY"] = os.environ["DATASETS_VERBOSITY"] = logging.getLevelName(
        others
    ).lower()


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
    from llava_ft.train.early import check_inputs

    overrides = parse_overrides(extra)
    check_inputs(
        load_config(args.config, overrides), args.config, resume=args.resume, preflight=args.preflight
    )
    # for_training looks up the installed report_to integrations, which imports torch: after the checks above.
    cfg = load_config(args.config, overrides, for_training=True)
    # Imported only here, after the checks of files and flags: torch and transformers take seconds to import.
    from llava_ft.model.build import check_names
    from llava_ft.train.preflight import preflight
    from llava_ft.train.run import train

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
    import torch.distributed as dist  # the train command has imported torch already

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# The subcommands in other modules: name -> (module, its add_commands function, one-line help). Only the module of
# the command being run is imported (start-up time: most import torch and transformers); --help lists the rest
# from this table.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "data": (
        "llava_ft.cli.data",
        "add_data_commands",
        "inspect and prepare training data: preview | check | prepare",
    ),
    "config": ("llava_ft.cli.config", "add_commands", "inspect a run config: show"),
    "chat": ("llava_ft.cli.chat", "add_commands", "chat with a stage output in the terminal"),
    "export": (
        "llava_ft.cli.export",
        "add_commands",
        "merge LoRA and write a standard transformers folder (LlavaForConditionalGeneration or the LLM)",
    ),
    "serve": ("llava_ft.cli.serve", "add_commands", "chat with a stage output in a local web page (gradio)"),
    "eval": (
        "llava_ft.cli.eval",
        "add_commands",
        "score a stage output (or re-score a predictions file) on MMBench, POPE or VQA",
    ),
}


def _command_name(argv: list[str]) -> str | None:
    """The subcommand named in argv (the first word that is not an option or --log-level's value)."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; `command` names the subcommand whose arguments are wanted (None: all of them), the others
    are listed by name and help only, so that their modules are not imported."""
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

    for name, (module, add, help_line) in COMMANDS.items():
        if command is None or name == command:
            getattr(importlib.import_module(module), add)(sub)
        else:
            sub.add_parser(name, help=help_line)
    _add_log_level(parser, top=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    command = _command_name(argv)
    parser = build_parser(command or "")
    args, extra = parser.parse_known_args(argv)
    _setup_logging(args.log_level)
    if extra and not getattr(args, "takes_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args, extra) if getattr(args, "takes_extra", False) else args.func(args)
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, ConfigError | DataError | InputError | FileNotFoundError):
            print(f"llava-ft: error: {e}", file=sys.stderr)
            return 2
        raise
    except OSError as e:  # a write the library made itself (cache, checkpoint) into a full disk
        if not is_disk_full(e):
            raise
        folder = Path(e.filename).parent if e.filename else Path.cwd()
        print(f"llava-ft: error: {disk_full(folder)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
