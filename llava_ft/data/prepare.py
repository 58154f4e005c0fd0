"""Prepared data: one file of records -> token ids + labels in an Arrow file, cached by content.

The one path shared by `llava-ft data prepare` and training: read (sources) -> Conversation -> template ->
token ids + labels (`<image>` expanded, truncation and drops counted, the segment-vs-whole check) -> Arrow.

Speed: on fast tokenizers a batch of records goes through the tokenizer's Rust backend in one call, each
record's text tokenized once, as a whole, with offsets (what the model sees; `Encoder` keeps these ids too).
A token is trained iff its characters come from a trained segment. That is `Encoder.encode`'s result whenever
every token lies inside one segment, which the offsets show (the segment-vs-whole check); every other record
(a token crossing a trained/untrained boundary, a record to truncate or drop) and every record of a slow
tokenizer goes through `Encoder.encode` itself, so the output is exactly `Encoder`'s.

Storage: one IMAGE_TOKEN_INDEX per image (expanded when read), `length` the full length, images as written
in the record. The cache entry is a folder named by the key (data file content, format, template, tokenizer,
max_length, image tokens, options, this code's source); it is built under a temporary name and renamed when
complete, and its checksum is verified before it is loaded, so a half-written or damaged entry is rebuilt.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from llava_ft.data.conversation import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX, Conversation, DataError
from llava_ft.data.sources import BadRecords, iter_conversations
from llava_ft.data.tokenize import DroppedSample, Encoder, EncodeStats, TokenizationMismatch, TokenizedSample

log = logging.getLogger("llava_ft")

FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "length": datasets.Value("int32"),
        "images": datasets.List(datasets.Value("string")),
        "source": datasets.Value("string"),
    }
)
_CODE_FILES = ("prepare.py", "tokenize.py", "templates.py", "sources.py", "conversation.py")
BATCH_SIZE = 256


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llava_ft" / "prepared"


@dataclass
class Prepared:
    dataset: datasets.Dataset
    """Columns input_ids, labels (images compact), length (full), images, source; memory-mapped."""
    stats: EncodeStats
    bad: BadRecords
    cache: str
    """"hit", "built" (and stored) or "off"."""
    seconds: float
    key: str


# ---------------------------------------------------------------- batched encoding


@dataclass
class _Batch:
    """One batch's output as flat arrays (cheap to pickle between processes)."""

    ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    images: list[list[str]]
    sources: list[str]
    stats: EncodeStats
    error: tuple[str, str, str] | None = None
    """(kind, where, problem) of the first bad record when not skipping them: the caller raises it."""


class BatchEncoder:
    """`Encoder.encode` over many conversations at once, with the same result (see the module docstring)."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder
        tok = encoder.tokenizer
        # Without the whole-text check, Encoder keeps segment-wise ids: only Encoder itself gives those.
        fast = getattr(tok, "is_fast", False) and encoder.check
        self.backend = tok.backend_tokenizer if fast else None
        if self.backend is not None:
            # As transformers' own __call__ sets them: no truncation or padding, specials per the tokenizer.
            self.backend.no_truncation()
            self.backend.no_padding()
            self.backend.encode_special_tokens = bool(getattr(tok, "split_special_tokens", False))

    def encode_batch(self, convs: list[Conversation], skip_bad: bool) -> _Batch:
        rendered, texts_to_tokenize = [], []
        for conv in convs:
            try:
                segments, text = self.encoder.render(conv)
            except DataError as err:
                rendered.append(err)
                continue
            chunks = text.split(IMAGE_TOKEN)
            rendered.append((segments, text, chunks, len(texts_to_tokenize)))
            texts_to_tokenize += [c for c in chunks if c]
        encodings = (
            self.backend.encode_batch(texts_to_tokenize, add_special_tokens=False)
            if self.backend is not None and texts_to_tokenize
            else []
        )

        out = _Columns()
        stats = EncodeStats()
        for conv, item in zip(convs, rendered):
            stats.records += 1
            try:
                if isinstance(item, DataError):
                    raise item
                fast = self._fast(item, encodings) if self.backend is not None else None
                if fast is None:
                    sample = self.encoder.encode(conv)
                    stats.add(sample)
                    ids, labels = self._compact(sample)
                    out.add(ids, labels, len(sample.input_ids), conv)
                else:
                    ids, labels, n_trained = fast
                    n_img = len(item[2]) - 1  # image markers between the text chunks
                    length = len(ids) + n_img * (self.encoder.num_image_tokens - 1)
                    stats.kept += 1
                    stats.total_tokens += length
                    stats.supervised_tokens += n_trained
                    stats.image_tokens += n_img * self.encoder.num_image_tokens
                    out.add(ids, labels, length, conv)
            except DroppedSample as err:
                stats.dropped[err.reason] += 1
                stats.problems.append((err.where, err.problem))
            except DataError as err:
                if not skip_bad:
                    return out.finish(stats, (type(err).__name__, err.where, err.problem))
                if isinstance(err, TokenizationMismatch):
                    stats.mismatched += 1
                else:
                    stats.failed += 1
                stats.problems.append((err.where, err.problem))
        return out.finish(stats)

    def _fast(self, item: tuple, encodings: list) -> tuple[list[int], list[int], int] | None:
        """Compact ids + labels from the whole-text encoding, or None where `Encoder.encode` must decide.

        Only tokens at segment boundaries need a look: a boundary is clean when the tokens before it end at
        or before it and the tokens after it start at or after it, with no trimmed gap around it (a gap's
        characters belong to a neighbour that the offsets do not show)."""
        segments, text, chunks, k = item
        seg_starts, flags, pos = [], [], 0
        for seg in segments:
            seg_starts.append(pos)
            flags.append(seg.trainable)
            pos += len(seg.text)
        ids_out: list[int] = []
        labels_out: list[int] = []
        n_trained = 0
        start, b = 0, 0  # b: the segment in force at `start`
        for j, chunk in enumerate(chunks):
            if j:
                ids_out.append(IMAGE_TOKEN_INDEX)
                labels_out.append(IGNORE_INDEX)
            end = start + len(chunk)
            if chunk:
                enc = encodings[k]
                k += 1
                ids, offsets = enc.ids, enc.offsets
                if offsets and offsets[-1][0] >= len(chunk):  # an empty token at the very end
                    return None
                while b + 1 < len(seg_starts) and seg_starts[b + 1] <= start:
                    b += 1
                cut, token_starts = 0, None
                while True:
                    inside = b + 1 < len(seg_starts) and seg_starts[b + 1] < end
                    if inside:
                        c = seg_starts[b + 1] - start
                        if token_starts is None:
                            token_starts = [s for s, _ in offsets]
                        i = bisect.bisect_left(token_starts, c)
                        left_end = offsets[i - 1][1] if i else 0
                        right_start = token_starts[i] if i < len(ids) else len(chunk)
                        if left_end > c or left_end < c < right_start:  # crosses the boundary, or a gap does
                            return None
                    else:
                        i = len(ids)
                    piece = ids[cut:i]
                    ids_out += piece
                    if flags[b]:
                        labels_out += piece
                        n_trained += len(piece)
                    else:
                        labels_out += [IGNORE_INDEX] * len(piece)
                    if not inside:
                        break
                    cut, b = i, b + 1
            start = end + len(IMAGE_TOKEN)
        full = len(ids_out) + (len(chunks) - 1) * (self.encoder.num_image_tokens - 1)
        too_long = self.encoder.max_length is not None and full > self.encoder.max_length
        if n_trained == 0 or too_long:  # drops and truncation: Encoder.encode's rules and messages
            return None
        return ids_out, labels_out, n_trained

    def _compact(self, sample: TokenizedSample) -> tuple[list[int], list[int]]:
        """One IMAGE_TOKEN_INDEX per image span (spans are never cut, so each holds num_image_tokens)."""
        ids = np.array(sample.input_ids, dtype=np.int64)
        labels = np.array(sample.labels, dtype=np.int64)
        is_image = ids == IMAGE_TOKEN_INDEX
        if not is_image.any():
            return sample.input_ids, sample.labels
        keep = ~is_image | ((np.cumsum(is_image) - 1) % self.encoder.num_image_tokens == 0)
        return ids[keep].tolist(), labels[keep].tolist()


class _Columns:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.offsets: list[int] = [0]
        self.lengths: list[int] = []
        self.images: list[list[str]] = []
        self.sources: list[str] = []

    def add(self, ids: list[int], labels: list[int], length: int, conv: Conversation) -> None:
        self.ids += ids
        self.labels += labels
        self.offsets.append(len(self.ids))
        self.lengths.append(length)
        self.images.append(list(conv.images))
        self.sources.append(conv.source or "")

    def finish(self, stats: EncodeStats, error: tuple[str, str, str] | None = None) -> _Batch:
        return _Batch(np.array(self.ids, np.int32), np.array(self.labels, np.int32), np.array(self.offsets, np.int32),
                      np.array(self.lengths, np.int32), self.images, self.sources, stats, error)  # fmt: skip


def _arrow(batch: _Batch) -> pa.Table:
    offsets = pa.array(batch.offsets)
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(batch.ids)),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(batch.labels)),
            "length": pa.array(batch.lengths),
            "images": pa.array(batch.images, type=pa.list_(pa.string())),
            "source": pa.array(batch.sources, type=pa.string()),
        },
        schema=FEATURES.arrow_schema,
    )


# ---------------------------------------------------------------- processes

_worker: BatchEncoder | None = None


def _init_worker(encoder: Encoder) -> None:
    global _worker
    _worker = BatchEncoder(encoder)


def _work(convs: list[Conversation], skip_bad: bool) -> _Batch:
    assert _worker is not None
    return _worker.encode_batch(convs, skip_bad)


def _batches(convs: Iterator[Conversation], size: int) -> Iterator[list[Conversation]]:
    while batch := list(islice(convs, size)):
        yield batch


def encode_file(
    path: str | Path,
    encoder: Encoder,
    bad: BadRecords,
    *,
    fmt: str = "auto",
    skip_bad: bool = False,
    num_proc: int = 1,
    progress: bool = False,
) -> Iterator[_Batch]:
    """Encoded batches in record order, whatever num_proc; records unreadable under `skip_bad` go to `bad`."""
    from tqdm.auto import tqdm

    batches = _batches(iter_conversations(path, fmt, skip_bad=skip_bad, bad=bad), BATCH_SIZE)
    bar = tqdm(desc=f"preparing {Path(path).name}", unit=" rec", disable=not progress, mininterval=1.0)
    with bar:
        if num_proc <= 1:
            local = BatchEncoder(encoder)
            for convs in batches:
                bar.update(len(convs))
                yield local.encode_batch(convs, skip_bad)
            return
        import multiprocessing as mp

        # fork: workers inherit the loaded tokenizer; a bounded window of pending batches keeps memory flat.
        ctx = mp.get_context("fork")
        with ctx.Pool(num_proc, initializer=_init_worker, initargs=(encoder,)) as pool:
            pending: deque = deque()
            for convs in batches:
                pending.append((len(convs), pool.apply_async(_work, (convs, skip_bad))))
                if len(pending) >= 4 * num_proc:
                    n, result = pending.popleft()
                    bar.update(n)
                    yield result.get()
            while pending:
                n, result = pending.popleft()
                bar.update(n)
                yield result.get()


# ---------------------------------------------------------------- cache


def code_version() -> str:
    here = Path(__file__).parent
    h = hashlib.blake2b(digest_size=16)
    for name in _CODE_FILES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Everything about the tokenizer that can change ids: vocabulary, merges, normalizer, added tokens."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(tokenizer).__name__.encode())
    if getattr(tokenizer, "is_fast", False):
        h.update(tokenizer.backend_tokenizer.to_str().encode())
    elif hasattr(tokenizer, "sp_model"):
        h.update(tokenizer.sp_model.serialized_model_proto())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = [tokenizer.bos_token, tokenizer.eos_token, getattr(tokenizer, "chat_template", None),
             getattr(tokenizer, "split_special_tokens", False),
             sorted((i, str(t)) for i, t in tokenizer.added_tokens_decoder.items())]  # fmt: skip
    h.update(json.dumps(extra, default=str).encode())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def cache_key_parts(path: str | Path, encoder: Encoder, fmt: str, skip_bad: bool) -> dict:
    return {
        "data": _file_digest(Path(path)),
        "format": fmt,
        "template": encoder.template.name,
        "tokenizer": tokenizer_fingerprint(encoder.tokenizer),
        "max_length": encoder.max_length,
        "num_image_tokens": encoder.num_image_tokens,
        "last_turn_only": encoder.last_turn_only,
        "check": encoder.check,
        "skip_bad": skip_bad,
        "code": code_version(),
    }


def _key(parts: dict) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


def _load_entry(folder: Path, key: str) -> tuple[datasets.Dataset, EncodeStats, BadRecords] | None:
    """The cached entry, or None (after saying why) when it is missing, incomplete or damaged."""
    meta_file, arrow_file = folder / "meta.json", folder / "data.arrow"
    if not folder.exists():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        problem = None
        if meta.get("key") != key:
            problem = "key differs"
        elif (
            arrow_file.stat().st_size != meta["arrow_bytes"]
            or _file_digest(arrow_file) != meta["arrow_digest"]
        ):
            problem = "data.arrow does not match its checksum"
    except (OSError, ValueError, KeyError) as e:
        problem = f"unreadable ({e})"
    if problem:
        log.warning("prepared-data cache %s is incomplete or damaged (%s): rebuilding it", folder, problem)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    dataset = datasets.Dataset.from_file(str(arrow_file))
    return dataset, _stats_from_dict(meta["stats"]), BadRecords([tuple(x) for x in meta["bad"]])


def _stats_from_dict(d: dict) -> EncodeStats:
    d = dict(d)
    d.pop("num_problems", None)
    d["dropped"] = Counter(d["dropped"])
    d["problems"] = [tuple(p) for p in d["problems"]]
    return EncodeStats(**d)


# ---------------------------------------------------------------- entry point


def prepare(
    path: str | Path,
    encoder: Encoder,
    *,
    fmt: str = "auto",
    skip_bad: bool = False,
    num_proc: int = 1,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> Prepared:
    """Prepared data of one file: loaded from the cache when its key matches, else encoded (and stored).

    Bad records raise `DataError` unless `skip_bad` (then counted, as in `encode_all`); drops are counted.
    """
    started = time.perf_counter()
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "data file not found")
    parts = cache_key_parts(path, encoder, fmt, skip_bad)
    key = _key(parts)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / key
    if use_cache and (hit := _load_entry(final, key)) is not None:
        dataset, stats, bad = hit
        return Prepared(dataset, stats, bad, "hit", time.perf_counter() - started, key)

    if use_cache:
        root.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name next to the entry, so a killed run leaves nothing that looks complete.
    work = Path(tempfile.mkdtemp(prefix=f".{key}.partial-", dir=root if use_cache else None))
    try:
        stats, bad = _build(path, encoder, work / "data.arrow", fmt, skip_bad, num_proc, progress)
        if not use_cache:
            dataset = datasets.Dataset.from_file(str(work / "data.arrow"), in_memory=True)
            return Prepared(dataset, stats, bad, "off", time.perf_counter() - started, key)
        arrow_file = work / "data.arrow"
        meta = {"key": key, "parts": parts, "source": str(path), "arrow_bytes": arrow_file.stat().st_size,
                "arrow_digest": _file_digest(arrow_file), "stats": stats.as_dict(max_problems=len(stats.problems)),
                "bad": bad.items}  # fmt: skip
        (work / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(work, final)  # atomic: an entry is either complete or absent
        except OSError:  # another run finished the same entry first
            if _load_entry(final, key) is None:
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    loaded = _load_entry(final, key)
    assert loaded is not None
    return Prepared(loaded[0], stats, bad, "built", time.perf_counter() - started, key)


def _build(
    path: Path, encoder: Encoder, out: Path, fmt: str, skip_bad: bool, num_proc: int, progress: bool
) -> tuple[EncodeStats, BadRecords]:
    stats = EncodeStats()
    bad = BadRecords()
    writer = datasets.arrow_writer.ArrowWriter(features=FEATURES, path=str(out))
    try:
        for batch in encode_file(path, encoder, bad, fmt=fmt, skip_bad=skip_bad, num_proc=num_proc,
                                 progress=progress):  # fmt: skip
            stats.merge(batch.stats)
            if batch.error is not None:
                kind, where, problem = batch.error
                raise (TokenizationMismatch if kind == TokenizationMismatch.__name__ else DataError)(
                    where, problem
                )
            writer.write_table(_arrow(batch))
    finally:
        writer.finalize()
    return stats, bad


def compact_tokens(dataset: datasets.Dataset) -> int:
    """Stored tokens: text tokens plus one per image (how XTuner counts an image)."""
    return int(pa.compute.sum(pa.compute.list_value_length(dataset.data.column("input_ids"))).as_py() or 0)


def throughput_line(records: int, tokens: int, seconds: float) -> str:
    rate = (lambda n: n / seconds) if seconds > 0 else (lambda n: float("inf"))
    return (
        f"{records} records in {seconds:.2f} s: {rate(records):,.0f} records/s, {rate(tokens):,.0f} tokens/s "
        f"(text tokens, an image counted once)"
    )
