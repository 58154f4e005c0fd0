"""`Query`, one question for `Assistant.generate` and `option_logprobs`: in a module of its own, without torch, so
the benchmarks can build their questions (and check their inputs) before a model and its libraries load."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Query:
    question: str
    """User text. When `image` is set and the text has no `<image>` marker, one is put in front."""
    image: object | None = None
    """A PIL image, or None for a text-only question."""
