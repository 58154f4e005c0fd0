"""The benchmarks' shared command line: common flags, the model to ask, user errors as one line.

Each benchmark module defines its flags once (`add_arguments`) and what a parsed command does (`run`); its
script (`python eval/<name>.py`) and `llava-ft eval <name>` both build their parser from them.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from llava_ft.config import ConfigError
from llava_ft.data.conversation import DataError
from llava_ft.eval.runner import Predictor
from llava_ft.folders import add_base_path_args, base_overrides

if TYPE_CHECKING:
    from llava_ft.inference import Assistant


def add_common_args(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="trained checkpoint folder to evaluate")
    src.add_argument("--predictions", type=Path, help="re-score this predictions.jsonl without a model")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True, help="folder for predictions.jsonl and results")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument(
        "--limit", type=positive_int, default=None, help="evaluate only the first N questions"
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=32)
    parser.add_argument("--load-4bit", action="store_true")
    add_base_path_args(parser)
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--n-resamples", type=positive_int, default=1000, help="bootstrap resamples")


def add_images_arg(parser: argparse.ArgumentParser) -> None:
    """--images, required only with --checkpoint (`images_from_args` checks): a re-score needs no pixels."""
    parser.add_argument(
        "--images",
        type=Path,
        help="folder the records' image paths are relative to (needed with --checkpoint, not --predictions)",
    )


def images_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path | None:
    """The image folder when predicting; None when re-scoring, so that no image file is looked for."""
    if args.checkpoint is None:
        return None
    if args.images is None:
        parser.error("--images is required with --checkpoint (re-scoring with --predictions needs none)")
    if not args.images.is_dir():  # before the model loads, not at the first image
        raise FileNotFoundError(f"--images {args.images}: no such folder")
    return args.images


def check_input_files(args: argparse.Namespace) -> None:
    """--data and --predictions name files that are there: one line naming the flag, before the model loads."""
    for flag, path in (("--data", args.data), ("--predictions", args.predictions)):
        if path is not None and not path.exists():
            raise FileNotFoundError(f"{flag} {path}: no such file")


def positive_int(text: str) -> int:
    """An argparse type: a slice by a negative --limit would silently drop items from the end."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace, argparse.ArgumentParser, str], int]
"""A benchmark's `run(args, parser, command)`: `parser` reports flag errors, `command` is recorded as typed."""


def script_main(doc: str, add_arguments: AddArguments, run: Run) -> Callable[[list[str] | None], int]:
    """A benchmark script's `main(argv)`: its own parser, described by the first line of `doc`, the command
    recorded as `python <script> ...`, user errors as one line."""

    @reports_user_errors
    def main(argv: list[str] | None = None) -> int:
        parser = argparse.ArgumentParser(description=doc.split("\n")[0])
        add_arguments(parser)
        args = parser.parse_args(argv)
        return run(args, parser, command_line(argv))

    return main


def command_line(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", sys.argv[0] or "-", *args])


def reports_user_errors(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap a benchmark's `main` as `llava-ft` does its commands: bad input (a data or predictions file, a
    checkpoint folder, a refused resume) prints one `prog: error: ...` line and returns 2; any other exception
    is a bug and keeps its traceback."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except (DataError, ConfigError, FileNotFoundError) as e:
            print(f"{Path(sys.argv[0]).name or 'eval'}: error: {e}", file=sys.stderr)
            return 2

    return wrapper


def lazy_predictor(
    args: argparse.Namespace, options: list[str] | None = None
) -> Callable[[], Predictor] | None:
    """`predictor_from_args`, deferred until the benchmark's data has been read: a bad record is reported
    before the model loads, not after (minutes for a 7B model). None when re-scoring."""
    return None if args.checkpoint is None else lambda: predictor_from_args(args, options)


# The model's modules import torch and transformers: imported when a model loads, so that `llava-ft eval` checks
# its flags and files first (start-up time).
def load_assistant(checkpoint: str, **kwargs) -> Assistant:
    from llava_ft.inference import load_assistant

    return load_assistant(checkpoint, **kwargs)


def stage_fingerprint(checkpoint: str) -> str:
    from llava_ft.stage import stage_fingerprint

    return stage_fingerprint(checkpoint)


def predictor_from_args(args: argparse.Namespace, options: list[str] | None = None) -> Predictor:
    model = load_assistant(args.checkpoint, load_4bit=args.load_4bit, overrides=base_overrides(args))
    return Predictor(
        model,
        args.checkpoint,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        options=options,
        weights=stage_fingerprint(args.checkpoint),
        load_4bit=args.load_4bit,
    )
