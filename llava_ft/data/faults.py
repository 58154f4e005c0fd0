"""Images that fail to load while training (changed or removed after the data was checked).

Under data.skip_bad the dataset trains another sample in a failed one's place and names the failure in the item
(`IMAGE_FAULTS`), which the collators carry into the batch: dataloader workers are other processes, so the
trainer, which counts and logs the replacements, learns of them only through the batch. Without skip_bad the
failure is raised as `ImageFault`, a `DataError` that survives torch's re-raise from a worker process.
"""

from __future__ import annotations

from typing import TypedDict

from llava_ft.data.conversation import DataError

IMAGE_FAULTS = "image_faults"
"""Item and batch key: the samples replaced there, as `Fault`s (absent when none was)."""


class Fault(TypedDict):
    record: str
    """The failed sample's record (file:line)."""
    image: str
    problem: str
    replaced_by: str
    """The record trained in its place."""


class ImageFault(DataError):
    """Record `where`'s image `image` failed to load: "<where>: image <image>: <reason>".

    torch re-raises a dataloader worker's exception as `type(text)`, text being "Caught ... Original Traceback
    ...", the worker's formatted traceback: DataError's two arguments would make that a RuntimeError with the
    traceback for its message. Given the text alone, the fields are recovered from the traceback's last line (the
    formatted exception)."""

    def __init__(self, where: str, image: str | None = None, reason: str = ""):
        if image is None:
            where, image, reason = _from_worker_text(where)
        super().__init__(where, f"image {image}: {reason}")
        self.image = image
        self.reason = reason


def _from_worker_text(text: str) -> tuple[str, str, str]:
    prefix = f"{ImageFault.__module__}.{ImageFault.__qualname__}: "
    lines = [line[len(prefix) :] for line in text.splitlines() if line.startswith(prefix)]
    where, sep, rest = lines[-1].partition(": image ") if lines else ("", "", "")
    if not sep:
        return "dataloader worker", "(unknown)", (lines or text.strip().splitlines() or ["failed"])[-1]
    image, _, reason = rest.partition(": ")
    return where, image, reason
