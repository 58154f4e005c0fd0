"""Scripted stand-ins for a model: evaluation logic is tested without building one."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from PIL import Image


class ScriptedAssistant:
    """Answers each query with `answer(query)`; records every query it was asked."""

    def __init__(self, answer: Callable, logprobs: Callable | None = None):
        self.answer = answer
        self.logprobs = logprobs
        self.asked: list = []

    def generate(self, queries, *, max_new_tokens: int = 32):
        self.asked += queries
        return [self.answer(q) for q in queries]

    def option_logprobs(self, queries, options):
        self.asked += queries
        return [self.logprobs(q, options) for q in queries]


@pytest.fixture
def scripted():
    return ScriptedAssistant


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    for name in ("red", "blue", "green"):
        Image.new("RGB", (8, 8), name).save(d / f"{name}.png")
    return d
