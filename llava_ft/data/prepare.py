"""Prepared data: one file of records -> token ids + labels in an Arrow file, cached by content.

The path shared by `llava-ft data prepare` and training: records -> Conversation -> template -> ids + labels under
`Encoder`'s rules -> Arrow. On fast tokenizers each text is tokenized once as a whole (by chunked.py where it
reproduces the tokenizer, else one Rust call per batch); a record with a token across a trained/untrained
boundary goes to `Encoder` itself, so the output equals `encode_all`'s. With num_proc N, N forked processes take
every Nth batch of 256 records and the parent interleaves their Arrow batches and counts back in record order, so
the output does not depend on N. Images are stored as one IMAGE_TOKEN_INDEX each, with each image's token count
beside them (`length` is the full length); with any-resolution geometry the count comes from the image's size,
read from its file's header. A cache entry is a folder named by the key (data file, format, template, tokenizer,
max_length, image-token rule, options, this code), built under a temporary name and renamed when complete; its
checksum is verified before it is loaded.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
import datasets.table
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
from PIL import Image
from tqdm.auto import tqdm

from llava_ft.constants import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava_ft.data.anyres import ImageTokens
from llava_ft.data.chunked import ChunkedTokenizer, cut_tokens
from llava_ft.data.conversation import Conversation, DataError
from llava_ft.data.forked import run_forked
from llava_ft.data.images import bad_image_problem, image_problem
from llava_ft.data.sources import BadRecords, FormatReader, effective_format, iter_records
from llava_ft.data.sp_convert import fast_twin
from llava_ft.data.tokenize import CompactSample, DroppedSample, Encoder, EncodeStats, TokenizationMismatch
from llava_ft.files import make_temp_dir, sweep_leftovers

log = logging.getLogger("llava_ft")

FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "length": datasets.Value("int32"),
        "images": datasets.List(datasets.Value("string")),
        "image_tokens": datasets.List(datasets.Value("int32")),
        "source": datasets.Value("string"),
    }
)
SCHEMA = FEATURES.arrow_schema  # computed once: the property builds it anew on every call
_CODE_FILES = (
    "prepare.py",
    "anyres.py",
    "chunked.py",
    "sp_convert.py",
    "tokenize.py",
    "templates.py",
    "sources.py",
    "conversation.py",
)
BATCH_SIZE = 256


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llava_ft" / "prepared"


@dataclass
class Prepared:
    dataset: datasets.Dataset
    """Columns input_ids, labels (images compact), length (full), images, image_tokens (per image), source;
    memory-mapped."""
    stats: EncodeStats
    bad: BadRecords
    cache: str
    """"hit", "built" (and stored) or "off"."""
    seconds: float
    key: str
    """The cache key ("" with the cache off)."""
    processes: int = 0
    """Processes that tokenized (0: loaded from the cache)."""


# ---------------------------------------------------------------- batched encoding


@dataclass
class _Batch:
    """One batch of record slots, encoded: flat arrays plus counts (cheap to pickle between processes)."""

    ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    images: list[list[str]]
    image_tokens: list[list[int]]
    sources: list[str]
    stats: EncodeStats
    bad: list[tuple[str, str]]
    """Records that could not be read or converted (skip_bad), in record order."""
    error: tuple[str, str, str] | None = None
    """(kind, where, problem) of the first bad record when not skipping them: the caller raises it."""


class BatchEncoder:
    """`Encoder.encode` over many conversations at once, with the same result (see the module docstring)."""

    def __init__(self, encoder: Encoder, image_folder: str | os.PathLike | None = None):
        """`image_folder`: where the records' images are, read (headers only) when the encoder's image tokens
        depend on the image's size."""
        self.encoder = encoder
        if encoder.anyres and image_folder is None:
            raise ValueError("any-resolution image tokens need the image folder to read the images' sizes")
        self.image_folder = image_folder
        tok = encoder.tokenizer
        if not getattr(tok, "is_fast", False):
            # A slow sentencepiece tokenizer (InternLM2's) has a fast twin with its ids and offsets; Encoder stays
            # slow. A boundary that no twin token crosses is one for Encoder's prefix rule too (no merge crosses it).
            tok = fast_twin(tok) if encoder.check else None
            if tok is not None:
                log.info("%s: tokenizing through its fast twin (same ids)", type(encoder.tokenizer).__name__)
        # Without the whole-text check, Encoder keeps segment-wise ids: only Encoder itself gives those.
        fast = tok is not None and encoder.check
        self.backend = tok.backend_tokenizer if fast else None
        if self.backend is not None:
            # As transformers' own __call__ sets them: no truncation or padding, specials per the tokenizer.
            self.backend.no_truncation()
            self.backend.no_padding()
            self.backend.encode_special_tokens = bool(getattr(tok, "split_special_tokens", False))
        self.chunked = ChunkedTokenizer.of(tok) if self.backend is not None else None

    def encode_records(self, slots: list[tuple[str, Any]], reader: FormatReader, skip_bad: bool) -> _Batch:
        """Records (as `iter_records` yields them) -> conversations -> encoded, in record order; the first bad
        record stops the batch unless `skip_bad`."""
        convs, sizes, bad = [], [], []
        for where, record in slots:
            try:
                conv = reader.conversation(record, where)
                # A size that cannot be read makes a bad record, as a record that cannot be converted.
                size = image_sizes(conv, self.image_folder) if self.encoder.anyres else None
            except DataError as err:
                if not skip_bad:
                    # Records before it may hold an earlier error: encode them first.
                    batch = self.encode_batch(convs, skip_bad, sizes)
                    batch.error = batch.error or (type(err).__name__, err.where, err.problem)
                    return batch
                bad.append((err.where, err.problem))
                continue
            convs.append(conv)
            sizes.append(size)
        batch = self.encode_batch(convs, skip_bad, sizes)
        batch.bad = bad
        return batch

    def encode_batch(self, convs: list[Conversation], skip_bad: bool, sizes: list | None = None) -> _Batch:
        """`sizes`: per conversation, its images' (height, width) (needed with any-resolution geometry)."""
        sizes = sizes or [None] * len(convs)
        rendered: list = []
        texts: list[tuple[str, list[int]]] = []  # (text between images, segment boundaries inside it)
        for conv in convs:
            try:
                segments, text = self.encoder.render(conv)
            except DataError as err:
                rendered.append(err)
                continue
            layout = _layout(segments, text.split(IMAGE_TOKEN))
            rendered.append((layout, len(texts)))
            texts += [(chunk, cuts) for chunk, cuts, _ in layout if chunk]
        tokenized = self._tokenize(texts) if self.backend is not None else []

        out = _Columns()
        stats = EncodeStats()
        for conv, item, size in zip(convs, rendered, sizes):
            try:
                if isinstance(item, DataError):
                    raise item
                fast = self._whole_text(*item, tokenized) if self.backend is not None else None
                # Where a token crosses a segment boundary, Encoder decides (and may realign or refuse).
                sample = (
                    self.encoder.encode_compact(conv, size)
                    if fast is None
                    else self.encoder.finish(conv, *fast, realigned=False, image_sizes=size)
                )
            except DataError as err:
                if not skip_bad and not isinstance(err, DroppedSample):
                    return out.finish(stats, (type(err).__name__, err.where, err.problem))
                stats.add_error(err)
                continue
            stats.add(sample)
            out.add(sample, conv)
        return out.finish(stats)

    def _tokenize(
        self, texts: list[tuple[str, list[int]]]
    ) -> list[tuple[list[int], list[int | None]] | None]:
        """Per text: the whole text's ids and the token index at each segment boundary (None where a token
        spans it), or None for a text the Encoder must judge."""
        if self.chunked is not None:
            return [self.chunked.encode(text, cuts) for text, cuts in texts]
        # One call into the Rust backend for the whole batch: per-call overhead is paid once.
        encodings = self.backend.encode_batch([text for text, _ in texts], add_special_tokens=False)
        out: list = []
        for enc, (text, cuts) in zip(encodings, texts):
            at = cut_tokens(enc, len(text), cuts)
            out.append(None if at is None else (enc.ids, at))
        return out

    def _whole_text(
        self, layout: list[tuple[str, list[int], list[bool]]], k: int, tokenized: list
    ) -> tuple[list[int], list[int]] | None:
        """Compact ids and labels of the rendered text from its whole-text tokenization, a token trained iff its
        segment is; None where a token spans a segment boundary."""
        ids_out: list[int] = []
        labels: list[int] = []
        for j, (chunk, _, trained) in enumerate(layout):
            if j:
                ids_out.append(IMAGE_TOKEN_INDEX)
                labels.append(IGNORE_INDEX)
            if not chunk:
                continue
            done = tokenized[k]
            k += 1
            if done is None:
                return None
            ids, at = done
            cut = 0
            for i, flag in zip([*at, len(ids)], trained):
                if i is None:
                    return None
                labels += ids[cut:i] if flag else [IGNORE_INDEX] * (i - cut)
                cut = i
            ids_out += ids
        return ids_out, labels


def image_sizes(conv: Conversation, folder: str | os.PathLike) -> list[tuple[int, int]]:
    """Each of the conversation's images' (height, width), read from its file's header (no pixel decoded). An
    unreadable one is a `DataError` naming the record, the image and its problem (`bad_image_problem`)."""
    return [_header_size(conv.where, folder, name) for name in conv.images]


def _header_size(where: str, folder: str | os.PathLike, name: str) -> tuple[int, int]:
    path = os.path.join(folder, name)
    try:
        with Image.open(path) as img:  # lazy: the header only
            width, height = img.size
        return height, width
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        if not os.path.isfile(path):
            problem = f"file not found in {folder}"
        else:  # the full check's wording, as training's image check gives it
            problem = image_problem(path) or f"unreadable header ({type(e).__name__}: {e})"
        raise DataError(where, bad_image_problem([(name, problem)])) from e


def _layout(segments: list, chunks: list[str]) -> list[tuple[str, list[int], list[bool]]]:
    """Per text between image markers: the text, the segment boundaries strictly inside it (characters), and
    whether each stretch between them is trained (one more than the boundaries; none for an empty text)."""
    bounds, pos = [], 0  # (character where the segment starts, trainable)
    for seg in segments:
        bounds.append((pos, seg.trainable))
        pos += len(seg.text)
    bounds.append((pos + 1, False))  # sentinel past the end
    layout, start, b = [], 0, 0  # b: the segment in force at `start`
    for chunk in chunks:
        end = start + len(chunk)
        cuts: list[int] = []
        trained: list[bool] = []
        if chunk:
            while bounds[b + 1][0] <= start:
                b += 1
            while bounds[b + 1][0] < end:
                cuts.append(bounds[b + 1][0] - start)
                trained.append(bounds[b][1])
                b += 1
            trained.append(bounds[b][1])
        layout.append((chunk, cuts, trained))
        start = end + len(IMAGE_TOKEN)
    return layout


class _Columns:
    """A batch's rows as flat lists."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.offsets: list[int] = [0]
        self.lengths: list[int] = []
        self.images: list[list[str]] = []
        self.image_tokens: list[list[int]] = []
        self.sources: list[str] = []

    def add(self, sample: CompactSample, conv: Conversation) -> None:
        self.ids += sample.input_ids
        self.labels += sample.labels
        self.offsets.append(len(self.ids))
        self.lengths.append(sample.length)
        self.images.append(conv.images)
        self.image_tokens.append(sample.image_tokens)
        self.sources.append(conv.source or "")

    def finish(self, stats: EncodeStats, error: tuple[str, str, str] | None = None) -> _Batch:
        return _Batch(np.array(self.ids, np.int32), np.array(self.labels, np.int32), np.array(self.offsets, np.int32),
                      np.array(self.lengths, np.int32), self.images, self.image_tokens, self.sources, stats, [],
                      error)  # fmt: skip


def _record_batch(batch: _Batch) -> pa.RecordBatch:
    offsets = pa.array(batch.offsets)
    return pa.record_batch(
        [
            pa.ListArray.from_arrays(offsets, pa.array(batch.ids)),
            pa.ListArray.from_arrays(offsets, pa.array(batch.labels)),
            pa.array(batch.lengths),
            pa.array(batch.images, type=pa.list_(pa.string())),
            pa.array(batch.image_tokens, type=pa.list_(pa.int32())),
            pa.array(batch.sources, type=pa.string()),
        ],
        schema=SCHEMA,
    )


# ---------------------------------------------------------------- shards

_Error = tuple[str, str, str]


@dataclass
class _ShardResult:
    """What one process did: per batch it encoded (in order), its stats, bad records and error."""

    batches: list[tuple[EncodeStats, list[tuple[str, str]], _Error | None]]
    read_error: _Error | None = None
    """The file itself could not be read (e.g. malformed JSON): it wins over every record's error."""


def _record_batches(path: Path, parsed: list | None) -> Iterator[list[tuple[str, Any]]]:
    records = iter(parsed) if parsed is not None else iter_records(path)
    while batch := list(islice(records, BATCH_SIZE)):
        yield batch


def _encode_shard(
    path: Path,
    local: BatchEncoder,
    fmt: str,
    skip_bad: bool,
    shard: int,
    num_shards: int,
    out: Path,
    parsed: list | None,
    progress,
) -> _ShardResult:
    """Batches shard, shard + num_shards, ... of the file, each read, encoded and written to `out` (one Arrow
    record batch per batch, empty ones too, so that shards interleave back in order). A `.jsonl` file is read
    line by line by every process, which converts only its own batches; a `.json` list comes `parsed` once,
    before the processes fork."""
    reader = FormatReader(fmt)
    result = _ShardResult([])
    batches = _record_batches(path, parsed)
    with pa.ipc.new_stream(str(out), SCHEMA) as writer:
        try:
            for index, slots in enumerate(batches):
                if index % num_shards != shard:
                    for _, record in slots:  # the format is detected from the first record that names one
                        if reader.fmt != "auto":
                            break
                        reader.detect(record)
                    continue
                batch = local.encode_records(slots, reader, skip_bad)
                writer.write_batch(_record_batch(batch))
                result.batches.append((batch.stats, batch.bad, batch.error))
                progress(len(slots))
                if batch.error is not None:
                    for _ in batches:  # read on: a file error after it is the one to report
                        pass
                    break
        except DataError as err:
            result.read_error = (type(err).__name__, err.where, err.problem)
    return result


def _raise(error: _Error) -> None:
    kind, where, problem = error
    raise (TokenizationMismatch if kind == TokenizationMismatch.__name__ else DataError)(where, problem)


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


def rule_key(rule: ImageTokens) -> int | dict:
    """The image-token rule as the cache key holds it: the count, or the geometry (tile, grid, canvases)."""
    if isinstance(rule, int):
        return rule
    return {"tile": rule.tile, "patch_grid": rule.patch_grid, "pinpoints": [list(p) for p in rule.pinpoints]}


def cache_key_parts(
    path: str | Path, encoder: Encoder, fmt: str, skip_bad: bool, image_folder: str | Path | None = None
) -> dict:
    """What the prepared output depends on, each part as it affects the output, so that `llava-ft data prepare`
    and training share the entry however they name the same file and format. The image folder counts only where
    the images' sizes do (any-resolution geometry)."""
    path = Path(path).resolve()
    folder = Path(image_folder if image_folder is not None else path.parent).resolve()
    return {
        "data": _file_digest(path),
        # Records are reported as "PATH:LINE" with the resolved path (`prepare` resolves it): one entry for every
        # spelling of the file, and a copy elsewhere does not report the original's path.
        "path": str(path),
        "format": effective_format(path, fmt),  # "auto" that detects llava prepares as "llava" does
        "template": encoder.template.name,
        "tokenizer": tokenizer_fingerprint(encoder.tokenizer),
        "max_length": encoder.max_length,
        "image_tokens": rule_key(encoder.image_tokens),
        "max_image_tokens": encoder.max_image_tokens,
        "image_folder": str(folder) if encoder.anyres else None,
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
    dataset = _open_arrow(arrow_file, key)
    return dataset, _stats_from_dict(meta["stats"]), BadRecords([tuple(x) for x in meta["bad"]])


def _open_arrow(path: Path, fingerprint: str, in_memory: bool = False) -> datasets.Dataset:
    """The Arrow file as a Dataset with our fingerprint (the cache key): `Dataset.from_file` would hash the
    table's metadata instead, which costs more than the rest of a cache hit."""
    table_class = datasets.table.InMemoryTable if in_memory else datasets.table.MemoryMappedTable
    return datasets.Dataset(table_class.from_file(str(path)), fingerprint=fingerprint)


def _stats_from_dict(d: dict) -> EncodeStats:
    d = dict(d)
    d.pop("num_problems", None)
    d["dropped"] = Counter(d["dropped"])
    for name in ("tokens_per_image", "tokens_per_sample"):  # JSON keys are strings
        d[name] = Counter({int(k): v for k, v in d[name].items()})
    d["problems"] = [tuple(p) for p in d["problems"]]
    return EncodeStats(**d)


# ---------------------------------------------------------------- entry point

AUTO_NUM_PROC_MIN_BYTES = 8 << 20
AUTO_NUM_PROC_MAX = 8


def auto_num_proc(path: Path, *, alone: bool = False) -> int:
    """Processes for `num_proc=None`: this process's CPUs, capped; 1 for small files. Shared among the local
    training processes (torchrun's LOCAL_WORLD_SIZE) unless this one prepares `alone`: with the cache on,
    training lets one process per machine prepare while the others wait for its cache entry."""
    if path.stat().st_size < AUTO_NUM_PROC_MIN_BYTES:
        return 1
    return cpu_budget(alone=alone)


def cpu_budget(*, alone: bool) -> int:
    """Processes one preparation may fork: this process's CPUs, capped at AUTO_NUM_PROC_MAX, shared among the
    local training processes unless it prepares `alone` (see `auto_num_proc`)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    sharing = 1 if alone else max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(AUTO_NUM_PROC_MAX, cpus // sharing))


def prepare(
    path: str | Path,
    encoder: Encoder,
    *,
    fmt: str = "auto",
    skip_bad: bool = False,
    num_proc: int | None = 1,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = False,
    image_folder: str | Path | None = None,
) -> Prepared:
    """Prepared data of one file: loaded from the cache when its key matches, else encoded (and stored).
    `image_folder`: where the records' images are (default: the file's folder), read for their sizes with
    any-resolution geometry.

    Bad records raise `DataError` unless `skip_bad` (then counted, as in `encode_all`); drops are counted.
    `num_proc=None` picks the number of processes (`auto_num_proc`; with the cache on it assumes this process
    prepares alone on its machine, as training arranges); the output does not depend on it.
    """
    started = time.perf_counter()
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "data file not found")
    # Sources ("PATH:LINE", stored in the cache) name the resolved path: the same for any spelling of the file.
    path = path.resolve()
    # The key hashes the data file and the tokenizer: only worth it when the cache is used.
    folder = Path(image_folder) if image_folder is not None else path.parent
    parts = cache_key_parts(path, encoder, fmt, skip_bad, folder) if use_cache else {}
    key = _key(parts) if use_cache else ""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / key
    if use_cache and (hit := _load_entry(final, key)) is not None:
        dataset, stats, bad = hit
        return Prepared(dataset, stats, bad, "hit", time.perf_counter() - started, key)

    if num_proc is None:
        num_proc = auto_num_proc(path, alone=use_cache)
        log.info("preparing %s with %d process(es)", path, num_proc)
    if use_cache:
        root.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(root)
    # Built under a temporary name next to the entry, so a killed run leaves nothing that looks complete.
    work = make_temp_dir(root, key, "partial") if use_cache else Path(tempfile.mkdtemp(prefix=".partial-"))
    try:
        local = BatchEncoder(encoder, folder)
        stats, bad = _build(path, local, work / "data.arrow", fmt, skip_bad, num_proc, progress)
        if not use_cache:
            dataset = _open_arrow(
                work / "data.arrow", f"uncached-{os.getpid()}-{time.time_ns()}", in_memory=True
            )
            return Prepared(dataset, stats, bad, "off", time.perf_counter() - started, key, num_proc)
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
    return Prepared(loaded[0], stats, bad, "built", time.perf_counter() - started, key, num_proc)


def _build(
    path: Path, local: BatchEncoder, out: Path, fmt: str, skip_bad: bool, num_proc: int, progress: bool
) -> tuple[EncodeStats, BadRecords]:
    # `local` is built once: forked processes inherit it (and its tokenizer) as it is, the parsed .json list too.
    parsed = list(iter_records(path)) if path.suffix == ".json" else None
    # Nothing built here is cyclic, and collections of the growing heap would cost time for nothing.
    gc_was_on = gc.isenabled()
    gc.disable()
    bar = tqdm(desc=f"preparing {path.name}", unit=" rec", disable=not progress, mininterval=1.0)
    try:
        with bar:
            if num_proc <= 1:
                result = _encode_shard(path, local, fmt, skip_bad, 0, 1, out, parsed, bar.update)
                return _merge([result], None, None)
            files = [out.with_name(f".shard-{k}.arrow") for k in range(num_proc)]
            try:
                results = _run_shards(path, local, fmt, skip_bad, files, parsed, bar)
                readers = [pa.ipc.open_stream(pa.memory_map(str(f))) for f in files]
                with pa.ipc.new_stream(str(out), SCHEMA) as writer:
                    return _merge(results, readers, writer)
            finally:
                for f in files:
                    f.unlink(missing_ok=True)
    finally:
        if gc_was_on:
            gc.enable()


def _run_shards(
    path: Path, local: BatchEncoder, fmt: str, skip_bad: bool, files: list[Path], parsed: list | None, bar
) -> list[_ShardResult]:
    """One forked process per shard file (they inherit the loaded tokenizer); progress read from a counter."""

    def shard(k: int):
        return lambda progress: _encode_shard(
            path, local, fmt, skip_bad, k, len(files), files[k], parsed, progress
        )

    return run_forked(
        [shard(k) for k in range(len(files))],
        what="data preparation",
        progress=lambda done: bar.update(done - bar.n),
    )


def _merge(results: list[_ShardResult], readers: list | None, writer) -> tuple[EncodeStats, BadRecords]:
    """Batch g came from shard g % len(results): counts (and, with readers, rows) in record order. A file
    error is raised first, as no record of a broken file can be trusted; else the first error in record order."""
    for result in results:
        if result.read_error is not None:
            _raise(result.read_error)
    stats, bad = EncodeStats(), BadRecords()
    g, n = 0, len(results)
    while True:
        result, local = results[g % n], g // n
        if local == len(result.batches):
            return stats, bad
        batch_stats, batch_bad, error = result.batches[local]
        stats.merge(batch_stats)
        bad.items += batch_bad
        if error is not None:
            _raise(error)
        if readers is not None:
            writer.write_batch(readers[g % n].read_next_batch())
        g += 1


def compact_tokens(dataset: datasets.Dataset) -> int:
    """Stored tokens: text tokens plus one per image (how XTuner counts an image)."""
    return int(pa.compute.sum(pa.compute.list_value_length(dataset.data.column("input_ids"))).as_py() or 0)


def throughput_line(records: int, tokens: int, seconds: float) -> str:
    rate = (lambda n: n / seconds) if seconds > 0 else (lambda n: float("inf"))
    return (
        f"{records} records in {seconds:.2f} s: {rate(records):,.0f} records/s, {rate(tokens):,.0f} tokens/s "
        f"(text tokens, an image counted once)"
    )
