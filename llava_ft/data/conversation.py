"""The one message type between raw data and the tokenizer.

Every source adapter produces a `Conversation`; everything after it (templates, tokenization, labels,
packing) is shared by multimodal SFT, text-only SFT and incremental pretraining.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llava_ft.constants import IMAGE_TOKEN

Role = Literal["system", "user", "assistant"]


@dataclass
class Message:
    role: Role
    content: str
    """Text; may contain `<image>` markers (one per image, in order)."""
    trainable: bool | None = None
    """None: the default rule (assistant turns trained). False: the source opted this turn out of the loss."""


@dataclass
class Conversation:
    messages: list[Message]
    images: list[str] = field(default_factory=list)
    """Image paths as written in the record (relative to the dataset's image folder), one per `<image>`."""
    id: str | None = None
    kind: Literal["chat", "text"] = "chat"
    """"text": incremental pretraining, a single user-less text whose every token is trained."""
    source: str | None = None
    """Where the record came from, "file:line" or "file[index]", for error messages and reports."""
    trimmed: bool = False
    """The record opened with an assistant turn, left out as LLaVA-1.5 does (counted as "trimmed")."""

    @property
    def where(self) -> str:
        """`source`, or a placeholder for a conversation built in code: what errors about it name."""
        return self.source or "<conversation>"

    def num_image_markers(self) -> int:
        return sum(m.content.count(IMAGE_TOKEN) for m in self.messages)


class DataError(ValueError):
    """Bad input, with the file and record (line or index) it came from."""

    def __init__(self, where: str, problem: str | None = None):
        if problem is None:
            where, problem = _from_worker_text(type(self), where)
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


def _from_worker_text(kind: type, text: str) -> tuple[str, str]:
    """(where, problem) of an error torch re-raises from a dataloader worker: it calls the error's type with one
    text, the worker's formatted traceback, whose last "module.Type: message" line is the error itself. Read back
    here, the error stays the one line it was in the worker instead of a RuntimeError holding the traceback."""
    prefix = f"{kind.__module__}.{kind.__qualname__}: "
    lines = [line[len(prefix) :] for line in text.splitlines() if line.startswith(prefix)]
    where, sep, problem = lines[-1].partition(": ") if lines else ("", "", "")
    if not sep:
        return "dataloader worker", (text.strip().splitlines() or ["failed"])[-1]
    return where, problem
