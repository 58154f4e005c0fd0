"""Fixtures shared across test folders: a session folder for tiny base models, a small text-only corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.jsonl"
    lines = [
        f"the {c} {s} is at the {p}."
        for c in ("red", "blue")
        for s in ("circle", "square")
        for p in ("top", "bottom")
    ]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines * 4))
    return path
