"""Segments -> input_ids + labels, each `<image>` expanded to its image's placeholder ids: a fixed count, or under
any-resolution geometry a count from the image's size (height, width), which the caller passes.

Labels are built segment by segment and checked against the whole conversation tokenized at once (split
only at image markers), because that is what the model sees at inference. Where they differ (a tokenizer
that merges across a segment boundary, or sentencepiece's dummy prefix at each call), the whole-text ids are
kept and labels are assigned from character positions: offsets on fast tokenizers, prefix tokenization on
slow ones. Only when that is impossible is the record rejected, counted as a mismatch. Labels are not
shifted: the causal LM shifts them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields

from llava_ft.constants import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava_ft.data.anyres import AnyresGeometry, ImageTokens
from llava_ft.data.conversation import Conversation, DataError
from llava_ft.data.sources import BadRecords
from llava_ft.data.templates import ChatTemplate, Segment


@dataclass
class TokenizedSample:
    input_ids: list[int]
    labels: list[int]
    """`labels[i] == input_ids[i]` where trained, IGNORE_INDEX elsewhere (image positions included)."""
    num_images: int
    truncated: bool = False
    realigned: bool = False
    """Segment-wise ids differed from the whole-text ids; labels were reassigned by character position."""
    image_tokens: list[int] = field(default_factory=list)
    """Placeholder ids of each image, in order."""


@dataclass
class CompactSample:
    """An encoded sample with one IMAGE_TOKEN_INDEX per image (how prepared data stores it)."""

    input_ids: list[int]
    labels: list[int]
    num_images: int
    image_tokens: list[int]
    """Placeholder ids each image stands for in the model's input, per image in order."""
    truncated: bool = False
    realigned: bool = False
    trimmed: bool = False
    """Its record opened with an assistant turn that was left out (see sources)."""

    @property
    def length(self) -> int:
        """The model's input length: every image expanded."""
        return len(self.input_ids) + sum(self.image_tokens) - self.num_images

    def expand(self) -> TokenizedSample:
        ids, labels = expand_images(self.input_ids, self.labels, self.image_tokens)
        return TokenizedSample(
            ids, labels, self.num_images, self.truncated, self.realigned, list(self.image_tokens)
        )


def expand_images(ids: list[int], labels: list[int], counts: Sequence[int]) -> tuple[list[int], list[int]]:
    """Image k's IMAGE_TOKEN_INDEX of compact ids as `counts[k]` of them (never trained)."""
    if (num_images := ids.count(IMAGE_TOKEN_INDEX)) != len(counts):
        raise ValueError(f"{num_images} image(s) in the ids but {len(counts)} token count(s)")
    if not num_images:
        return ids, labels
    out_ids: list[int] = []
    out_labels: list[int] = []
    start, k = 0, 0
    for i, t in enumerate(ids):
        if t == IMAGE_TOKEN_INDEX:
            n = counts[k]
            out_ids += ids[start:i] + [IMAGE_TOKEN_INDEX] * n
            out_labels += labels[start:i] + [IGNORE_INDEX] * n
            start, k = i + 1, k + 1
    return out_ids + ids[start:], out_labels + labels[start:]


def apply_limits(
    ids: list[int],
    labels: list[int],
    *,
    image_tokens: Sequence[int],
    max_length: int | None,
    where: str,
    max_image_tokens: int | None = None,
) -> tuple[list[int], list[int], bool]:
    """The rules every encoded sample goes through, on compact ids (one IMAGE_TOKEN_INDEX per image, image k
    standing for `image_tokens[k]` ids): dropped when nothing is trained or its images carry more than
    `max_image_tokens`; cut to max_length after its last image, dropped when an image would be cut or nothing
    trained is left. Returns (ids, labels, truncated)."""
    if labels.count(IGNORE_INDEX) == len(labels):
        raise DroppedSample(where, "no supervised tokens", "every assistant turn is opted out or empty")
    total = sum(image_tokens)
    if max_image_tokens is not None and total > max_image_tokens:
        raise DroppedSample(
            where,
            "too many image tokens",
            f"{len(image_tokens)} image(s) carry {total} > data.max_image_tokens {max_image_tokens}",
        )
    num_images = len(image_tokens)
    extra = total - num_images
    if max_length is None or len(ids) + extra <= max_length:
        return ids, labels, False
    if num_images:
        images_end = len(ids) - ids[::-1].index(IMAGE_TOKEN_INDEX) + extra
        if images_end > max_length:
            raise DroppedSample(
                where,
                "images do not fit",
                f"the last image span ends at token {images_end} > max_length {max_length}",
            )
    keep = max_length - extra
    ids, labels = ids[:keep], labels[:keep]
    if labels.count(IGNORE_INDEX) == len(labels):
        raise DroppedSample(where, "no supervised tokens after truncation", f"max_length {max_length}")
    return ids, labels, True


Sizes = Sequence[tuple[int, int]] | None
"""Each image's (height, width) in pixels, in order; None where the image tokens do not depend on it."""


class DroppedSample(DataError):
    """A well-formed record that cannot be used (e.g. images past max_length); counted, never silent."""

    def __init__(self, where: str, reason: str, detail: str = ""):
        super().__init__(where, f"dropped: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason


class TokenizationMismatch(DataError):
    """Segment labels cannot be mapped onto the whole-text tokenization."""


class Encoder:
    def __init__(
        self,
        tokenizer,
        template: ChatTemplate,
        *,
        max_length: int | None,
        image_tokens: ImageTokens,
        max_image_tokens: int | None = None,
        last_turn_only: bool = False,
        check: bool = True,
        chat: bool = True,
    ):
        """`image_tokens`: what an image costs, a fixed count (0: a text-only model) or the any-resolution
        geometry (then every encode needs the images' sizes); `max_image_tokens`: the most a sample's images
        may carry together (more: dropped)."""
        if isinstance(image_tokens, int) and image_tokens < 0:
            raise ValueError(f"image_tokens must be >= 0 (0: a text-only model), got {image_tokens}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 or None, got {max_length}")
        if max_image_tokens is not None and max_image_tokens < 1:
            raise ValueError(f"max_image_tokens must be >= 1 or None, got {max_image_tokens}")
        self.tokenizer, self.template = tokenizer, template
        self.max_length, self.image_tokens = max_length, image_tokens
        self.max_image_tokens = max_image_tokens
        self.last_turn_only, self.check = last_turn_only, check
        self.bos = tokenizer.bos_token or ""
        self.eos = tokenizer.eos_token or ""
        # chat False: only plain text (incremental pretraining) is encoded, which never uses the template's markers.
        self._check_special_tokens(self.template.special_tokens if chat else ())
        self.bos_id = self._ids(self.bos)[0] if self.bos else None

    def _check_special_tokens(self, markers) -> None:
        """Template markers must be single special ids, else labels and stop words silently degrade."""
        for text in (self.bos, self.eos, *markers):
            if text and len(ids := self._ids(text)) != 1:
                raise ValueError(
                    f"{type(self.tokenizer).__name__} encodes {text!r} as {len(ids)} tokens {ids}; the "
                    f"'{self.template.name}' template needs it as one special token (tokenizer.add_special_tokens)"
                )

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def render(self, conv: Conversation) -> tuple[list[Segment], str]:
        """The template's segments and their joined text, checked (shared with the batched path in prepare.py)."""
        where = conv.where
        if conv.images and self.image_tokens == 0:
            raise DataError(
                where, f"record has {len(conv.images)} image(s) but the model has no vision tower"
            )
        segments = self.template.segments(
            conv, bos=self.bos, eos=self.eos, last_turn_only=self.last_turn_only
        )
        text = "".join(s.text for s in segments)
        if text.count(IMAGE_TOKEN) != conv.num_image_markers():
            raise DataError(
                where, f"template {self.template.name!r} changed the number of {IMAGE_TOKEN} markers"
            )
        return segments, text

    @property
    def anyres(self) -> bool:
        """Whether an image's token count depends on its size (then encoding needs the sizes)."""
        return isinstance(self.image_tokens, AnyresGeometry)

    def image_counts(self, where: str, num_images: int, image_sizes: Sizes) -> list[int]:
        """Tokens of each of `num_images` images (of the record `where`): the fixed count, or from each
        image's (height, width) in `image_sizes` under any-resolution geometry (required then)."""
        rule = self.image_tokens
        if isinstance(rule, int):
            return [rule] * num_images
        if image_sizes is None or len(image_sizes) != num_images:
            given = "none" if image_sizes is None else str(len(image_sizes))
            raise DataError(
                where,
                f"any-resolution image tokens depend on each image's size: {num_images} image(s), {given} "
                "size(s) (height, width) given",
            )
        return [rule.num_tokens(int(h), int(w)) for h, w in image_sizes]

    def encode(self, conv: Conversation, image_sizes: Sizes = None) -> TokenizedSample:
        return self.encode_compact(conv, image_sizes).expand()

    def encode_compact(self, conv: Conversation, image_sizes: Sizes = None) -> CompactSample:
        """The sample with one IMAGE_TOKEN_INDEX per image; drops raise `DroppedSample`. `image_sizes`: each
        image's (height, width), needed with any-resolution geometry."""
        where = conv.where
        segments, text = self.render(conv)
        ids, labels = self._encode_segments(segments)
        realigned = False
        if self.check:
            whole = self._encode_whole(text)
            if whole != ids:
                ids, labels = self._realign(segments, text, where)
                realigned = True
        return self.finish(conv, ids, labels, realigned, image_sizes)

    def finish(
        self,
        conv: Conversation,
        ids: list[int],
        labels: list[int],
        realigned: bool,
        image_sizes: Sizes = None,
    ) -> CompactSample:
        """Compact ids and labels of the rendered text -> the sample: leading ids, then `apply_limits`."""
        if lead := self.leading_ids(conv):  # plain text: BOS as an id, as tokenizer(text) puts it
            ids, labels = lead + ids, [IGNORE_INDEX] * len(lead) + labels
        counts = self.image_counts(conv.where, ids.count(IMAGE_TOKEN_INDEX), image_sizes)
        ids, labels, truncated = apply_limits(
            ids,
            labels,
            image_tokens=counts,
            max_length=self.max_length,
            where=conv.where,
            max_image_tokens=self.max_image_tokens,
        )
        # Truncation never cuts an image, so every marker (and its count) is still there.
        return CompactSample(ids, labels, len(counts), counts, truncated, realigned, trimmed=conv.trimmed)

    def leading_ids(self, conv: Conversation) -> list[int]:
        """Untrained ids before the rendered text: BOS for a plain-text record (the template leaves it out)."""
        return [self.bos_id] if conv.kind == "text" and self.bos_id is not None else []

    def encode_prompt(self, conv: Conversation, image_sizes: Sizes = None) -> list[int]:
        """Inference prompt ids: the conversation (ending on a user turn) plus the generation prompt, tokenized
        as a whole exactly like training text, each image expanded to its tokens (`image_sizes` as for
        `encode_compact`). No labels, no truncation."""
        segments = self.template.segments(conv, bos=self.bos, eos=self.eos, add_generation_prompt=True)
        return self.encode_text("".join(s.text for s in segments), image_sizes, conv.where)

    def encode_text(self, text: str, image_sizes: Sizes = None, where: str = "<text>") -> list[int]:
        """Rendered text -> ids, tokenized as a whole between image markers, each image expanded to its tokens
        (`image_sizes` as for `encode_compact`; `where` names the record in errors). No labels, no truncation."""
        ids = self._encode_whole(text)
        counts = self.image_counts(where, ids.count(IMAGE_TOKEN_INDEX), image_sizes)
        return expand_images(ids, ids, counts)[0]

    # ------------------------------------------------------------ the two tokenizations (images compact)

    def _encode_segments(self, segments: list[Segment]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        for seg in segments:
            for k, part in enumerate(seg.text.split(IMAGE_TOKEN)):
                if k:  # an image sits between two parts: atomic, never trained
                    ids.append(IMAGE_TOKEN_INDEX)
                    labels.append(IGNORE_INDEX)
                part_ids = self._ids(part) if part else []
                ids += part_ids
                labels += part_ids if seg.trainable else [IGNORE_INDEX] * len(part_ids)
        return ids, labels

    def _encode_whole(self, text: str) -> list[int]:
        """Ids of the text tokenized between image markers; each image as one IMAGE_TOKEN_INDEX."""
        ids: list[int] = []
        for k, part in enumerate(text.split(IMAGE_TOKEN)):
            if k:
                ids.append(IMAGE_TOKEN_INDEX)
            ids += self._ids(part) if part else []
        return ids

    def _realign(self, segments: list[Segment], text: str, where: str) -> tuple[list[int], list[int]]:
        """Whole-text ids, labels from which segment each token's characters come from."""
        trained_chars = bytearray(len(text))
        starts, pos = [], 0  # starts: (char offset, trainable) of each segment
        for seg in segments:
            starts.append((pos, seg.trainable))
            if seg.trainable:
                trained_chars[pos : pos + len(seg.text)] = b"\x01" * len(seg.text)
            pos += len(seg.text)
        ids: list[int] = []
        labels: list[int] = []
        chunk_start = 0
        for k, chunk in enumerate(text.split(IMAGE_TOKEN)):
            if k:
                ids.append(IMAGE_TOKEN_INDEX)
                labels.append(IGNORE_INDEX)
            if chunk:
                if getattr(self.tokenizer, "is_fast", False):
                    chunk_ids, flags = self._flags_from_offsets(chunk, chunk_start, trained_chars)
                else:
                    chunk_ids, flags = self._flags_from_prefixes(chunk, chunk_start, starts, text, where)
                ids += chunk_ids
                labels += [t if f else IGNORE_INDEX for t, f in zip(chunk_ids, flags)]
            chunk_start += len(chunk) + len(IMAGE_TOKEN)
        return ids, labels

    def _flags_from_offsets(
        self, chunk: str, start: int, trained_chars: bytearray
    ) -> tuple[list[int], list[bool]]:
        """A token is trained if any of its characters is; an empty-span token goes with its position."""
        enc = self.tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
        flags = []
        for s, e in enc["offset_mapping"]:
            s, e = start + s, start + max(e, s + 1)
            flags.append(1 in trained_chars[s : min(e, start + len(chunk))])
        return enc["input_ids"], flags

    def _flags_from_prefixes(
        self, chunk: str, start: int, starts: list[tuple[int, bool]], text: str, where: str
    ) -> tuple[list[int], list[bool]]:
        """Slow tokenizers have no offsets: a segment boundary at character c is a token boundary iff
        tokenizing the chunk up to c gives a prefix of the chunk's ids."""
        chunk_ids = self._ids(chunk)
        end = start + len(chunk)
        flag = next(t for c, t in reversed(starts) if c <= start)
        flags: list[bool] = []
        for c, trainable in starts:
            if not start < c < end:
                continue
            head = self._ids(text[start:c])
            if chunk_ids[: len(head)] != head:
                k = next(
                    (i for i, (a, b) in enumerate(zip(head, chunk_ids)) if a != b),
                    min(len(head), len(chunk_ids)),
                )
                token = self.tokenizer.convert_ids_to_tokens(chunk_ids[k]) if k < len(chunk_ids) else None
                raise TokenizationMismatch(
                    where,
                    f"segment/whole tokenization mismatch at token {k} of the text starting at character {start}: "
                    f"token {token!r} spans the start of a {'trained' if trainable else 'untrained'} segment "
                    f"(character {c}); the tokenizer has no offsets to split it",
                )
            flags += [flag] * (len(head) - len(flags))
            flag = trainable
        flags += [flag] * (len(chunk_ids) - len(flags))
        return chunk_ids, flags


@dataclass
class EncodeStats:
    records: int = 0
    kept: int = 0
    truncated: int = 0
    trimmed: int = 0
    """Kept samples whose record opened with an assistant turn, left out as LLaVA-1.5 does."""
    realigned: int = 0
    """Samples whose labels `Encoder.encode` reassigned by character position. Only that path counts them:
    `prepare` tokenizes segments apart only for the records it hands to it, so the summary leaves this out."""
    mismatched: int = 0
    failed: int = 0
    """Other DataErrors (e.g. a template rejecting the roles) skipped under skip_bad."""
    skipped: int = 0
    """Records skipped under skip_bad before encoding (unreadable, not convertible, an image file missing), counted
    in `records`. Only totals that fold them in set it (`add_bad`, training's build_dataset); `prepare` and
    `encode_all` keep them in their `BadRecords`."""
    total_tokens: int = 0
    supervised_tokens: int = 0
    image_tokens: int = 0
    tokens_per_image: Counter = field(default_factory=Counter)
    """Image tokens -> kept images carrying that many."""
    tokens_per_sample: Counter = field(default_factory=Counter)
    """Image tokens -> kept samples whose images carry that many together (samples with images only)."""
    dropped: Counter = field(default_factory=Counter)
    """reason -> count"""
    problems: list[tuple[str, str]] = field(default_factory=list)
    """(where, problem) for every record dropped, mismatched, failed or skipped."""

    def add(self, sample: CompactSample) -> None:
        """A kept sample."""
        self.records += 1
        self.kept += 1
        self.truncated += sample.truncated
        self.trimmed += sample.trimmed
        self.realigned += sample.realigned
        self.total_tokens += sample.length
        self.supervised_tokens += len(sample.labels) - sample.labels.count(IGNORE_INDEX)
        self.image_tokens += sum(sample.image_tokens)
        self.tokens_per_image.update(sample.image_tokens)
        if sample.image_tokens:
            self.tokens_per_sample[sum(sample.image_tokens)] += 1

    def add_error(self, err: DataError) -> None:
        """A record that was encoded but is not kept: dropped (policy), mismatched or failed (skip_bad)."""
        self.records += 1
        if isinstance(err, DroppedSample):
            self.dropped[err.reason] += 1
        elif isinstance(err, TokenizationMismatch):
            self.mismatched += 1
        else:
            self.failed += 1
        self.problems.append((err.where, err.problem))

    def unkeep(
        self, problems: list[tuple[str, str]], total: int, supervised: int, image: list[list[int]]
    ) -> None:
        """Kept samples found bad afterwards (an image file missing): moved from `kept` to `skipped`, their
        tokens (total, supervised, and `image`: each one's per-image counts) taken off. `truncated`, `trimmed`
        and `realigned` keep them: they are not stored per sample."""
        self.kept -= len(problems)
        self.skipped += len(problems)
        self.total_tokens -= total
        self.supervised_tokens -= supervised
        for counts in image:
            self.image_tokens -= sum(counts)
            self.tokens_per_image.subtract(counts)
            if counts:
                self.tokens_per_sample[sum(counts)] -= 1
        self.tokens_per_image, self.tokens_per_sample = +self.tokens_per_image, +self.tokens_per_sample
        self.problems += problems

    def take_unkept(self, count: int) -> list[tuple[str, str]]:
        """The problems of the last `count` samples `unkeep` moved to `skipped`, taken out of `skipped` and
        `problems` (for a report that lists them with the bad records instead)."""
        taken = self.problems[len(self.problems) - count :]
        del self.problems[len(self.problems) - count :]
        self.skipped -= count
        return taken

    def add_bad(self, bad: BadRecords) -> EncodeStats:
        """Fold in records skipped before encoding, so the totals account for every record; returns self."""
        self.records += len(bad)
        self.skipped += len(bad)
        self.problems += bad.items
        return self

    def merge(self, other: EncodeStats) -> EncodeStats:
        """Add `other` into this one (e.g. over sources or shards); returns self."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self, max_problems: int = 100) -> dict:
        """JSON-ready counts for run reports (the first `max_problems` problems listed)."""
        out = asdict(self)
        for name in ("dropped", "tokens_per_image", "tokens_per_sample"):  # asdict rebuilds a Counter wrongly
            out[name] = dict(getattr(self, name))
        out["problems"] = [list(p) for p in self.problems[:max_problems]]
        out["num_problems"] = len(self.problems)
        return out

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def image_token_lines(self) -> list[str]:
        """The image-token distribution (min, median, p95, max) per image and per sample with images; none
        without images."""
        return [
            f"image tokens per {what}: {_distribution(counts)}"
            for what, counts in (("image", self.tokens_per_image), ("sample", self.tokens_per_sample))
            if counts
        ]

    def summary(self, limit: int = 20) -> str:
        text_tokens = self.total_tokens - self.image_tokens
        share = self.supervised_tokens / text_tokens if text_tokens else 0.0
        lines = [
            f"records {self.records}: kept {self.kept}, truncated {self.truncated}, dropped {self.num_dropped}, "
            f"mismatched {self.mismatched}, failed {self.failed}"
            + (f", skipped {self.skipped}" if self.skipped else "")
            + (f", trimmed {self.trimmed} (opening assistant turn left out)" if self.trimmed else ""),
            f"tokens {self.total_tokens} (image {self.image_tokens}, supervised {self.supervised_tokens} = "
            f"{share:.1%} of text tokens)",
        ]
        lines += [f"  dropped ({reason}): {n}" for reason, n in self.dropped.most_common()]
        lines += [f"  {where}: {problem}" for where, problem in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)


def _distribution(counts: Counter) -> str:
    """min / median / p95 / max (nearest rank) of the values a histogram (value -> how many) holds."""
    values = sorted(counts)
    n = sum(counts.values())

    def rank(p: float) -> int:
        k, seen = max(1, math.ceil(p / 100 * n)), 0
        for v in values:
            seen += counts[v]
            if seen >= k:
                return v
        return values[-1]

    return f"min {values[0]}  median {rank(50)}  p95 {rank(95)}  max {values[-1]}  ({n})"


def encode_all(
    convs: Iterable[Conversation], encoder: Encoder, *, skip_bad: bool = False, keep_convs: bool = False
) -> tuple[list, EncodeStats]:
    """Encode every conversation. Drops are policy (counted, reported); mismatches and other bad records raise
    unless `skip_bad`, in which case they are counted too. Returns the samples, or with `keep_convs`
    (conversation, sample) pairs, for callers that need the images of each kept sample."""
    samples: list = []
    stats = EncodeStats()
    for conv in convs:
        try:
            sample = encoder.encode_compact(conv)
        except DataError as err:
            if not skip_bad and not isinstance(err, DroppedSample):
                raise
            stats.add_error(err)
            continue
        stats.add(sample)
        samples.append((conv, sample.expand()) if keep_convs else sample.expand())
    return samples, stats
