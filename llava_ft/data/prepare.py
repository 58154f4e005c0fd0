"""Prepared data: one file of records -> token ids + labels in an Arrow file, cached by content.

The path shared by `llava-ft data prepare` and training: records -> `Dataset.map` (num_proc processes; per batch:
Conversation -> template -> ids + labels under `Encoder`'s rules) -> one row per record saying whether it is
kept -> counts -> the kept rows. On fast tokenizers each text is tokenized once as a whole (by chunked.py where it
reproduces the tokenizer, else one Rust call per batch); a record with a token across a trained/untrained
boundary goes to `Encoder` itself, so the output equals `encode_all`'s. Images are stored as one
IMAGE_TOKEN_INDEX each (`length` is the full length). A cache entry is a folder named by the key (data file,
format, template, tokenizer, max_length, options, this code), built under a temporary name and renamed when
complete; its checksum is verified before it is loaded.
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
from dataclasses import dataclass
from pathlib import Path

import datasets
import datasets.table
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from llava_ft.constants import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava_ft.data.chunked import ChunkedTokenizer, cut_tokens
from llava_ft.data.conversation import Conversation, DataError
from llava_ft.data.sources import (
    BadRecords,
    FormatReader,
    detect_format,
    effective_format,
    iter_raw_records,
    parse_record,
)
from llava_ft.data.sp_convert import fast_twin
from llava_ft.data.tokenize import CompactSample, Encoder, EncodeStats, TokenizationMismatch, outcome

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
RECORD_FEATURES = datasets.Features({"where": datasets.Value("string"), "raw": datasets.Value("binary")})
# What `Dataset.map` gives per record: the sample (empty when not kept) and its outcome, counted afterwards.
ROW_FEATURES = datasets.Features(
    {
        **FEATURES,
        "outcome": datasets.Value("string"),
        "problem": datasets.Value("string"),
        "reason": datasets.Value("string"),
        "truncated": datasets.Value("bool"),
        "realigned": datasets.Value("bool"),
        "supervised": datasets.Value("int32"),
        "image_tokens": datasets.Value("int32"),
    }
)
ROW_SCHEMA = ROW_FEATURES.arrow_schema
_CODE_FILES = (
    "prepare.py",
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
    """Columns input_ids, labels (images compact), length (full), images, source; memory-mapped."""
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


class BatchEncoder:
    """`Encoder.encode` over many conversations at once, with the same result (see the module docstring)."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder
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

    def encode_batch(self, items: list[Conversation | DataError]) -> _Rows:
        """One row per item, in order: a conversation's sample or why it is not kept; a `DataError` item is a
        record that could not be read or converted ("bad")."""
        rendered: list = []
        texts: list[tuple[str, list[int]]] = []  # (text between images, segment boundaries inside it)
        for item in items:
            if isinstance(item, DataError):
                rendered.append(None)
                continue
            try:
                segments, text = self.encoder.render(item)
            except DataError as err:
                rendered.append(err)
                continue
            layout = _layout(segments, text.split(IMAGE_TOKEN))
            rendered.append((layout, len(texts)))
            texts += [(chunk, cuts) for chunk, cuts, _ in layout if chunk]
        tokenized = self._tokenize(texts) if self.backend is not None else []

        out = _Rows()
        for item, done in zip(items, rendered):
            if done is None:
                out.not_kept("bad", item)
                continue
            try:
                if isinstance(done, DataError):
                    raise done
                fast = self._whole_text(*done, tokenized) if self.backend is not None else None
                # Where a token crosses a segment boundary, Encoder decides (and may realign or refuse).
                sample = (
                    self.encoder.encode_compact(item)
                    if fast is None
                    else self.encoder.finish(item, *fast, False)
                )
            except DataError as err:
                out.not_kept(outcome(err), err)
                continue
            out.kept(sample, item)
        return out

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


class _Rows:
    """Rows of ROW_FEATURES as flat lists: a kept sample, or an empty one saying why the record is not kept."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.offsets: list[int] = [0]
        self.columns: dict[str, list] = {
            name: [] for name in ROW_FEATURES if name not in ("input_ids", "labels")
        }

    def _add(self, **values) -> None:
        self.offsets.append(len(self.ids))
        for name, column in self.columns.items():
            column.append(values[name])

    def kept(self, sample: CompactSample, conv: Conversation) -> None:
        self.ids += sample.input_ids
        self.labels += sample.labels
        self._add(length=sample.length, images=conv.images, source=conv.source or conv.where, outcome="kept",
                  problem="", reason="", truncated=sample.truncated, realigned=sample.realigned,
                  supervised=len(sample.labels) - sample.labels.count(IGNORE_INDEX),
                  image_tokens=sample.num_images * sample.num_image_tokens)  # fmt: skip

    def not_kept(self, outcome: str, err: DataError) -> None:
        """`outcome`: "bad" (not read or converted) or as `EncodeStats.add_problem` counts it."""
        self._add(length=0, images=[], source=err.where, outcome=outcome, problem=err.problem,
                  reason=getattr(err, "reason", ""), truncated=False, realigned=False, supervised=0,
                  image_tokens=0)  # fmt: skip

    def table(self) -> pa.Table:
        offsets = pa.array(np.array(self.offsets, np.int32))
        arrays = {
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(np.array(self.ids, np.int32))),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(np.array(self.labels, np.int32))),
        }
        arrays.update(
            {name: pa.array(column, ROW_SCHEMA.field(name).type) for name, column in self.columns.items()}
        )
        return pa.table([arrays[name] for name in ROW_SCHEMA.names], schema=ROW_SCHEMA)


class _EncodeRecords:
    """The `Dataset.map` function: a batch of (where, JSON text) -> one row per record, in order."""

    def __init__(self, batch_encoder: BatchEncoder, fmt: str, detected_at: int):
        self.batch_encoder = batch_encoder
        self.reader = FormatReader(fmt)
        # With "auto", records before the first one that names a format are read as "auto" reads them.
        self.detected_at = detected_at

    def __call__(self, wheres: list[str], raws: list[bytes], indices: list[int]) -> pa.Table:
        items: list[Conversation | DataError] = []
        for where, raw, index in zip(wheres, raws, indices):
            reader = self.reader if index >= self.detected_at else FormatReader("auto")
            try:
                items.append(reader.conversation(parse_record(raw, where), where))
            except DataError as err:
                items.append(err)
        return self.batch_encoder.encode_batch(items).table()


def _detect(records: datasets.Dataset, fmt: str) -> tuple[str, int]:
    """The format and index of the first record that names one (with "auto"); records before it are bad."""
    if fmt != "auto":
        return fmt, 0
    for index, record in enumerate(records):
        try:
            return detect_format(parse_record(record["raw"], record["where"]), ""), index
        except DataError:
            continue
    return "auto", len(records)


def _count(rows: datasets.Dataset) -> tuple[EncodeStats, BadRecords, DataError | None]:
    """The counts of the rows (in record order), and the first error that stops preparation without skip_bad."""
    stats, bad, first_error = EncodeStats(), BadRecords(), None
    names = ["outcome", "source", "problem", "reason", "length", "supervised", "image_tokens", "truncated",
             "realigned"]  # fmt: skip
    columns = rows.select_columns(names).with_format("arrow")[:]
    for outcome_, where, problem, reason, *kept in zip(*(columns[name].to_pylist() for name in names)):
        if outcome_ == "kept":
            stats.records += 1
            stats.add_kept(*kept)
            continue
        if first_error is None and outcome_ != "dropped":
            first_error = (TokenizationMismatch if outcome_ == "mismatched" else DataError)(where, problem)
        if outcome_ == "bad":
            bad.items.append((where, problem))
        else:
            stats.records += 1
            stats.add_problem(outcome_, where, problem, reason)
    return stats, bad, first_error


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
    """What the prepared output depends on, each part as it affects the output, so that `llava-ft data prepare`
    and training share the entry however they name the same file and format."""
    path = Path(path).resolve()
    return {
        "data": _file_digest(path),
        # Records are reported as "PATH:LINE" with the resolved path (`prepare` resolves it): one entry for every
        # spelling of the file, and a copy elsewhere does not report the original's path.
        "path": str(path),
        "format": effective_format(path, fmt),  # "auto" that detects llava prepares as "llava" does
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
) -> Prepared:
    """Prepared data of one file: loaded from the cache when its key matches, else encoded (and stored).

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
    parts = cache_key_parts(path, encoder, fmt, skip_bad) if use_cache else {}
    key = _key(parts) if use_cache else f"uncached-{os.getpid()}-{time.time_ns()}"
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
    # Built under a temporary name next to the entry, so a killed run leaves nothing that looks complete.
    work = Path(tempfile.mkdtemp(prefix=f".{key}.partial-", dir=root if use_cache else None))
    try:
        dataset, stats, bad = _build(path, encoder, work if use_cache else None, key, fmt, skip_bad, num_proc,
                                     progress)  # fmt: skip
        if not use_cache:
            return Prepared(dataset, stats, bad, "off", time.perf_counter() - started, "", num_proc)
        del dataset  # the entry is opened again once it is in place
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
    path: Path,
    encoder: Encoder,
    work: Path | None,
    key: str,
    fmt: str,
    skip_bad: bool,
    num_proc: int,
    progress: bool,
) -> tuple[datasets.Dataset, EncodeStats, BadRecords]:
    """Records -> `Dataset.map` (num_proc processes, contiguous shards, so the rows come back in record order)
    -> counts -> the kept rows, written to `work`/data.arrow (in memory when `work` is None)."""
    wheres, raws = [], []
    for where, raw in iter_raw_records(path):
        wheres.append(where)
        raws.append(raw)
    records = datasets.Dataset.from_dict({"where": wheres, "raw": raws}, features=RECORD_FEATURES)
    del wheres, raws
    fmt, detected_at = _detect(records, fmt)
    files = {"keep_in_memory": True} if work is None else {}

    def cache_file(name: str) -> dict:  # the steps before data.arrow write under work/steps, removed after
        return files or {
            "cache_file_name": str(work / name if name == "data.arrow" else work / "steps" / name)
        }

    bars = not datasets.are_progress_bars_disabled()
    if not progress:
        datasets.disable_progress_bars()
    # Nothing built here is cyclic, and collections of the growing heap would cost time for nothing.
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        rows = records.map(
            _EncodeRecords(BatchEncoder(encoder), fmt, detected_at),
            batched=True,
            batch_size=BATCH_SIZE,
            with_indices=True,
            input_columns=["where", "raw"],
            remove_columns=["where", "raw"],
            features=ROW_FEATURES,
            num_proc=num_proc if num_proc > 1 else None,
            new_fingerprint=f"{key}-rows",
            desc=f"preparing {path.name}",
            **cache_file("rows.arrow"),
        )
        stats, bad, error = _count(rows)
        if error is not None and not skip_bad:
            raise error
        kept = rows.filter(
            lambda outcomes: [o == "kept" for o in outcomes],
            batched=True,
            input_columns=["outcome"],
            new_fingerprint=f"{key}-kept",
            **cache_file("kept.arrow"),
        )
        # Arrow batches straight through (the default Python format would rebuild every list).
        dataset = (
            kept.select_columns(list(FEATURES))
            .with_format("arrow")
            .flatten_indices(new_fingerprint=key, **cache_file("data.arrow"))
            .with_format(None)
        )
    finally:
        if gc_was_on:
            gc.enable()
        if bars and not progress:
            datasets.enable_progress_bars()
    if work is not None:
        shutil.rmtree(work / "steps")
    return dataset, stats, bad


def compact_tokens(dataset: datasets.Dataset) -> int:
    """Stored tokens: text tokens plus one per image (how XTuner counts an image)."""
    return int(pa.compute.sum(pa.compute.list_value_length(dataset.data.column("input_ids"))).as_py() or 0)


def throughput_line(records: int, tokens: int, seconds: float) -> str:
    rate = (lambda n: n / seconds) if seconds > 0 else (lambda n: float("inf"))
    return (
        f"{records} records in {seconds:.2f} s: {rate(records):,.0f} records/s, {rate(tokens):,.0f} tokens/s "
        f"(text tokens, an image counted once)"
    )
