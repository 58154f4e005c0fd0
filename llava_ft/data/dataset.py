"""The training dataset: prepared samples read from memory-mapped Arrow tables (see prepare.py), images lazily."""

from __future__ import annotations

import bisect
import itertools
import logging
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import torch
from torch.utils.data import Dataset

from llava_ft.config import DataSection
from llava_ft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_ft.data.anyres import ImageTokens, image_token_count
from llava_ft.data.conversation import DataError
from llava_ft.data.faults import IMAGE_FAULTS, Fault, ImageFault
from llava_ft.data.image_check import ImageCheck, check_images
from llava_ft.data.images import bad_image_problem, load_image
from llava_ft.data.prepare import prepare
from llava_ft.data.sources import effective_format
from llava_ft.data.tokenize import Encoder, EncodeStats

log = logging.getLogger("llava_ft")


class SFTDataset(Dataset):
    """Samples of one or more prepared files, in order. Nothing is copied into Python lists: rows are read
    from the Arrow tables on demand, each image span expanded to the placeholder ids stored for it. With an
    any-resolution processor (`anyres` set) an item's pixel_values hold every view of every image and
    `image_sizes` each image's (height, width)."""

    def __init__(
        self,
        parts: list[tuple[datasets.Dataset, str | Path]],
        *,
        image_processor=None,
        skip_bad: bool = False,
    ):
        """`parts`: (prepared table, folder its image paths are relative to) per source file. `skip_bad`: a
        sample whose image fails to load is replaced (see `__getitem__`) rather than raised as `ImageFault`."""
        self.tables = [
            table.with_format("numpy", columns=["input_ids", "labels", "images", "image_tokens", "source"])
            for table, _ in parts
        ]
        self.folders = [Path(folder) for _, folder in parts]
        self.starts = np.cumsum([0] + [len(t) for t in self.tables]).tolist()
        self.image_processor = image_processor
        self.skip_bad = skip_bad
        self._lengths = [n for table, _ in parts for n in table_column(table, "length").to_numpy().tolist()]

    def __len__(self) -> int:
        return self.starts[-1]

    @property
    def lengths(self) -> list[int]:
        """Full sample lengths (image tokens included), known without reading a sample."""
        return self._lengths

    def image_token_totals(self) -> list[int]:
        """Per sample, the image tokens of all its images (read from the tables, no image opened)."""
        totals: list[int] = []
        for table in self.tables:
            column = table_column(table, "image_tokens")
            owner = pa.compute.list_parent_indices(column).to_numpy()
            flat = pa.compute.list_flatten(column).cast(pa.int64()).to_numpy(zero_copy_only=False)
            totals += np.bincount(owner, weights=flat, minlength=len(column)).astype(np.int64).tolist()
        return totals

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
        repeats = np.ones(len(ids), dtype=np.int64)
        repeats[ids == IMAGE_TOKEN_INDEX] = row["image_tokens"]
        return np.repeat(ids, repeats), np.repeat(labels, repeats)

    def __getitem__(self, i: int) -> dict:
        """Sample i with its images. An image that fails to load (changed or removed since the data was checked)
        raises `ImageFault`, or under skip_bad the sample is replaced: by the next one (wrapping) whose images
        load, one of the same length first (packed rows and length-grouped batches stay as planned). That is a
        function of i alone, so a resumed run trains what an uninterrupted one did. The item names the
        replacement under `IMAGE_FAULTS`. A few tries only: a vanished image folder stops the run instead of
        training on text alone."""
        try:
            return self._item(i)
        except ImageFault as fault:
            if not self.skip_bad:
                raise
            n, length = len(self), self._lengths[i]
            ring = [(i + k) % n for k in range(1, n)]
            same = (j for j in ring if self._lengths[j] == length)
            other = (j for j in ring if self._lengths[j] != length)
            for j in itertools.islice(itertools.chain(same, other), REPLACEMENT_TRIES):
                try:
                    item = self._item(j)
                except ImageFault:
                    continue
                replaced_by = str(self._row(j)[1]["source"])
                fault_named = Fault(
                    record=fault.where, image=fault.image, problem=fault.reason, replaced_by=replaced_by
                )
                item[IMAGE_FAULTS] = [fault_named]
                return item
            tried = min(REPLACEMENT_TRIES, n - 1)
            raise ImageFault(
                fault.where,
                fault.image,
                f"{fault.reason}; no replacement: the {tried} samples tried fail too",
            ) from fault

    def _item(self, i: int) -> dict:
        part, row = self._row(i)
        ids, labels = self._expand(row)
        item = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
        if len(row["images"]):
            source = str(row["source"])  # "file:line": the record to fix, not only the image
            if self.image_processor is None:
                raise DataError(source, "sample has images but the model has no vision tower")
            anyres = getattr(self.image_processor, "anyres", False)
            pixels, sizes = [], []
            for name, stored in zip(row["images"], row["image_tokens"].tolist(), strict=True):
                path = self.folders[part] / name
                try:
                    image = load_image(path)
                except DataError as err:
                    raise ImageFault(source, str(path), err.problem) from err
                if anyres:
                    height, width = image.height, image.width
                    if (count := image_token_count(self.image_processor.geometry, height, width)) != stored:
                        raise ImageFault(
                            source,
                            str(path),
                            f"image is {width}x{height} now ({count} tokens) but was prepared as {stored} "
                            "tokens: changed since the data was prepared (prepare it again: remove its cache "
                            "entry or set data.cache false)",
                        )
                    sizes.append((height, width))
                pixels.append(self.image_processor(image))
            if anyres:  # every view of every image, in order; the model splits them by image_sizes
                item["pixel_values"] = torch.cat(pixels)
                item["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
            else:
                item["pixel_values"] = torch.stack(pixels)
        return item


# Samples tried in a failed one's place under skip_bad (see SFTDataset.__getitem__).
REPLACEMENT_TRIES = 64


def table_column(table: datasets.Dataset, name: str) -> pa.ChunkedArray:
    """A column in the table's row order (a table filtered by `select` included), without gathering the other
    columns."""
    return table.select_columns([name]).with_format("arrow")[:][name]


def drop_bad_images(
    table: datasets.Dataset,
    folder: Path,
    stats: EncodeStats,
    *,
    skip_bad: bool,
    num_proc: int | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> tuple[datasets.Dataset, ImageCheck]:
    """The rows whose images are all readable (`check_images`: every file opened and decoded once, verdicts
    cached), so that a bad image stops the run before the model is built rather than at the step that first
    draws it. A missing or unreadable image makes its record bad: raised naming the record and the image, or
    under `skip_bad` the row is left out (an indices mapping; the table stays mapped) and counted by
    `stats.unkeep`. Returns the rows and the check's counts."""
    column = table.data.column("images")
    flat = pa.compute.list_flatten(column).to_pylist()  # the path column only: nothing else leaves Arrow
    check = check_images(
        folder, flat, num_proc=num_proc, cache_dir=cache_dir, use_cache=use_cache, progress=progress
    )
    if not check.problems:
        return table, check
    owner = pa.compute.list_parent_indices(column).to_numpy()
    bad: dict[int, list[tuple[str, str]]] = {}  # row -> its bad images with their problems, in order
    for j in np.flatnonzero(np.fromiter((p in check.problems for p in flat), bool, len(flat))):
        bad.setdefault(int(owner[j]), []).append((flat[j], check.problems[flat[j]]))
    rows = sorted(bad)
    sources = table.data.column("source").take(pa.array(rows)).to_pylist()

    if not skip_bad:
        others = f"; {len(rows) - 1} more record(s) with bad images" if len(rows) > 1 else ""
        raise DataError(sources[0], f"{bad_image_problem(bad[rows[0]])}{others} (data.skip_bad skips them)")
    removed = table.data.table.select(["length", "labels", "image_tokens"]).take(pa.array(rows))
    labels = pa.compute.list_flatten(removed.column("labels"))
    stats.unkeep(
        [(source, bad_image_problem(bad[row])) for source, row in zip(sources, rows)],
        total=int(pa.compute.sum(removed.column("length")).as_py()),
        supervised=int(pa.compute.sum(pa.compute.not_equal(labels, IGNORE_INDEX)).as_py() or 0),
        image=removed.column("image_tokens").to_pylist(),
    )
    return table.select(np.setdiff1d(np.arange(len(table)), rows)), check


def data_encoder(data: DataSection, tokenizer, template, image_tokens: ImageTokens):
    """The Encoder a data section trains with (also `llava-ft data ... --config`, so both key the same cache). Plain
    text sources alone never render the chat template: its markers need not suit the tokenizer then (the default
    internlm2_chat on a Llama tokenizer, say)."""
    return Encoder(
        tokenizer,
        template,
        max_length=data.max_length,
        image_tokens=image_tokens,
        max_image_tokens=data.max_image_tokens,
        last_turn_only=data.last_turn_only,
        chat=any(effective_format(src.path, src.format) != "text" for src in data.train) or not data.train,
    )


def build_dataset(
    data: DataSection, tokenizer, template, *, image_tokens: ImageTokens, image_processor=None
) -> tuple[SFTDataset, EncodeStats]:
    """Prepare (or load from the cache) every source, report counts. Returns (SFTDataset, EncodeStats)."""
    encoder = data_encoder(data, tokenizer, template, image_tokens)
    cache_dir, num_proc = data.cache_dir, data.num_proc
    parts = []
    total = EncodeStats()
    for src in data.train:
        folder = Path(src.image_folder) if src.image_folder else Path(src.path).parent
        prepared = prepare(
            src.path,
            encoder,
            fmt=src.format,
            skip_bad=data.skip_bad,
            num_proc=num_proc,
            cache_dir=cache_dir,
            use_cache=data.cache,
            image_folder=folder,
        )
        if prepared.bad:
            log.warning("%s", prepared.bad.summary())
        # Records skipped at reading are counted in the run's totals (summary.json), not only in that warning.
        stats = EncodeStats().merge(prepared.stats).add_bad(prepared.bad)
        # After the cache too: images can go missing or change after the data was prepared.
        table, check = drop_bad_images(
            prepared.dataset,
            folder,
            stats,
            skip_bad=data.skip_bad,
            num_proc=num_proc,
            cache_dir=cache_dir,
            use_cache=data.cache,
        )
        if check.images:
            log.info("%s: %s", src.path, check.summary())
        if stats.skipped > len(prepared.bad):
            log.warning(
                "%s: %d record(s) skipped: image missing or unreadable",
                src.path,
                stats.skipped - len(prepared.bad),
            )
        log.info("%s (%s, %.1f s): %s", src.path, prepared.cache, prepared.seconds, stats.summary())
        if encoder.anyres:
            for line in stats.image_token_lines():
                log.info("%s: %s", src.path, line)
        parts.append((table, folder))
        total.merge(stats)
    dataset = SFTDataset(parts, image_processor=image_processor, skip_bad=data.skip_bad)
    if not len(dataset):
        raise DataError(", ".join(s.path for s in data.train) or "data.train", "no training samples")
    return dataset, total
