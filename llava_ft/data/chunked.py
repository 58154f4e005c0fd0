"""Exact tokenization of chat text, memoised per word, for the common fast-tokenizer pipelines.

Preparation sees the same words millions of times, and the tokenizer's Rust call costs more than looking them
up: `ChunkedTokenizer` splits the text as the pipeline does (added tokens, then pieces that the model tokenizes
independently), tokenizes each distinct piece once with the tokenizer's own model and returns the ids and cut
positions that `backend.encode(text, add_special_tokens=False)` gives. It reads the pipeline from the tokenizer's
JSON and handles three layouts: sentencepiece-style BPE with a non-splitting Metaspace (Llama, Mistral), plain
sentencepiece through sp_convert's twin (InternLM2), and byte-level BPE with Split regexes (GPT-2, Llama-3,
Qwen2, DeepSeek; the regexes restated for Python's `re` on ASCII spans, other spans take the Rust call).
Anything else, or a disagreement with the Rust pipeline on a probe text, makes `ChunkedTokenizer.of` return
None and preparation keeps the Rust call.
"""

from __future__ import annotations

import bisect
import json
import logging
import random
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate, chain
from typing import Any

import tokenizers
import tokenizers.models

log = logging.getLogger("llava_ft")

MAX_CACHED = 1 << 19
"""Pieces remembered before the memo is emptied (about 100 MB); real corpora repeat most words."""
_NOT_PLAIN = re.compile(r"[^\x20-\x7e\t\n\r]")  # byte-level: a span with one of these takes the Rust call
_PLAIN = [chr(c) for c in range(0x20, 0x7F)] + ["\t", "\n", "\r"]
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# sp_convert's words for a vocabulary with pieces that hold "▁" after the characters in the class (InternLM2's).
_SP_WORDS = re.compile(r"▁\*\(\?:\[\^▁(?P<c>[^\]\[]+)\]\+\|\[(?P=c)\]▁\*\)\+\|▁\+")
_PROPERTY = re.compile(r"\\([pP])\{(\w+)\}")
_ANCHOR_ESCAPES = ("A", "Z", "z", "G", "b", "B")
_GROUP_OPENINGS = ("(?:", "(?=", "(?!", "(?<=", "(?<!", "(?>", "(?i:")
_CATEGORIES = {"L", "M", "N", "P", "S", "Z", "C", "Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd", "Nl", "No",
               "Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "Sm", "Sc", "Sk", "So", "Zs", "Zl", "Zp", "Cc", "Cf", "Cs",
               "Co", "Cn"}  # fmt: skip


class ChunkedTokenizer:
    """`encode(text, cuts)`: the backend's ids for `text` and the token index at each cut character."""

    def __init__(
        self,
        backend,
        data: dict,
        kind: str,
        split: Callable[[str], list[str]] | None,
        prepend: str,
        respelled: dict[str, str] | None = None,
    ):
        self.backend = backend
        self.kind = kind
        """"metaspace" or "bytelevel"."""
        self._split = split
        # metaspace: "always" or "first" (a "▁" unless the text starts with one), "dummy" (one always), "never"
        self._prepend = prepend
        added = data["added_tokens"]
        # The backend finds added tokens that skip normalization first, then the others in what is left.
        raw = [t["content"] for t in added if not t["normalized"]]
        normalized = [t["content"] for t in added if t["normalized"]]
        self._added_id = {t["content"]: t["id"] for t in added}
        # The sp twin's normalizer respells old names of added tokens first (sp_convert: no overlaps with other
        # tokens, so matching the old spelling as the token is the same).
        for old, new in (respelled or {}).items():
            normalized.append(old)
            self._added_id[old] = self._added_id[new]
        self._added = re.compile(_trie_pattern(raw)) if raw else None
        self._added_normalized = re.compile(_trie_pattern(normalized)) if normalized else None
        self._spaces_normalized = False
        """Whether the normalizer turns spaces into `_rep` before normalized added tokens are matched."""
        self._model = backend.model
        self._ids: dict[str, list[int]] = {}
        self._starts: dict[str, list[int]] = {}
        if kind == "bytelevel":
            self._bytes = {i: c for i, c in _bytes_to_unicode().items() if i < 128}

    # ------------------------------------------------------------ construction

    @classmethod
    def of(cls, tokenizer) -> ChunkedTokenizer | None:
        """For a transformers fast tokenizer whose pipeline this class reproduces exactly, else None."""
        if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "split_special_tokens", False):
            return None
        backend = tokenizer.backend_tokenizer
        try:
            made = cls._build(backend, _pipeline(backend))
        except (AttributeError, KeyError, TypeError, ValueError, re.error) as err:  # a layout we do not read
            log.debug("chunked tokenization off: %s", err)
            return None
        try:
            agrees = made is None or made._agrees_with_backend()
        except Exception as err:  # noqa: BLE001 - e.g. a model that cannot tokenize a probe character
            log.debug("chunked tokenization off: the probe text failed (%s)", err)
            return None
        if not agrees:
            log.warning("chunked tokenization off: it disagrees with the tokenizer on the probe text")
            return None
        return made

    @classmethod
    def _build(cls, backend, data: dict[str, Any]) -> ChunkedTokenizer | None:
        model, pre, norm = data["model"], data["pre_tokenizer"], data["normalizer"]
        if model["type"] != "BPE" or model.get("dropout") or model.get("continuing_subword_prefix"):
            return None
        if model.get("end_of_word_suffix"):
            return None
        added = data["added_tokens"]
        if any(t["lstrip"] or t["rstrip"] or t["single_word"] for t in added):
            return None
        if data["truncation"] or data["padding"]:
            return None  # preparation turns both off first (BatchEncoder)
        if not _keeps_offsets(data["post_processor"]):
            return None  # offsets trimmed after the model: cut indices would differ
        if pre and pre["type"] == "Metaspace":
            # The model sees each span between added tokens as one word; we cut before each run of "▁" that
            # follows another character. No merge crosses such a cut when no vocabulary entry holds a "▁" after
            # another character (checked), and merges that cannot cross a cut happen in the same order either way.
            if norm is not None or pre.get("split", True) or model.get("ignore_merges"):
                return None
            rep = pre["replacement"]
            crossing = re.compile(f"[^{re.escape(rep)}]{re.escape(rep)}")
            vocab = backend.get_vocab(with_added_tokens=False)
            if any(crossing.search(token) for token in vocab):
                return None  # a merge could cross a chunk cut
            if model.get("fuse_unk") and rep not in vocab:
                return None  # an unknown character and an unknown "▁" after it would fuse across the cut
            made = cls(backend, data, "metaspace", None, pre["prepend_scheme"])
            made._rep = rep
            made._chunk = re.compile(f"{re.escape(rep)}*[^{re.escape(rep)}]+|{re.escape(rep)}+")
            return made
        # sp_convert's twin of plain sentencepiece
        if (spm := _sentencepiece_words(norm, pre, added)) is not None:
            rep, dummy, words, respelled = spm
            made = cls(backend, data, "metaspace", None, "dummy" if dummy else "never", respelled)
            made._rep, made._chunk = rep, re.compile(words)
            made._spaces_normalized = True
            return made
        if not _identity_on_ascii(norm):
            return None
        if _normalizes(norm) and any(t["normalized"] for t in added):
            return None  # matched on normalized text, which the split at added tokens does not see
        steps = pre["pretokenizers"] if pre and pre["type"] == "Sequence" else [pre]
        last = steps[-1] if steps and steps[-1] else {}
        if last.get("type") != "ByteLevel" or last.get("add_prefix_space"):
            return None
        patterns = []
        for step in steps[:-1]:
            if step["type"] != "Split" or step["behavior"] != "Isolated" or step["invert"]:
                return None
            pattern = step["pattern"]
            patterns.append(pattern["Regex"] if "Regex" in pattern else re.escape(pattern["String"]))
        if last.get("use_regex", True):
            patterns.append(_GPT2_PATTERN)
        regexes = [re.compile(f"({_ascii_pattern(p)})", re.ASCII) for p in patterns]
        if any(rx.groups != 1 for rx in regexes):
            return None
        # After an empty match Python tries again at the same place and Oniguruma moves on: refuse patterns
        # that match empty (in front of any one character, or alone).
        if any(rx.match(c) is not None and not rx.match(c).group() for rx in regexes for c in _PLAIN + [""]):
            return None
        return cls(backend, data, "bytelevel", _isolating(regexes), "never")

    def _agrees_with_backend(self) -> bool:
        rng = random.Random(0)
        alphabet = [chr(c) for c in range(32, 127)] + ["\n", "\t", "\r", "  ", "é", "中文", "\u2581", "🙂"]
        words = ["the", " cat", "Hello", "don't", "3.14", "1234567", "\n\n", "   ", *self._added_id]
        probe = "".join(
            rng.choice(alphabet) if rng.random() < 0.5 else rng.choice(words) for _ in range(3000)
        )
        texts = [probe, " " + probe, probe[1:] + " ", "x", " ", "\n"]
        for t in texts:
            got = self.encode(t, [])
            if got is not None and got[0] != self.backend.encode(t, add_special_tokens=False).ids:
                return False
        return True

    # ------------------------------------------------------------ encoding

    def encode(self, text: str, cuts: list[int]) -> tuple[list[int], list[int | None]] | None:
        """Ids of `text`, and for each cut (ascending characters, 0 < cut < len(text)) the index of the first
        token at or after it, or None where a token spans it; None for a text that the Encoder must judge."""
        try:
            return self._encode(text, cuts)
        except _EncoderMustJudge:
            return None

    def _encode(self, text: str, cuts: list[int]) -> tuple[list[int], list[int | None]]:
        out: list[int] = []
        at: list[int | None] = []
        pos = 0
        k = 0  # next cut
        spans = self._added_tokens(text)
        for m in spans:
            start = m.start()
            if start > pos:
                k = self._span(text, pos, start, cuts, k, out, at)
            while k < len(cuts) and cuts[k] <= m.end():
                at.append(len(out) if cuts[k] == start else len(out) + 1 if cuts[k] == m.end() else None)
                k += 1
            out.append(self._added_id[m.group()])
            pos = m.end()
        if pos < len(text):
            k = self._span(text, pos, len(text), cuts, k, out, at)
        while k < len(cuts):  # at the very end
            at.append(len(out))
            k += 1
        return out, at

    def _added_tokens(self, text: str) -> Iterable[re.Match]:
        first, then = self._added, self._added_normalized
        if then is None:
            return first.finditer(text) if first is not None else ()
        # Normalized tokens are matched on what the normalizer gives: for the sp twin, spaces as "▁" (the same
        # length, so positions hold); other pipelines get here only when they leave the tokens' text alone.
        seen = text.replace(" ", self._rep) if self._spaces_normalized else text
        if first is None:
            return then.finditer(seen)
        return self._two_passes(text, seen, first, then)

    @staticmethod
    def _two_passes(text: str, seen: str, first: re.Pattern, then: re.Pattern) -> Iterator[re.Match]:
        pos = 0
        for m in first.finditer(text):
            yield from then.finditer(seen, pos, m.start())
            yield m
            pos = m.end()
        yield from then.finditer(seen, pos)

    def _span(self, text: str, a: int, b: int, cuts: list[int], k: int, out: list[int], at: list) -> int:
        """Appends the ids of text[a:b] (no added token inside) and the index at each cut in [a, b); returns
        the next cut."""
        s = text[a:b]
        if self.kind == "metaspace":
            shift = 0
            s = s.replace(" ", self._rep)
            if self._prepend == "dummy" or (
                (self._prepend == "always" or (self._prepend == "first" and a == 0))
                and not s.startswith(self._rep)
            ):
                s, shift = self._rep + s, 1
            pieces = self._chunk.findall(s)
        elif _NOT_PLAIN.search(s) is None:
            shift, pieces = 0, self._split(s)
        else:
            return self._rust_span(s, a, b, cuts, k, out, at)
        ids = self._ids
        if k == len(cuts) or cuts[k] >= b:  # the common case: no cut inside
            got = list(map(ids.get, pieces))
            if None in got:
                got = [g if g is not None else self._tokenize(p) for g, p in zip(got, pieces)]
            out += chain.from_iterable(got)
            return k
        pos = a - shift  # text position of the current piece
        for piece in pieces:
            end = pos + len(piece)
            while k < len(cuts) and cuts[k] < end:
                inside = self._token_starts(piece)
                j = bisect.bisect_left(inside, cuts[k] - pos)
                clean = j < len(inside) and inside[j] == cuts[k] - pos
                at.append(len(out) + j if clean else None)
                k += 1
            got = ids.get(piece)
            out += got if got is not None else self._tokenize(piece)
            pos = end
        return k

    def _rust_span(self, s: str, a: int, b: int, cuts: list[int], k: int, out: list[int], at: list) -> int:
        enc = self.backend.encode(s, add_special_tokens=False)
        end = bisect.bisect_left(cuts, b, k)
        inside = cut_tokens(enc, len(s), [c - a for c in cuts[k:end]])
        if inside is None:
            raise _EncoderMustJudge
        at += [None if j is None else len(out) + j for j in inside]
        out += enc.ids
        return end

    def _model_tokens(self, piece: str) -> tuple[str, list]:
        """The word the model sees for `piece` (byte-level: bytes as characters) and its tokens."""
        word = piece.translate(self._bytes) if self.kind == "bytelevel" else piece
        return word, self._model.tokenize(word)

    def _tokenize(self, piece: str) -> list[int]:
        if len(self._ids) >= MAX_CACHED:
            self._ids.clear()
            self._starts.clear()
        ids = self._ids[piece] = [t.id for t in self._model_tokens(piece)[1]]
        return ids

    def _token_starts(self, piece: str) -> list[int]:
        """Character offsets in `piece` where its tokens start (one per token)."""
        starts = self._starts.get(piece)
        if starts is None:
            word, tokens = self._model_tokens(piece)
            starts = [t.offsets[0] for t in tokens]  # UTF-8 bytes of `word`
            if not word.isascii():  # a byte-fallback token starting inside a character counts as its start
                char_bytes = list(accumulate((len(ch.encode()) for ch in word), initial=0))
                starts = [bisect.bisect_right(char_bytes, x) - 1 for x in starts]
            self._starts[piece] = starts
        return starts


class _EncoderMustJudge(Exception):
    """A text whose token boundaries this path cannot place for sure: the Encoder decides it."""


def cut_tokens(enc, length: int, cuts: list[int]) -> list[int | None] | None:
    """`token_boundary` at each cut of a text of `length` characters, or None when its last token is empty (which
    side of a cut such a token is on is the Encoder's call)."""
    if enc.ids and enc.token_to_chars(len(enc.ids) - 1)[0] >= length:
        return None
    return [token_boundary(enc, c, length) for c in cuts]


def token_boundary(enc, c: int, chunk_len: int) -> int | None:
    """Index of the first token of a `tokenizers` Encoding at or after character c when c is a clean boundary,
    else None.

    Clean: the tokens before it end at or before c and the tokens after it start at or after c, with no
    trimmed gap around c (a gap's characters belong to a neighbour that the offsets do not show). The common
    case (a token starting exactly at c, the one before it ending by c) is read from two tokens; every other
    case from all the offsets."""
    j = enc.char_to_token(c)
    if j is not None and enc.token_to_chars(j)[0] == c:
        if j == 0:
            return 0
        before_start, before_end = enc.token_to_chars(j - 1)
        if before_start < c and before_end <= c:
            return j
    offsets = enc.offsets
    i = bisect.bisect_left([s for s, _ in offsets], c)
    left_end = offsets[i - 1][1] if i else 0
    right_start = offsets[i][0] if i < len(offsets) else chunk_len
    if left_end > c or left_end < c < right_start:  # crosses the boundary, or a gap does
        return None
    return i


def _trie_pattern(words: list[str]) -> str:
    """A regex matching any of `words`, leftmost-longest as the backend matches added tokens, that tests one
    character per step instead of every word at every position (1,000+ added tokens are common)."""
    trie: dict = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}  # a word ends here

    def pattern(node: dict) -> str:
        ends = "" in node
        alts = [re.escape(ch) + pattern(child) for ch, child in node.items() if ch]
        if not alts:
            return ""
        group = alts[0] if len(alts) == 1 and not ends else f"(?:{'|'.join(alts)})"
        return group + ("?" if ends else "")  # a longer word first, then this one

    return pattern(trie)


_LOOKAROUND = re.compile(r"\(\?<?[=!]")  # anchors are refused by _ascii_pattern


def _pipeline(backend) -> dict[str, Any]:
    """The parts of a `tokenizers.Tokenizer` that decide its ids, in its JSON layout: the normalizer,
    pre-tokenizer and post-processor as a vocabulary-less tokenizer holding them serializes them (`to_str` of the
    whole would serialize and parse the vocabulary too), the rest from the public attributes."""
    shell = tokenizers.Tokenizer(tokenizers.models.BPE())
    for part in ("normalizer", "pre_tokenizer", "post_processor"):
        if (component := getattr(backend, part)) is not None:
            setattr(shell, part, component)
    parts = json.loads(shell.to_str())
    model = backend.model
    keys = (
        "dropout",
        "continuing_subword_prefix",
        "end_of_word_suffix",
        "ignore_merges",
        "fuse_unk",
        "unk_token",
    )
    return {
        "model": {"type": type(model).__name__, **{k: getattr(model, k, None) for k in keys}},
        "pre_tokenizer": parts["pre_tokenizer"],
        "normalizer": parts["normalizer"],
        "post_processor": parts["post_processor"],
        "truncation": backend.truncation,
        "padding": backend.padding,
        "added_tokens": [
            {
                "id": i,
                "content": t.content,
                "lstrip": t.lstrip,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "normalized": t.normalized,
            }
            for i, t in backend.get_added_tokens_decoder().items()
        ],  # fmt: skip
    }


def _isolating(regexes: list[re.Pattern]) -> Callable[[str], list[str]]:
    """Split steps with the Isolated behaviour, in order: each match a piece, and each gap between them."""
    # Without lookarounds (or anchors), a step that finds nothing in the whole text finds nothing in its pieces.
    steps = [(rx, _LOOKAROUND.search(rx.pattern) is None) for rx in regexes]

    def split(s: str) -> list[str]:
        pieces = [s]
        for rx, plain in steps:
            if plain and rx.search(s) is None:
                continue
            new: list[str] = []
            for whole in pieces:
                found = rx.findall(whole)
                if sum(map(len, found)) == len(whole):  # no gaps: the matches are the pieces
                    new += found
                else:
                    new += [p for p in rx.split(whole) if p]
            pieces = new
        return pieces

    return split


def _ascii_pattern(pattern: str) -> str:
    """A `tokenizers` (Oniguruma) regex restated for Python's `re` on ASCII text: `\\p{X}` becomes the ASCII
    characters of general category X (a class inside brackets, its members inside them). What the two engines
    read differently is refused (ValueError): anchors, flags other than a scoped `(?i:`, other property names,
    properties or non-ASCII characters under `(?i:`, class intersection `&&`, and `{n,m}+`."""
    out, i, depth = [], 0, 0
    groups: list[bool] = []  # per open group: case-insensitive
    while i < len(pattern):
        ch = pattern[i]
        if ord(ch) > 127 and any(groups):
            raise ValueError(f"non-ASCII {ch!r} under (?i: (Oniguruma folds it to ASCII): {pattern!r}")
        if ch == "\\":
            m = _PROPERTY.match(pattern, i)
            if m:
                if m.group(2) not in _CATEGORIES or (m.group(1) == "P" and depth) or any(groups):
                    raise ValueError(f"property {m.group()} (read differently by Oniguruma): {pattern!r}")
                members = "".join(re.escape(c) for c in _category_chars(m.group(2)))
                if depth:
                    out.append(members)
                elif members:
                    out.append(f"[{'^' if m.group(1) == 'P' else ''}{members}]")
                else:  # no ASCII character has the property
                    out.append("[\\s\\S]" if m.group(1) == "P" else "(?!)")
                i = m.end()
                continue
            nxt = pattern[i + 1 : i + 2]
            if (not depth and nxt in _ANCHOR_ESCAPES) or (any(groups) and nxt in "uxpP"):
                raise ValueError(f"{pattern[i : i + 2]} (Oniguruma and Python differ): {pattern!r}")
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if depth:
            if pattern.startswith("&&", i):
                raise ValueError(f"class intersection && (literal in Python): {pattern!r}")
            if ch == "[":
                raise ValueError(f"nested class: {pattern!r}")
            if ch == "]":
                depth = 0
            out.append(ch)
            i += 1
            continue
        if ch in "^$":
            raise ValueError(f"anchor {ch} (line-wise in Oniguruma): {pattern!r}")
        if ch == "}" and pattern.startswith("+", i + 1):
            raise ValueError(f"{{n,m}}+ (a repeat in Oniguruma, possessive in Python): {pattern!r}")
        if ch == "(":
            if pattern.startswith("(?", i) and not pattern.startswith(_GROUP_OPENINGS, i):
                raise ValueError(f"group {pattern[i : i + 4]!r} (flags differ in Oniguruma): {pattern!r}")
            groups.append(pattern.startswith("(?i:", i) or any(groups))
            out.append(ch if pattern.startswith("(?", i) else "(?:")  # the split keeps only the whole match
        elif ch == ")":
            if groups:
                groups.pop()
            out.append(ch)
        elif ch == "[":
            depth = 1
            out.append(ch)
            if pattern.startswith("^", i + 1):
                out.append("^")
                i += 1
            if pattern.startswith("]", i + 1):  # a literal "]" first in the class
                out.append("\\]")
                i += 1
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def _sentencepiece_words(
    norm: dict | None, pre: dict | None, added: list[dict]
) -> tuple[str, bool, str, dict[str, str]] | None:
    """(replacement, dummy prefix, word regex, respelled added tokens) for the pipeline of
    sp_convert.sentencepiece_to_tokenizers: Prepend("▁")?, Replace(old name, added token)*, Replace(" ", "▁"),
    Split(words, Isolated). Its word regexes cover any text with non-empty matches and read alike in Python."""
    if not norm or norm["type"] != "Sequence" or not pre or pre["type"] != "Split":
        return None
    steps = norm["normalizers"]
    prefix = steps[0]["prepend"] if steps and steps[0]["type"] == "Prepend" else None
    if prefix is not None:
        steps = steps[1:]
    if not steps or any(step["type"] != "Replace" or "String" not in step["pattern"] for step in steps):
        return None
    *renames, last = steps
    if last["pattern"] != {"String": " "}:
        return None
    rep = last["content"]
    if prefix not in (None, rep) or pre["behavior"] != "Isolated" or pre["invert"]:
        return None
    respelled = {step["pattern"]["String"]: step["content"] for step in renames}
    late = {t["content"] for t in added if t["normalized"]}
    if prefix is not None and late or not set(respelled.values()) <= late:
        return None
    words = pre["pattern"].get("Regex")
    if rep != "▁" or not (words in ("▁*[^▁]+|▁+", "▁[^▁]*|[^▁]+") or _SP_WORDS.fullmatch(words or "")):
        return None
    return rep, prefix is not None, words, respelled


def _keeps_offsets(post: dict | None) -> bool:
    """Whether the post-processor leaves offsets as the model gives them (with add_special_tokens=False)."""
    if post is None or post["type"] in ("TemplateProcessing", "BertProcessing"):
        return True
    if post["type"] == "Sequence":
        return all(_keeps_offsets(p) for p in post["processors"])
    return post["type"] in ("ByteLevel", "RobertaProcessing") and not post.get("trim_offsets", True)


def _category_chars(category: str) -> str:
    return "".join(chr(c) for c in range(128) if unicodedata.category(chr(c)).startswith(category))


def _normalizes(normalizer: dict | None) -> bool:
    if normalizer is None:
        return False
    if normalizer["type"] == "Sequence":
        return any(_normalizes(n) for n in normalizer["normalizers"])
    return True


def _identity_on_ascii(normalizer: dict | None) -> bool:
    """Unicode normal forms leave ASCII alone; non-ASCII spans are normalized by the Rust call."""
    if normalizer is None:
        return True
    if normalizer["type"] == "Sequence":
        return all(_identity_on_ascii(n) for n in normalizer["normalizers"])
    return normalizer["type"] in ("NFC", "NFKC", "NFD", "NFKD")


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> character table of byte-level BPE (printable bytes stand for themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table
