"""Images that fail to load while training (changed or removed after the data was checked).

Under data.skip_bad the dataset trains another sample in a failed one's place and names the failure in the item
(`IMAGE_FAULTS`), which the collators carry into the batch: dataloader workers are other processes, so the
trainer, which counts and logs the replacements, learns of them only through the batch. Without skip_bad the
failure is raised as `ImageFault`, a `DataError`.
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
    """Record `where`'s image `image` failed to load: "<where>: image <image>: <reason>". Given one text (torch
    re-raising it from a dataloader worker), DataError reads the fields back from the worker's traceback."""

    def __init__(self, where: str, image: str | None = None, reason: str = ""):
        if image is None:
            super().__init__(where)
            image, _, reason = self.problem.removeprefix("image ").partition(": ")
        else:
            super().__init__(where, f"image {image}: {reason}")
        self.image = image
        self.reason = reason
