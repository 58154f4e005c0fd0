"""What a stage output or export folder is, read from its small files alone (stdlib, yaml, llava_ft.config).

The command line checks a folder with these before torch and transformers are imported, so a wrong path is
reported at once; stage.py and exported.py, which load the models, build on the same readers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llava_ft.config import RunConfig, load_config

CONFIG_NAME = "llava_ft.yaml"
TEMPLATE_NAME = "template.json"
BASE_PATHS = ("model.llm", "model.vision.model")

EXPORT_INFO = "llava_ft_export.json"
"""What an export records of llava_ft: format, chat template name and stop words, the LLM's vocabulary rows
before `<image>` was added, and for the `tokenizer` template the Jinja training rendered with."""
EXPORT_FORMATS = ("hf-llava", "hf-llava-next", "hf-llava-onevision", "merged-llm")
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def read_stage_config(ckpt: str | Path) -> RunConfig:
    """The config a stage output was trained with; a folder that is not a complete stage output says so."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{ckpt}: not a folder")
    if not (ckpt / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{ckpt}: not a llava_ft stage output (no {CONFIG_NAME}; an interrupted run leaves none)"
        )
    return load_config(ckpt / CONFIG_NAME)


def add_base_path_args(parser: argparse.ArgumentParser) -> None:
    """--model.llm and --model.vision.model: base models at other paths than the stage output's config says."""
    for key in BASE_PATHS:
        parser.add_argument(
            f"--{key}",
            dest=key.replace(".", "_"),
            metavar="DIR",
            help=f"use this folder as {key} (the base model moved since the stage was trained)",
        )


def base_overrides(args: argparse.Namespace) -> dict[str, str | None]:
    """The `load_stage` overrides given by `add_base_path_args`'s flags."""
    return {key: getattr(args, key.replace(".", "_"), None) for key in BASE_PATHS}


def folder_kind(path: str | Path) -> str:
    """ "stage", "hf-llava" or "merged-llm"; a folder that is none of them is a one-line FileNotFoundError."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    if (folder / CONFIG_NAME).is_file():
        return "stage"
    if (folder / EXPORT_INFO).is_file():
        return read_export_info(folder)["format"]
    if (folder / "config.json").is_file():
        config = read_json(folder / "config.json")
        return "hf-llava" if config.get("model_type") == "llava" else "merged-llm"
    raise FileNotFoundError(
        f"{folder}: not a llava_ft stage output (no {CONFIG_NAME}; an interrupted run leaves none) nor an "
        "export (hf-llava or merged-llm: no config.json)"
    )


def folder_has_vision(path: str | Path) -> bool:
    """Whether the model in a stage output or export folder takes images (read without loading it)."""
    kind = folder_kind(path)
    if kind == "stage":
        return read_stage_config(path).model.vision is not None
    return kind == "hf-llava"


def saved_template_name(folder: str | Path) -> str | None:
    """The chat template a stage output or export records (template.json, the export info), or None where the
    folder records none (another tool's export: its template is found by rendering, once the tokenizer loads)."""
    folder = Path(folder)
    if (folder / CONFIG_NAME).is_file() and (folder / TEMPLATE_NAME).is_file():
        return read_template_info(folder)["name"]
    if (folder / EXPORT_INFO).is_file():
        return read_export_info(folder)["template"]
    return None


def read_export_info(folder: str | Path) -> dict:
    path = Path(folder) / EXPORT_INFO
    info = read_json(path)
    if info.get("format") not in EXPORT_FORMATS or not isinstance(info.get("template"), str):
        raise ValueError(f'{path}: expected {{"format": one of {list(EXPORT_FORMATS)}, "template": ...}}')
    return _with_stop_words(info, path)


def read_template_info(ckpt: str | Path) -> dict:
    """template.json of a stage output: {"name": ..., "stop_words": [...]}; a damaged one names itself."""
    path = Path(ckpt) / TEMPLATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (every stage output has one; the folder is incomplete)")
    info = read_json(path)
    if not isinstance(info.get("name"), str):
        raise ValueError(f'{path}: expected {{"name": ..., "stop_words": [...]}}, got {str(info)[:80]}')
    return _with_stop_words(info, path)


def _with_stop_words(info: dict, path: Path) -> dict:
    stop_words = info.get("stop_words", [])
    if not isinstance(stop_words, list) or not all(isinstance(w, str) for w in stop_words):
        raise ValueError(f"{path}: stop_words must be a list of strings, got {stop_words!r}")
    return info


def read_json(path: Path) -> dict:
    """A JSON object from `path`; invalid JSON or another value is a ValueError naming the file."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {str(data)[:80]}")
    return data
