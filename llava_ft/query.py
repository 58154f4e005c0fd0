"""`Query`, one question for `Assistant.generate` and `option_logprobs`: in a module of its own, without torch, so
the benchmarks can build their questions (and check their inputs) before a model and its libraries load."""

from __future__ import annotations

from dataclasses import dataclass

from llava_ft.constants import IMAGE_TOKEN


@dataclass
class Query:
    question: str
    """User text. With images and no `<image>` marker in it, one marker per image is put in front."""
    image: object | None = None
    """A PIL image, a list of PIL images (one per `<image>` marker, in order), or None (a text-only
    question)."""

    @property
    def images(self) -> list:
        if self.image is None:
            return []
        return list(self.image) if isinstance(self.image, list) else [self.image]

    def user_text(self) -> str:
        """The user turn: the question, its images' markers in front when it has none (as training puts a
        record's images that have no marker; one image reads `<image>\\n` + question, LLaVA's prompt)."""
        n = len(self.images)
        return (
            f"{IMAGE_TOKEN * n}\n{self.question}" if n and IMAGE_TOKEN not in self.question else self.question
        )
