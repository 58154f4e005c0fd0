"""SFTDataset = sources . template . tokenize (+ image tensors), shared by every stage."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from llava_ft.config import DataSection
from llava_ft.data.conversation import DataError

log = logging.getLogger("llava_ft")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    images: list[Path]
    """Resolved image files, one per image span in input_ids."""


class SFTDataset(Dataset):
    """Tokenized examples; images are read and preprocessed lazily in __getitem__."""

    def __init__(self, examples: list[Example], image_processor=None):
        self.examples = examples
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> list[int]:
        return [len(e.input_ids) for e in self.examples]

    def __getitem__(self, i: int) -> dict:
        from llava_ft.data.images import load_image

        ex = self.examples[i]
        item = {"input_ids": torch.tensor(ex.input_ids), "labels": torch.tensor(ex.labels)}
        if ex.images:
            if self.image_processor is None:
                raise DataError(str(ex.images[0]), "sample has images but the model has no vision tower")
            item["pixel_values"] = torch.stack([self.image_processor(load_image(p)) for p in ex.images])
        return item


def build_dataset(data: DataSection, tokenizer, template, *, num_image_tokens: int, image_processor=None):
    """Read every source, encode, report counts. Returns (SFTDataset, EncodeStats)."""
    from llava_ft.data.sources import read_conversations
    from llava_ft.data.tokenize import Encoder, EncodeStats, encode_all

    encoder = Encoder(
        tokenizer,
        template,
        max_length=data.max_length,
        num_image_tokens=num_image_tokens,
        last_turn_only=data.last_turn_only,
    )
    examples: list[Example] = []
    total = EncodeStats()
    for src in data.train:
        convs, bad = read_conversations(src.path, src.format, skip_bad=data.skip_bad)
        if bad:
            log.warning("%s", bad.summary())
        samples, stats = encode_all(convs, encoder, skip_bad=data.skip_bad, keep_convs=True)
        folder = Path(src.image_folder) if src.image_folder else Path(src.path).parent
        for conv, sample in samples:
            images = [folder / p for p in conv.images]
            examples.append(Example(sample.input_ids, sample.labels, images))
        log.info("%s: %s", src.path, stats.summary())
        total.merge(stats)
    if not examples:
        raise DataError(", ".join(s.path for s in data.train) or "data.train", "no training samples")
    return SFTDataset(examples, image_processor), total
