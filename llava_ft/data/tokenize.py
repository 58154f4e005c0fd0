"""Segments -> input_ids + labels, with `<image>` expanded to N placeholder ids.

Labels are built segment by segment and checked against the whole conversation tokenized at once (split
only at image markers), because that is what the model sees at inference. Where they differ (a tokenizer
that merges across a segment boundary, or sentencepiece's dummy prefix at each call), the whole-text ids are
kept and labels are assigned from character positions: offsets on fast tokenizers, prefix tokenization on
slow ones. Only when that is impossible is the record rejected, counted as a mismatch. Labels are not
shifted: the causal LM shifts them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields

from llava_ft.constants import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX
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
        num_image_tokens: int,
        last_turn_only: bool = False,
        check: bool = True,
        chat: bool = True,
    ):
        if num_image_tokens < 0:
            raise ValueError(f"num_image_tokens must be >= 0 (0: a text-only model), got {num_image_tokens}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1 or None, got {max_length}")
        self.tokenizer, self.template = tokenizer, template
        self.max_length, self.num_image_tokens = max_length, num_image_tokens
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
        if conv.images and not self.num_image_tokens:
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

    def encode(self, conv: Conversation) -> TokenizedSample:
        where = conv.where
        segments, text = self.render(conv)
        ids, labels = self._encode_segments(segments)
        realigned = False
        if self.check:
            whole = self._encode_whole(text)
            if whole != ids:
                ids, labels = self._realign(segments, text, where)
                realigned = True
        if lead := self.leading_ids(conv):  # plain text: BOS as an id, as tokenizer(text) puts it
            ids, labels = lead + ids, [IGNORE_INDEX] * len(lead) + labels
        if all(label == IGNORE_INDEX for label in labels):
            raise nothing_trained(where)
        ids, labels, truncated = self._truncate(ids, labels, where)
        # Truncation never cuts an image, so every marker is still there.
        return TokenizedSample(ids, labels, text.count(IMAGE_TOKEN), truncated, realigned)

    def leading_ids(self, conv: Conversation) -> list[int]:
        """Untrained ids before the rendered text: BOS for a plain-text record (the template leaves it out)."""
        return [self.bos_id] if conv.kind == "text" and self.bos_id is not None else []

    def encode_prompt(self, conv: Conversation) -> list[int]:
        """Inference prompt ids: the conversation (ending on a user turn) plus the generation prompt, tokenized
        as a whole exactly like training text. No labels, no truncation."""
        segments = self.template.segments(conv, bos=self.bos, eos=self.eos, add_generation_prompt=True)
        return self._encode_whole("".join(s.text for s in segments))

    # ------------------------------------------------------------ the two tokenizations

    def _image_span(self) -> list[int]:
        return [IMAGE_TOKEN_INDEX] * self.num_image_tokens

    def _encode_segments(self, segments: list[Segment]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        for seg in segments:
            for k, part in enumerate(seg.text.split(IMAGE_TOKEN)):
                if k:  # an image sits between two parts: atomic, never trained
                    ids += self._image_span()
                    labels += [IGNORE_INDEX] * self.num_image_tokens
                part_ids = self._ids(part) if part else []
                ids += part_ids
                labels += part_ids if seg.trainable else [IGNORE_INDEX] * len(part_ids)
        return ids, labels

    def _encode_whole(self, text: str) -> list[int]:
        ids: list[int] = []
        for k, part in enumerate(text.split(IMAGE_TOKEN)):
            if k:
                ids += self._image_span()
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
                ids += self._image_span()
                labels += [IGNORE_INDEX] * self.num_image_tokens
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

    def _truncate(self, ids: list[int], labels: list[int], where: str) -> tuple[list[int], list[int], bool]:
        """Cut text after the last image span; images never get cut, so a sample whose images don't fit is dropped."""
        if self.max_length is None or len(ids) <= self.max_length:
            return ids, labels, False
        images_end = max((i + 1 for i, t in enumerate(ids) if t == IMAGE_TOKEN_INDEX), default=0)
        check_images_fit(images_end, self.max_length, where)
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise nothing_trained_after_truncation(self.max_length, where)
        return ids, labels, True


def check_images_fit(images_end: int, max_length: int, where: str) -> None:
    """Truncation cuts text only: a sample whose last image span ends past max_length is dropped."""
    if images_end > max_length:
        raise DroppedSample(
            where,
            "images do not fit",
            f"the last image span ends at token {images_end} > max_length {max_length}",
        )


def nothing_trained(where: str) -> DroppedSample:
    return DroppedSample(where, "no supervised tokens", "every assistant turn is opted out or empty")


def nothing_trained_after_truncation(max_length: int, where: str) -> DroppedSample:
    return DroppedSample(where, "no supervised tokens after truncation", f"max_length {max_length}")


@dataclass
class EncodeStats:
    records: int = 0
    kept: int = 0
    truncated: int = 0
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
    dropped: Counter = field(default_factory=Counter)
    """reason -> count"""
    problems: list[tuple[str, str]] = field(default_factory=list)
    """(where, problem) for every record dropped, mismatched, failed or skipped."""

    def add(self, sample: TokenizedSample) -> None:
        self.kept += 1
        self.truncated += sample.truncated
        self.realigned += sample.realigned
        self.total_tokens += len(sample.input_ids)
        self.supervised_tokens += sum(1 for label in sample.labels if label != IGNORE_INDEX)
        self.image_tokens += sum(1 for t in sample.input_ids if t == IMAGE_TOKEN_INDEX)

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
        out["dropped"] = dict(self.dropped)
        out["problems"] = [list(p) for p in self.problems[:max_problems]]
        out["num_problems"] = len(self.problems)
        return out

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def summary(self, limit: int = 20) -> str:
        text_tokens = self.total_tokens - self.image_tokens
        share = self.supervised_tokens / text_tokens if text_tokens else 0.0
        lines = [
            f"records {self.records}: kept {self.kept}, truncated {self.truncated}, dropped {self.num_dropped}, "
            f"mismatched {self.mismatched}, failed {self.failed}"
            + (f", skipped {self.skipped}" if self.skipped else ""),
            f"tokens {self.total_tokens} (image {self.image_tokens}, supervised {self.supervised_tokens} = "
            f"{share:.1%} of text tokens)",
        ]
        lines += [f"  dropped ({reason}): {n}" for reason, n in self.dropped.most_common()]
        lines += [f"  {where}: {problem}" for where, problem in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)


def encode_all(
    convs: Iterable[Conversation], encoder: Encoder, *, skip_bad: bool = False, keep_convs: bool = False
) -> tuple[list, EncodeStats]:
    """Encode every conversation. Drops are policy (counted, reported); mismatches and other bad records raise
    unless `skip_bad`, in which case they are counted too. Returns the samples, or with `keep_convs`
    (conversation, sample) pairs, for callers that need the images of each kept sample."""
    samples: list = []
    stats = EncodeStats()
    for conv in convs:
        stats.records += 1
        try:
            sample = encoder.encode(conv)
        except DroppedSample as err:
            stats.dropped[err.reason] += 1
            stats.problems.append((err.where, err.problem))
            continue
        except DataError as err:
            if not skip_bad:
                raise
            if isinstance(err, TokenizationMismatch):
                stats.mismatched += 1
            else:
                stats.failed += 1
            stats.problems.append((err.where, err.problem))
            continue
        samples.append((conv, sample) if keep_convs else sample)
        stats.add(sample)
    return samples, stats
