"""`llava-ft eval mmbench|pope|vqa ...`: the benchmark scripts (`python eval/<name>.py`) as subcommands.

Each benchmark's flags and run come from its module (llava_ft/eval/<name>.py), so both entry points take the
same flags and write the same predictions.jsonl, results.json and results.md; only the recorded command
differs, being the one typed.
"""

from __future__ import annotations

import argparse
import functools
import shlex
from types import ModuleType

from llava_ft.eval import mmbench, pope, vqa

BENCHMARKS: dict[str, ModuleType] = {"mmbench": mmbench, "pope": pope, "vqa": vqa}


class _RecordsTypedArgs(argparse._SubParsersAction):
    """The benchmark subparsers' action, which also keeps the words given from the benchmark's name on: the
    command recorded in results.json is then the one typed, not one rebuilt from parsed values."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        super().__call__(parser, namespace, values, option_string)
        namespace.typed_eval_args = list(values)


def cmd_eval(benchmark: ModuleType, parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    command = shlex.join(["llava-ft", "eval", *args.typed_eval_args])
    return benchmark.run(args, parser, command)


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score a stage output (or re-score a predictions file) on MMBench, POPE or VQA",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK", action=_RecordsTypedArgs)
    for name, module in BENCHMARKS.items():
        first_line = module.__doc__.split("\n")[0]
        b = sub.add_parser(name, help=first_line, description=first_line)
        module.add_arguments(b)
        b.set_defaults(func=functools.partial(cmd_eval, module, b))
