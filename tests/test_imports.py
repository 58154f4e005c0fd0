"""Import directions and imports at module top, read from the source with `ast` (nothing is imported).

Directions follow the data flow: config -> data -> model -> train; stage, inference, eval, export and cli sit
on top and never reach into the trainer.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

# Packages a function may import: outside install_requires, so llava_ft must import without them.
LAZY_ALLOWED = {
    "deepspeed": "extra [deepspeed]: multi-GPU ZeRO runs only",
    "bitsandbytes": "extras [gpu] and [4bit]: 4-bit loading and paged optimizers, CUDA only",
    "liger_kernel": "extra [gpu]: Triton kernels, CUDA only",
    "flash_attn": "a CUDA build in no extra: used when installed",
    "gradio": "`llava-ft serve` only, in no extra",
    "mistral_common": "test requirement: llava_ft.testing's ready-made sentencepiece model",
}

# Modules whose functions may import what they need (start-up time): the command line imports a command's
# implementation, and torch and transformers behind it, only when that command runs, so --help, --version and the
# checks of files and flags answer at once; reading a config looks up transformers' names only when it must.
START_UP_LAZY = {
    "llava_ft.cli.main",
    "llava_ft.cli.chat",
    "llava_ft.cli.config",
    "llava_ft.cli.data",
    "llava_ft.cli.export",
    "llava_ft.config",
    # The benchmarks' model loader: `llava-ft eval` and the scripts check their files before a model loads.
    "llava_ft.eval.arguments",
}

TRAINER_USERS = {"llava_ft.cli.main"}
"""Modules outside train/ that may import it: the `train` command."""


def _within(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


@dataclass(frozen=True)
class Rule:
    text: str
    importer: Callable[[str], bool]
    target: Callable[[str], bool]


ABOVE_MODEL = (
    "llava_ft.train",
    "llava_ft.stage",
    "llava_ft.inference",
    "llava_ft.eval",
    "llava_ft.export",
    "llava_ft.cli",
)
"""What builds on the model: neither data/ nor model/ may import it."""

RULES = [
    Rule(
        "config.py and constants.py import nothing from llava_ft",
        lambda m: m in ("llava_ft.config", "llava_ft.constants"),
        lambda t: _within(t, "llava_ft"),
    ),
    Rule(
        "data/ never imports model/, train/, stage, inference, eval, export or cli/",
        lambda m: _within(m, "llava_ft.data"),
        lambda t: _within(t, "llava_ft.model", *ABOVE_MODEL),
    ),
    Rule(
        "model/ never imports train/, stage, inference, eval, export or cli/",
        lambda m: _within(m, "llava_ft.model"),
        lambda t: _within(t, *ABOVE_MODEL),
    ),
    Rule(
        "nothing outside train/ imports train/ (inference, eval and export included), but cli/main.py's train command",
        lambda m: not _within(m, "llava_ft.train") and m not in TRAINER_USERS,
        lambda t: _within(t, "llava_ft.train"),
    ),
]


@dataclass(frozen=True)
class Import:
    where: str
    """path:line"""
    importer: str
    target: str
    """The imported module, absolute and dotted (`from a.b import c` gives a.b.c where c is a module)."""
    in_function: bool


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(root: Path, dotted: str) -> bool:
    base = root.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _targets(root: Path, importer: str, is_package: bool, node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: resolved against the importing module's package
            package = importer.split(".")
            package = package if is_package else package[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        return [f"{base}.{a.name}" if _is_module(root, f"{base}.{a.name}") else base for a in node.names]
    # importlib.import_module("x") and __import__("x"): imports all the same
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
            return [node.args[0].value]
    return []


def imports_of(root: Path, path: Path) -> list[Import]:
    importer = module_name(root, path)
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            for target in dict.fromkeys(_targets(root, importer, is_package, child)):
                found.append(
                    Import(f"{path.relative_to(root)}:{child.lineno}", importer, target, in_function)
                )
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return found


def all_imports(root: Path) -> list[Import]:
    return [imp for path in sorted((root / "llava_ft").rglob("*.py")) for imp in imports_of(root, path)]


def direction_violations(root: Path) -> list[str]:
    return [
        f"{imp.where}: {imp.importer} imports {imp.target}: {rule.text}"
        for imp in all_imports(root)
        for rule in RULES
        if rule.importer(imp.importer) and rule.target(imp.target)
    ]


def function_import_violations(root: Path) -> list[str]:
    out = []
    for imp in all_imports(root):
        if not imp.in_function or imp.importer in START_UP_LAZY:
            continue
        top = imp.target.split(".")[0]
        if top == "llava_ft":
            out.append(
                f"{imp.where}: {imp.target} imported inside a function (llava_ft imports go at the top)"
            )
        elif top not in LAZY_ALLOWED:
            out.append(f"{imp.where}: {imp.target} imported inside a function (not an optional package)")
    return out


def test_imports_follow_the_allowed_directions():
    violations = direction_violations(ROOT)
    assert not violations, "\n".join(violations)


def test_imports_sit_at_module_top():
    violations = function_import_violations(ROOT)
    assert not violations, "\n".join(violations)


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A small llava_ft tree: what the rules allow, and one violation of each kind."""
    for package in (
        "llava_ft",
        "llava_ft/data",
        "llava_ft/model",
        "llava_ft/train",
        "llava_ft/cli",
        "llava_ft/eval",
    ):
        _write(tmp_path, f"{package}/__init__.py", "")
    _write(tmp_path, "llava_ft/constants.py", "import os\n")
    _write(tmp_path, "llava_ft/config.py", "from . import constants\n")
    _write(
        tmp_path, "llava_ft/data/tokenize.py", "from llava_ft.config import X\nfrom ..constants import Y\n"
    )
    _write(tmp_path, "llava_ft/data/bad.py", "def f():\n    from llava_ft.model.build import check_names\n")
    _write(
        tmp_path,
        "llava_ft/model/build.py",
        "import numpy\nfrom llava_ft.data import tokenize\n\ndef g():\n    import deepspeed\n    import numpy\n",
    )
    _write(tmp_path, "llava_ft/train/run.py", "from llava_ft.model.build import g\nfrom . import run\n")
    _write(tmp_path, "llava_ft/cli/main.py", "from llava_ft.train.run import train\n")
    _write(
        tmp_path,
        "llava_ft/eval/runner.py",
        "import importlib\nrun = importlib.import_module('llava_ft.train.run')\n",
    )
    return tmp_path


def test_the_checks_find_planted_violations_and_only_those(planted: Path):
    assert direction_violations(planted) == [
        "llava_ft/config.py:1: llava_ft.config imports llava_ft.constants: " + RULES[0].text,
        "llava_ft/data/bad.py:2: llava_ft.data.bad imports llava_ft.model.build: " + RULES[1].text,
        "llava_ft/eval/runner.py:2: llava_ft.eval.runner imports llava_ft.train.run: " + RULES[3].text,
    ]
    assert function_import_violations(planted) == [
        "llava_ft/data/bad.py:2: llava_ft.model.build imported inside a function (llava_ft imports go at the top)",
        "llava_ft/model/build.py:6: numpy imported inside a function (not an optional package)",
    ]
