"""Batch collation: padded batches (`Collator`) and packed rows (`PackedCollator`).

Items are encoder outputs: {"input_ids", "labels" (unshifted, IGNORE_INDEX where not trained),
"pixel_values": Tensor[n_img, 3, H, W] | None}; with any-resolution images also "image_sizes" (LongTensor
[n_img, 2], height and width) and pixel_values holding every view of every image. Image positions in input_ids
hold IMAGE_TOKEN_INDEX. Both collators return `pixel_values` (every image of the batch, in row order, then
sample order; absent when the batch has none), `image_sizes` likewise (absent without any-resolution images)
and `image_counts` (LongTensor, images per batch row). Samples replaced because an image failed to load
(data.skip_bad) are named under `IMAGE_FAULTS` in the item and in the batch (absent when none was).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llava_ft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_ft.data.conversation import DataError
from llava_ft.data.faults import IMAGE_FAULTS

Item = dict[str, Any]


def _as_list(x: Sequence[int] | torch.Tensor) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


@dataclass
class _Images:
    """One sample's images: its pixel_values and, with any-resolution images, their sizes."""

    pixels: torch.Tensor
    sizes: torch.Tensor | None

    @property
    def count(self) -> int:
        return self.pixels.shape[0] if self.sizes is None else self.sizes.shape[0]


def _checked(item: Item, where: str) -> tuple[list[int], list[int], _Images | None]:
    ids, labels = _as_list(item["input_ids"]), _as_list(item["labels"])
    if len(ids) != len(labels):
        raise DataError(where, f"{len(ids)} input_ids but {len(labels)} labels")
    if not ids:
        raise DataError(where, "empty input_ids")
    pixels = item.get("pixel_values")
    if pixels is not None and pixels.ndim != 4:
        raise DataError(where, f"pixel_values must be [n_img, 3, H, W], got shape {tuple(pixels.shape)}")
    has_image_tokens = IMAGE_TOKEN_INDEX in ids
    has_images = pixels is not None and pixels.shape[0] > 0
    if has_image_tokens != has_images:
        what = "image tokens but no pixel_values" if has_image_tokens else "pixel_values but no image tokens"
        raise DataError(where, f"has {what}")
    if not has_images:
        return ids, labels, None
    sizes = item.get("image_sizes")
    if sizes is not None and (
        sizes.ndim != 2 or sizes.shape[1] != 2 or not 0 < sizes.shape[0] <= pixels.shape[0]
    ):
        raise DataError(
            where,
            f"image_sizes must be [n_img, 2] for the {pixels.shape[0]} views of pixel_values, got shape "
            f"{tuple(sizes.shape)}",
        )
    return ids, labels, _Images(pixels, sizes)


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def _stack_images(images: list[_Images], where: str) -> dict[str, torch.Tensor]:
    if not images:
        return {}
    shapes = {tuple(x.pixels.shape[1:]) for x in images}
    if len(shapes) > 1:
        raise DataError(where, f"images of different shapes cannot share a batch: {sorted(shapes)}")
    anyres = {x.sizes is not None for x in images}
    if len(anyres) > 1:
        raise DataError(
            where, "samples with and without image_sizes (any-resolution images) cannot share a batch"
        )
    out = {"pixel_values": torch.cat([x.pixels for x in images])}
    if anyres == {True}:
        out["image_sizes"] = torch.cat([x.sizes for x in images]).long()
    return out


def _faults(items: Sequence[Item]) -> dict[str, list]:
    """The replacements named by the items, carried to the trainer (which pops them before the model runs)."""
    faults = [fault for item in items for fault in item.get(IMAGE_FAULTS, ())]
    return {IMAGE_FAULTS: faults} if faults else {}


@dataclass
class Collator:
    """Right-pads a list of samples into one batch with an attention mask."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    max_length: int | None = None
    """A guard, not a truncation: a longer sample raises (the tokenizer already truncates, with counts)."""

    def __call__(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        checked = [_checked(item, f"batch item {i}") for i, item in enumerate(items)]
        if self.max_length is not None:
            for i, (ids, _, _) in enumerate(checked):
                if len(ids) > self.max_length:
                    raise DataError(
                        f"batch item {i}", f"{len(ids)} tokens exceed max_length={self.max_length}"
                    )
        width = _round_up(max(len(ids) for ids, _, _ in checked), self.pad_to_multiple_of)

        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (ids, labs, _) in enumerate(checked):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(labs)
            attention_mask[row, : len(ids)] = 1

        images = [p for _, _, p in checked if p is not None]
        counts = [0 if p is None else p.count for _, _, p in checked]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            **_stack_images(images, "batch"),
            "image_counts": torch.tensor(counts, dtype=torch.long),
            **_faults(items),
        }


@dataclass
class PackedCollator:
    """Collates rows of packed samples (items of `PackedDataset`) into [R, L] tensors without attention mask.

    Per sample, position_ids restart at 0 and the first label is IGNORE_INDEX: after the causal LM's internal
    shift, the previous sample's last token would otherwise be trained to predict this sample's first token
    (as `DataCollatorWithFlattening`'s separator; that label is never a target in an unpacked batch either).
    A row shorter than L ends with a padding segment (pad ids, IGNORE_INDEX, its own positions from 0), which
    real samples cannot attend to. The model must run with `use_cache=False`, or the isolation is lost.
    """

    pad_token_id: int
    row_length: int
    """Row capacity (the packing plan's max_length), checked per row."""
    pad_to_multiple_of: int | None = None
    fixed_length: bool = False
    """Pad every row to row_length (static shapes) instead of to the longest row of the batch."""

    def __call__(self, rows: Sequence[Sequence[Item]]) -> dict[str, torch.Tensor]:
        packed: list[tuple[list[int], list[int], list[int]]] = []
        images: list[_Images] = []
        counts: list[int] = []
        for r, row in enumerate(rows):
            ids_row: list[int] = []
            labels_row: list[int] = []
            pos_row: list[int] = []
            n_images = 0
            for s, item in enumerate(row):
                ids, labels, own = _checked(item, f"batch row {r} sample {s}")
                ids_row += ids
                labels_row += [IGNORE_INDEX] + labels[1:]
                pos_row += range(len(ids))
                if own is not None:
                    images.append(own)
                    n_images += own.count
            if not ids_row:
                raise DataError(f"batch row {r}", "has no samples")
            if len(ids_row) > self.row_length:
                raise DataError(
                    f"batch row {r}", f"{len(ids_row)} tokens exceed row_length={self.row_length}"
                )
            packed.append((ids_row, labels_row, pos_row))
            counts.append(n_images)

        longest = self.row_length if self.fixed_length else max(len(ids) for ids, _, _ in packed)
        width = _round_up(longest, self.pad_to_multiple_of)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, labs, pos) in enumerate(packed):
            n = len(ids)
            input_ids[r, :n] = torch.tensor(ids)
            labels[r, :n] = torch.tensor(labs)
            position_ids[r, :n] = torch.tensor(pos)
            # The padding segment restarts at 0 too: a new segment for transformers' packed-sequence detection.
            position_ids[r, n:] = torch.arange(width - n)

        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            **_stack_images(images, "batch"),
            "image_counts": torch.tensor(counts, dtype=torch.long),
            **_faults([item for row in rows for item in row]),
        }
