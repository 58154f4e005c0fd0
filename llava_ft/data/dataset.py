"""The training dataset: prepared samples read from memory-mapped Arrow tables (see prepare.py), images lazily."""

from __future__ import annotations

import bisect
import logging
from pathlib import Path

import datasets
import numpy as np
import torch
from torch.utils.data import Dataset

from llava_ft.config import DataSection
from llava_ft.data.conversation import IMAGE_TOKEN_INDEX, DataError
from llava_ft.data.tokenize import EncodeStats

log = logging.getLogger("llava_ft")


class SFTDataset(Dataset):
    """Samples of one or more prepared files, in order. Nothing is copied into Python lists: rows are read
    from the Arrow tables on demand, image spans expanded to `num_image_tokens` placeholder ids."""

    def __init__(
        self,
        parts: list[tuple[datasets.Dataset, str | Path]],
        *,
        num_image_tokens: int,
        image_processor=None,
    ):
        """`parts`: (prepared table, folder its image paths are relative to) per source file."""
        self.tables = [
            table.with_format("numpy", columns=["input_ids", "labels", "images"]) for table, _ in parts
        ]
        self.folders = [Path(folder) for _, folder in parts]
        self.starts = np.cumsum([0] + [len(t) for t in self.tables]).tolist()
        self.num_image_tokens = num_image_tokens
        self.image_processor = image_processor
        self._lengths = [n for table, _ in parts for n in table.data.column("length").to_numpy().tolist()]

    def __len__(self) -> int:
        return self.starts[-1]

    @property
    def lengths(self) -> list[int]:
        """Full sample lengths (image tokens included), known without reading a sample."""
        return self._lengths

    def _row(self, i: int) -> tuple[int, dict]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        part = bisect.bisect_right(self.starts, i) - 1
        return part, self.tables[part][i - self.starts[part]]

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample i's input_ids and labels (int64), image spans expanded; no image is read."""
        return self._expand(self._row(i)[1])

    def _expand(self, row: dict) -> tuple[np.ndarray, np.ndarray]:
        ids, labels = row["input_ids"].astype(np.int64), row["labels"].astype(np.int64)
        repeats = np.where(ids == IMAGE_TOKEN_INDEX, self.num_image_tokens, 1)
        return np.repeat(ids, repeats), np.repeat(labels, repeats)

    def __getitem__(self, i: int) -> dict:
        part, row = self._row(i)
        ids, labels = self._expand(row)
        item = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
        if len(row["images"]):
            from llava_ft.data.images import load_image

            paths = [self.folders[part] / p for p in row["images"]]
            if self.image_processor is None:
                raise DataError(str(paths[0]), "sample has images but the model has no vision tower")
            item["pixel_values"] = torch.stack([self.image_processor(load_image(p)) for p in paths])
        return item


def build_dataset(
    data: DataSection, tokenizer, template, *, num_image_tokens: int, image_processor=None
) -> tuple[SFTDataset, EncodeStats]:
    """Prepare (or load from the cache) every source, report counts. Returns (SFTDataset, EncodeStats)."""
    from llava_ft.data.prepare import prepare
    from llava_ft.data.tokenize import Encoder

    encoder = Encoder(
        tokenizer,
        template,
        max_length=data.max_length,
        num_image_tokens=num_image_tokens,
        last_turn_only=data.last_turn_only,
    )
    cache_dir, num_proc = data.cache_dir, data.num_proc
    parts = []
    total = EncodeStats()
    for src in data.train:
        prepared = prepare(
            src.path,
            encoder,
            fmt=src.format,
            skip_bad=data.skip_bad,
            num_proc=num_proc,
            cache_dir=cache_dir,
            use_cache=data.cache,
        )
        if prepared.bad:
            log.warning("%s", prepared.bad.summary())
        log.info("%s (%s, %.1f s): %s", src.path, prepared.cache, prepared.seconds, prepared.stats.summary())
        folder = Path(src.image_folder) if src.image_folder else Path(src.path).parent
        parts.append((prepared.dataset, folder))
        total.merge(prepared.stats)
    dataset = SFTDataset(parts, num_image_tokens=num_image_tokens, image_processor=image_processor)
    if not len(dataset):
        raise DataError(", ".join(s.path for s in data.train) or "data.train", "no training samples")
    return dataset, total
