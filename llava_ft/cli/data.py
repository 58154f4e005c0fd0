"""`llava-ft data preview | check`: see exactly what the model will be trained on, before training.

    llava-ft data preview --data d.jsonl --template internlm2_chat --tokenizer LLM_DIR [--index 3] [--json]
    llava-ft data check   --data d.jsonl --template internlm2_chat --tokenizer LLM_DIR [--skip-bad]
                          [--image-folder DIR]   (prepare's path, every bad record listed; also: every image
                          opened and decoded, each missing or unreadable one named with its record)
    llava-ft data prepare --data d.jsonl --template internlm2_chat --tokenizer LLM_DIR [--num-proc N]
                          [--no-cache] [--output CACHE_DIR] [--image-folder DIR]   (what training runs; cached
                          for it, the images' verdicts too)
    llava-ft data check --config CONFIG.yaml   (every data.train file, as that config trains on it; with
                          model.vision.anyres, check and prepare also print the image-token distribution per
                          image and per sample)

Also runs standalone: `python -m llava_ft.cli.data preview ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from llava_ft.cli.config import check_names
from llava_ft.config import DataSection, DataSource, load_config
from llava_ft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_ft.data.anyres import ImageTokens
from llava_ft.data.conversation import Conversation, DataError
from llava_ft.data.sources import FORMATS, BadRecords, FormatReader, iter_conversations, iter_records
from llava_ft.data.templates import TEMPLATE_NAMES, get_template
from llava_ft.data.tokenize import DroppedSample, Encoder, EncodeStats, TokenizedSample
from llava_ft.errors import InputError

# The functions that tokenize and prepare import their modules (transformers, datasets, torch behind them) after
# the files and flags are checked: seconds of start-up that a wrong flag need not wait for.

GREEN, CYAN, RESET = "\x1b[32m", "\x1b[36m", "\x1b[0m"
DEFAULT_IMAGE_TOKENS = 576
IMAGE_FOLDER_HELP = (
    "folder the records' image paths are relative to (data.train[].image_folder; with --config, the config's): "
    "open and decode every image, naming each missing or unreadable one with its record (verdicts are cached "
    "by file size and modification time, as training keeps them)"
)


def add_data_commands(subparsers) -> None:
    """Register `data preview` and `data check` under the `llava-ft` parser's subparsers."""
    data = subparsers.add_parser("data", help="inspect and prepare training data: preview | check | prepare")
    _add_subcommands(data.add_subparsers(dest="data_command", required=True))


def _add_subcommands(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        default=None,
        help="a training config: its template, tokenizer (model.llm), max_length, last_turn_only, image tokens "
        "per image (its vision tower), data.skip_bad and cache settings and, without --data, its data.train "
        "files with their formats and image folders, as training reads them; flags given beside it win",
    )
    common.add_argument("--data", default=None, help=".json (list of records) or .jsonl file")
    common.add_argument("--template", default=None, choices=TEMPLATE_NAMES)
    common.add_argument("--tokenizer", default=None, help="tokenizer folder (usually the LLM's)")
    common.add_argument("--format", default=None, choices=("auto", *FORMATS), help="default: auto")
    common.add_argument("--max-length", type=int, default=None, help="tokens, image tokens included")
    common.add_argument(
        "--num-image-tokens",
        type=int,
        default=None,
        help=f"placeholder tokens per image (default: the --config's vision tower, its any-resolution geometry "
        f"included, else {DEFAULT_IMAGE_TOKENS}, CLIP ViT-L/14-336's)",
    )
    common.add_argument("--last-turn-only", action="store_true", help="train only each record's last answer")

    p = sub.add_parser("preview", parents=[common], help="rendered records, trained spans in green")
    p.add_argument("--index", type=int, default=None, help="show only record I (0-based)")
    p.add_argument("--limit", type=int, default=3, help="records to show without --index (0: all)")
    p.add_argument("--json", action="store_true", help="one JSON object per record: input_ids, labels")
    p.set_defaults(func=cmd_preview)

    c = sub.add_parser(
        "check", parents=[common], help="counts, token lengths, truncation, drops, bad records"
    )
    c.add_argument("--skip-bad", action="store_true", help="exit 0 even if some records are bad")
    c.add_argument("--image-folder", default=None, help=IMAGE_FOLDER_HELP)
    c.set_defaults(func=cmd_check)

    r = sub.add_parser(
        "prepare", parents=[common], help="tokenize for training into the Arrow cache; counts, speed"
    )
    r.add_argument("--skip-bad", action="store_true", help="skip (and count) bad records instead of stopping")
    r.add_argument(
        "--num-proc",
        type=int,
        default=None,
        help="worker processes (default: the CPUs, for files of 8 MiB and more)",
    )
    r.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    r.add_argument("--output", default=None, help="cache folder (default ~/.cache/llava_ft/prepared)")
    r.add_argument("--image-folder", default=None, help=IMAGE_FOLDER_HELP)
    r.set_defaults(func=cmd_prepare)


@dataclass
class _Setup:
    """What a data command reads and how it encodes: from the flags, or a training config under them."""

    encoder: Encoder
    data: DataSection
    """The files (`train`) and how they are read: the config's section under the flags, or the flags alone (then
    skip_bad, cache and num_proc keep their defaults)."""
    from_config: bool


def _setup(args: argparse.Namespace) -> _Setup:
    cfg = None
    if args.config is not None:
        cfg = load_config(args.config)
        check_names(cfg, args.config)
    else:
        missing = [f"--{name}" for name in ("data", "template", "tokenizer") if getattr(args, name) is None]
        if missing:
            raise InputError(f"{', '.join(missing)} required (or --config CONFIG.yaml, which names them)")
    # Without a config: no length limit unless --max-length (a config always has one).
    data = cfg.data if cfg is not None else DataSection(max_length=None)
    if args.max_length is not None:
        data.max_length = args.max_length
    data.last_turn_only = data.last_turn_only or args.last_turn_only
    if args.data is not None:
        data.train = [DataSource(args.data, args.format or "auto")]
    elif args.format is not None:
        data.train = [dataclasses.replace(src, format=args.format) for src in data.train]
    if not data.train:
        raise InputError(f"{args.config}: data.train names no files (or pass --data)")
    for i, src in enumerate(data.train):  # before the tokenizer loads
        if not Path(src.path).exists():
            where = "--data" if args.data is not None else f"{args.config}: data.train[{i}].path"
            raise InputError(f"{where}: {src.path}: no such file or folder")
        if hasattr(args, "image_folder"):  # check and prepare read the images: their folder too
            _image_folder(args, cfg is not None, src)
    from llava_ft.data.dataset import data_encoder
    from llava_ft.data.tokenizer import load_tokenizer
    from llava_ft.model.vision import image_token_rule

    tokenizer = load_tokenizer(args.tokenizer or cfg.model.llm)
    template = get_template(args.template or cfg.data.template, tokenizer)
    image_tokens: ImageTokens
    if args.num_image_tokens is not None:
        image_tokens = args.num_image_tokens
    elif cfg is not None:
        # The rule training uses (the tower's grid after pooling, or its any-resolution geometry); a text-only
        # config has none.
        image_tokens = 0 if cfg.model.vision is None else image_token_rule(cfg.model.vision)
        print(f"{args.config}: {_rule_text(image_tokens)}, template {template.name}", file=sys.stderr)
    else:
        image_tokens = DEFAULT_IMAGE_TOKENS
    return _Setup(data_encoder(data, tokenizer, template, image_tokens), data, cfg is not None)


def _rule_text(rule: ImageTokens) -> str:
    if isinstance(rule, int):
        return f"{rule} image tokens per image"
    canvases = ", ".join(f"{h}x{w}" for h, w in rule.pinpoints)
    return (
        f"any-resolution image tokens by image size, up to {rule.max_tokens} per image ({rule.tile}-px tiles, "
        f"canvases {canvases} as height x width)"
    )


def _source_folder(src: DataSource) -> str:
    """The folder training reads `src`'s images from."""
    return src.image_folder or os.path.dirname(src.path) or "."


# ---------------------------------------------------------------- preview


def cmd_preview(args: argparse.Namespace) -> int:
    setup = _setup(args)
    encoder = setup.encoder
    if not args.json:
        print(f"{GREEN}green{RESET}: trained tokens; {CYAN}<image xN>{RESET}: N image placeholder tokens\n")
    for src in setup.data.train:
        if args.index is not None:
            picked = [_record_at(src.path, src.format, args.index)]
        else:
            convs = iter_conversations(src.path, src.format)
            picked = convs if args.limit == 0 else islice(convs, args.limit)
        _preview(picked, encoder, args.json, _source_folder(src))
    return 0


def _preview(picked, encoder: Encoder, as_json: bool, image_folder: str) -> None:
    from llava_ft.data.prepare import image_sizes

    for conv in picked:
        try:
            sample = encoder.encode(conv, image_sizes(conv, image_folder) if encoder.anyres else None)
        except DroppedSample as err:
            print(json.dumps({"source": conv.source, "dropped": err.problem}) if as_json else f"-- {err}\n")
            continue
        if as_json:
            print(json.dumps({"source": conv.source, "num_images": sample.num_images, "truncated": sample.truncated,
                              "trimmed": conv.trimmed,
                              "input_ids": sample.input_ids, "labels": sample.labels}))  # fmt: skip
        else:
            print(_header(conv.source, sample, trimmed=conv.trimmed))
            print(render_sample(encoder.tokenizer, sample) + "\n")


def _record_at(path: str, fmt: str, index: int) -> Conversation:
    """Record `index` (0-based, raw records counted) converted alone: bad records before it do not block it. With
    "auto" the format is still detected from the first record that names one, as prepare does."""
    if index < 0:
        raise DataError(path, f"--index must be >= 0, got {index}")
    reader = FormatReader(fmt)
    count = 0
    for count, (where, record) in enumerate(iter_records(path), start=1):
        if count - 1 == index:
            return reader.conversation(record, where)
        reader.detect(record)  # a key check only: nothing before the chosen record is converted
    raise DataError(path, f"no record at index {index} (the file has {count} records)")


def _header(source: str | None, s: TokenizedSample, *, trimmed: bool = False) -> str:
    trained = sum(label != IGNORE_INDEX for label in s.labels)
    flags = (
        ", truncated" * s.truncated
        + ", realigned" * s.realigned
        + ", opening assistant turn trimmed" * trimmed
    )
    return f"-- {source}: {len(s.input_ids)} tokens (images {s.num_images}, trained {trained}{flags})"


def render_sample(tokenizer, s: TokenizedSample) -> str:
    """The sample's own tokens as text: trained runs green, image spans as `<image xN>`."""
    out, k, image = [], 0, 0
    while k < len(s.input_ids):
        if s.input_ids[k] == IMAGE_TOKEN_INDEX:
            n = s.image_tokens[image]
            out.append(f"{CYAN}<image x{n}>{RESET}")
            k, image = k + n, image + 1
            continue
        end = k
        while end < len(s.input_ids) and s.input_ids[end] != IMAGE_TOKEN_INDEX:
            end += 1
        out += _render_text(tokenizer, s.input_ids[k:end], s.labels[k:end])
        k = end
    return "".join(out)


def _render_text(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """Decode runs of equal trainedness. Each run's text is the growth of the decoded prefix, so spaces that
    a decoder drops at the start of a piece are kept."""

    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    cuts = [0] + [
        i for i in range(1, len(ids)) if (labels[i] == IGNORE_INDEX) != (labels[i - 1] == IGNORE_INDEX)
    ]
    cuts.append(len(ids))
    out, before = [], ""
    for a, b in zip(cuts, cuts[1:]):
        upto = decode(ids[:b])
        text = upto[len(before) :] if upto.startswith(before) else decode(ids[a:b])
        before = upto
        out.append(text if labels[a] == IGNORE_INDEX else f"{GREEN}{text}{RESET}")
    return out


# ---------------------------------------------------------------- check


def _image_folder(args: argparse.Namespace, from_config: bool, src: DataSource) -> str | None:
    """The folder whose images `src` names: the flag's, else with a config where training reads them, else none
    (the images are not looked at)."""
    folder = args.image_folder
    if folder is None and from_config:
        folder = _source_folder(src)
    if folder is not None and not os.path.isdir(folder):
        raise DataError(folder, "image folder not found")
    return folder


def _drop_bad_images(table, folder: str, stats: EncodeStats, bad: BadRecords, setup: _Setup, skip_bad: bool,
                     cache_dir: str | None, use_cache: bool):  # fmt: skip
    """Training's image check (`drop_bad_images`); a record with a bad image moves from the counts to `bad`, as
    reading errors are listed. Prints the check's counts; returns the rows left."""
    from llava_ft.data.dataset import drop_bad_images

    before = len(stats.problems)
    table, check = drop_bad_images(table, Path(folder), stats, skip_bad=skip_bad, num_proc=setup.data.num_proc,
                                   cache_dir=cache_dir, use_cache=use_cache, progress=True)  # fmt: skip
    bad.items += stats.take_unkept(len(stats.problems) - before)
    print(f"{folder}: {check.summary()}")
    return table


def cmd_check(args: argparse.Namespace) -> int:
    setup = _setup(args)
    failed = 0
    for src in setup.data.train:
        failed += _check_file(src, setup, _image_folder(args, setup.from_config, src))
    if failed and not (args.skip_bad or setup.data.skip_bad):
        print(f"{failed} bad record(s); fix them or pass --skip-bad", file=sys.stderr)
        return 1
    return 0


def _check_file(src: DataSource, setup: _Setup, image_folder: str | None) -> int:
    """Print one file's counts; return its bad records. Runs `prepare` (what training runs, at its speed) with
    every bad record reported and nothing cached, then checks the images as training does (their verdicts
    cached as training caches them)."""
    from llava_ft.data.dataset import table_column
    from llava_ft.data.prepare import prepare

    data = setup.data
    done = prepare(src.path, setup.encoder, fmt=src.format, skip_bad=True, num_proc=data.num_proc,
                   use_cache=False, progress=True, image_folder=image_folder or _source_folder(src))  # fmt: skip
    stats, bad, table = done.stats, done.bad, done.dataset
    read = stats.records + len(bad)  # before bad images move records from the counts to `bad`
    if image_folder is not None:
        # A bad image makes its record bad here, as reading errors do (training skips it under skip_bad).
        table = _drop_bad_images(table, image_folder, stats, bad, setup, True, data.cache_dir, data.cache)
    with_images = pa.compute.sum(pa.compute.list_value_length(table_column(table, "images")).cast("bool"))
    _print_counts(
        src.path,
        read,
        stats,
        bad,
        table_column(table, "length"),
        f"  (samples with images: {with_images.as_py() or 0})",
        image_tokens=setup.encoder.anyres,
    )
    return len(bad) + stats.mismatched + stats.failed


def _print_counts(
    path: str,
    read: int,
    stats: EncodeStats,
    bad: BadRecords,
    lengths,
    after_lengths: str = "",
    *,
    image_tokens: bool = False,
) -> None:
    """What `check` and `prepare` print per file: records read and bad, the counts, token-length percentiles
    (`lengths`: an Arrow column of sample lengths) and with `image_tokens` the image-token distribution (where
    it varies: any-resolution geometry)."""
    print(f"{path}: {read} records read, {len(bad)} bad")
    print(bad.summary())
    print(stats.summary())
    if len(lengths):
        ordered = np.sort(lengths.to_numpy()).tolist()
        pct = "  ".join(f"p{p} {_percentile(ordered, p)}" for p in (50, 90, 99))
        print(f"token length: {pct}  max {ordered[-1]}{after_lengths}")
    if image_tokens:
        for line in stats.image_token_lines():
            print(line)


# ---------------------------------------------------------------- prepare


def cmd_prepare(args: argparse.Namespace) -> int:
    setup = _setup(args)
    from llava_ft.data.dataset import table_column
    from llava_ft.data.prepare import compact_tokens, prepare, throughput_line

    # A config's own settings key the cache as training keys it, so training then loads what this prepared.
    data = setup.data
    output = args.output or data.cache_dir
    skip_bad, use_cache = args.skip_bad or data.skip_bad, not args.no_cache and data.cache
    data.num_proc = args.num_proc or data.num_proc
    for src in data.train:
        folder = _image_folder(args, setup.from_config, src)
        done = prepare(src.path, setup.encoder, fmt=src.format, skip_bad=skip_bad, num_proc=data.num_proc,
                       cache_dir=output, use_cache=use_cache, progress=True,
                       image_folder=folder or _source_folder(src))  # fmt: skip
        read = done.stats.records + len(done.bad)
        table = done.dataset
        if folder is not None:  # as training checks them: a bad image stops here unless skip_bad
            table = _drop_bad_images(table, folder, done.stats, done.bad, setup, skip_bad, output, use_cache)
        lengths = table_column(table, "length")
        _print_counts(src.path, read, done.stats, done.bad, lengths, image_tokens=setup.encoder.anyres)
        folder = output or "the default folder"
        if done.cache == "hit":
            print(f"cache hit ({folder}, key {done.key}): loaded in {done.seconds:.2f} s")
        else:
            where = "cache off" if done.cache == "off" else f"cached ({folder}, key {done.key})"
            rate = throughput_line(done.stats.records, compact_tokens(done.dataset), done.seconds)
            print(f"{where}; {done.processes} process(es) prepared {rate}")
    return 0


def _percentile(sorted_values: list[int], p: float) -> int:
    """Nearest-rank percentile."""
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_ft.cli.data", description=__doc__.splitlines()[0])
    _add_subcommands(parser.add_subparsers(dest="data_command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"llava-ft data: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
