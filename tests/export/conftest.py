"""Fixtures for the export tests: tiny base models and a LoRA stage output, built once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_ft.testing.tiny_llava import tiny_config, write_tiny_stage_output

REFERENCE_TEMPLATES = Path(__file__).parents[1] / "reference" / "chat_templates.json"


@pytest.fixture(scope="session")
def root(tmp_path_factory) -> Path:
    """Where the tiny base models and stage outputs live."""
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def lora_ckpt(root) -> Path:
    return write_tiny_stage_output(root, root / "stage_lora", llm_mode="lora", vision_backend="open_clip")


@pytest.fixture(scope="session")
def internlm2_dir(root) -> Path:
    """The tiny InternLM2 base model (its tokenizer as published: sentencepiece, custom code)."""
    return Path(tiny_config(root, vision_backend=None).model.llm)


@pytest.fixture(scope="session")
def official_reference() -> dict:
    """The official chat templates (tests/reference/README.md says where each comes from)."""
    return json.loads(REFERENCE_TEMPLATES.read_text())
