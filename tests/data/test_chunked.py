"""chunked.py: the memoised split gives the Rust pipeline's ids exactly, and the same token at each cut.

References: the tokenizer's own `backend.encode` (ids) and `token_boundary` over its offsets (cuts), on the real
Mistral sentencepiece-BPE (as transformers converts it, and as sp_convert's twin of plain sentencepiece) and
DeepSeek byte-level tokenizers, and on small byte-level tokenizers built with the
pre-tokenizer regexes of GPT-2, Llama-3 and Qwen2."""

from __future__ import annotations

import random
import re

import pytest
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from llava_ft.data.chunked import ChunkedTokenizer, _trie_pattern, token_boundary
from llava_ft.data.sp_convert import fast_twin

LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
# Everything a chat record holds: ASCII words and punctuation, whitespace runs, control characters, accents
# (composed and combining), CJK, emoji, non-ASCII digits and spaces, "▁" itself, and the added tokens.
PIECES = [" the", "The", " cat", "don't", "I'LL", " 3.14", "1234567", "  ", "\n", "\n\n", "\t", "\r\n", " \n ",
          "\x0b", "\x0c", "\x1c", "\x7f", "é", "e\u0301", "中文", "🙂", "٣", "\u00a0", "\u3000", "\u2581", "▁x",
          "Ｈｅｌｌｏ", "?!", " (a)", "`code`", "$5", "x" * 30, *SPECIALS]  # fmt: skip


PLAIN = [chr(c) for c in range(32, 127)] + ["\t", "\n", "\r"]  # what byte-level tokenizers split in Python


def texts(seed: int, n: int = 150) -> list[str]:
    """Half from all the pieces and all of ASCII; half from printable ASCII only, which byte-level tokenizers
    split in Python (other spans take the Rust call)."""
    rng = random.Random(seed)
    every = [chr(c) for c in range(0, 128)]
    plain_pieces = [p for p in PIECES if all(c in PLAIN for c in p) or p in SPECIALS]
    out = []
    for i in range(n):
        pieces, alphabet = (PIECES, every) if i % 2 else (plain_pieces, PLAIN)
        parts = [
            rng.choice(pieces) if rng.random() < 0.7 else rng.choice(alphabet)
            for _ in range(rng.randint(1, 40))
        ]
        out.append("".join(parts))
    return out + [" ", "x", "\n", " leading", "trailing ", SPECIALS[0] + " after", "before " + SPECIALS[1]]


def byte_level(pre_tokenizer, normalizer=None) -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained on the test texts, with `pre_tokenizer` and the chat specials."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts(1, 400), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"additional_special_tokens": SPECIALS})
    return fast


def split_then_bytes(pattern: str | Regex):
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern, behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


BUILT = {
    "gpt2": lambda: byte_level(pre_tokenizers.ByteLevel(add_prefix_space=False)),
    "llama3": lambda: byte_level(split_then_bytes(Regex(LLAMA3))),
    "qwen2": lambda: byte_level(split_then_bytes(Regex(QWEN2)), normalizers.NFC()),
}


def metaspace_first(llama: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The Mistral tokenizer as transformers builds it with legacy=False: "▁" only before the text's start."""
    tok = Tokenizer.from_str(llama.backend_tokenizer.to_str())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(params=["llama", "llama_first", "sp_twin", "bpe", *BUILT])
def tokenizer(request, tokenizers):
    if request.param == "llama_first":
        return metaspace_first(tokenizers["llama"])
    if request.param == "sp_twin":  # plain sentencepiece's fast twin: Prepend + Replace, then a word Split
        return fast_twin(tokenizers["sp"])
    return tokenizers[request.param] if request.param in tokenizers else BUILT[request.param]()


def test_real_tokenizers_are_recognised(tokenizers):
    assert ChunkedTokenizer.of(tokenizers["llama"]).kind == "metaspace"
    assert ChunkedTokenizer.of(tokenizers["bpe"]).kind == "bytelevel"
    assert ChunkedTokenizer.of(tokenizers["sp"]) is None  # plain sentencepiece: no Rust pipeline to match


def test_ids_equal_the_backend(tokenizer):
    chunked = ChunkedTokenizer.of(tokenizer)
    assert chunked is not None
    backend = tokenizer.backend_tokenizer
    for seed in range(3):  # the second and third pass read the memo
        for text in texts(seed):
            got = chunked.encode(text, [])
            want = backend.encode(text, add_special_tokens=False).ids
            # None (the Encoder decides) only where a non-ASCII span took the Rust call and ended oddly.
            assert (got[0] == want) if got is not None else chunked.kind == "bytelevel", text


def test_cut_indices_equal_the_offsets_rule(tokenizer):
    chunked = ChunkedTokenizer.of(tokenizer)
    backend = tokenizer.backend_tokenizer
    rng = random.Random(5)
    checked = clean = 0
    for text in texts(7):
        if len(text) < 2:
            continue
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, 4)))
        got = chunked.encode(text, cuts)
        if got is None:
            continue
        enc = backend.encode(text, add_special_tokens=False)
        for c, index in zip(cuts, got[1], strict=True):
            checked += 1
            want = token_boundary(enc, c, len(text))
            clean += want is not None
            assert index == want, (text, c)
    assert checked > 300 and clean > 100  # both kinds of cut were seen


def test_added_tokens_match_leftmost_longest():
    words = ["<a>", "<a><b>", "<ab", "x"]
    rx = re.compile(_trie_pattern(words))
    assert rx.findall("<a><b><ab<a>x<a><c>") == ["<a><b>", "<ab", "<a>", "x", "<a>"]


def test_unnormalized_added_tokens_are_found_first():
    """As the backend does: added tokens that skip normalization, then the others in the text left over."""
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}, []))
    tok.pre_tokenizer = split_then_bytes(" ")  # a plain-string pattern
    tok.add_tokens([AddedToken("bcd", normalized=False), AddedToken("abc", normalized=True)])
    chunked = ChunkedTokenizer.of(PreTrainedTokenizerFast(tokenizer_object=tok))
    for text in ["xabcd", "abc bcd abcd", "abcabcd", "ab cd"]:
        assert chunked.encode(text, [])[0] == tok.encode(text).ids, text


def tiny_metaspace(vocab: dict[str, int], **bpe) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(vocab, [], **{"byte_fallback": False, "fuse_unk": False, **bpe}))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def tiny_byte_level(pattern: str | None, merges=(("a", "b"),), post=None) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the 256 byte characters plus `merges`; `pattern` None: GPT-2's own split."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({a + b: len(vocab) + i for i, (a, b) in enumerate(merges)})
    tok = Tokenizer(models.BPE(vocab, list(merges)))
    tok.pre_tokenizer = (
        pre_tokenizers.ByteLevel(add_prefix_space=False)
        if pattern is None
        else split_then_bytes(Regex(pattern))
    )
    tok.post_processor = post
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_unsupported_pipelines_keep_the_rust_call(tokenizers):
    assert ChunkedTokenizer.of(tiny_metaspace({"▁": 0, "a": 1, "▁a": 2})) is not None
    # A vocabulary entry with "▁" after another character: a merge could cross a chunk cut.
    assert ChunkedTokenizer.of(tiny_metaspace({"▁": 0, "a": 1, "a▁": 2})) is None
    # An unknown character and an unknown "▁" after it fuse into one <unk> across the cut ("ß b").
    assert ChunkedTokenizer.of(tiny_metaspace({"<unk>": 0, "b": 1}, unk_token="<unk>", fuse_unk=True)) is None
    lstrip = byte_level(split_then_bytes(Regex(LLAMA3)))
    lstrip.add_tokens([AddedToken("<x>", lstrip=True)])
    assert ChunkedTokenizer.of(lstrip) is None
    # \P inside a class has no ASCII restatement; anchors and flags mean other things in Oniguruma.
    for pattern in [r"[^\P{L}x]+", r"b$|\s+", r"b\Z|\s+", r"^\w|\s+", r"\bab|\s+", r"(?m:a.b)|\s+"]:
        assert ChunkedTokenizer.of(tiny_byte_level(pattern)) is None, pattern
    assert ChunkedTokenizer.of(tiny_byte_level(r"ab|\s+")) is not None
    assert ChunkedTokenizer.of(tiny_byte_level(r"(?i:'s|[a-z]+)|\p{Lu}\p{Ll}+|\s+")) is not None
    # Offsets trimmed after the model (GPT-2's own post-processor) would move the cut indices.
    trims = processors.ByteLevel(trim_offsets=True)
    assert ChunkedTokenizer.of(tiny_byte_level(None, [("Ġ", "h")], trims)) is None
    assert ChunkedTokenizer.of(tiny_byte_level(None, [("Ġ", "h")], processors.Sequence([trims]))) is None
    kept = tiny_byte_level(None, [("Ġ", "h")], processors.ByteLevel(trim_offsets=False))
    enc = kept.backend_tokenizer.encode("a   h", add_special_tokens=False)
    want = [token_boundary(enc, c, 5) for c in (1, 2, 3, 4)]
    assert ChunkedTokenizer.of(kept).encode("a   h", [1, 2, 3, 4])[1] == want == [1, 2, 3, None]
    split_specials = byte_level(split_then_bytes(Regex(LLAMA3)))
    split_specials.split_special_tokens = True
    assert ChunkedTokenizer.of(split_specials) is None
    truncating = byte_level(split_then_bytes(Regex(LLAMA3)))
    truncating.backend_tokenizer.enable_truncation(8192)  # longer than the probe text: only the check sees it
    assert ChunkedTokenizer.of(truncating) is None


# Regexes that Oniguruma (the backend) and Python's `re` read differently on ASCII text, from a fuzzing review:
# (pattern, the one merge, a text where the two splits differ).
ENGINES_DIFFER = [
    (r"\p{lu}", ("a", "Q"), "aQz"),  # property names ignore case in Oniguruma
    (r"\p{LC}+", ("a", "1"), "a1b"),  # cased letter: not a general category
    (r"\p{CI}", ("x", "."), "x.y"),  # Case_Ignorable: a binary property
    (r"(?i:\p{Lu})+", ("a", "B"), "aBc"),  # Oniguruma does not fold \p under (?i:
    (r"(?i:ß)", ("G", "s"), "Gssw"),  # full case folding: ß matches "ss"
    (r"(?i:\u212a)", ("a", "k"), "akb"),  # the Kelvin sign matches k
    (r"[a-z&&b]+", ("c", "b"), "cbd"),  # class intersection; a literal "&" in Python
    (r"\d{1,3}+", ("1", "9"), "11190"),  # a repeat of {1,3} in Oniguruma, possessive in Python
    (r"q?|zj", ("z", "j"), "zj"),  # after an empty match Python retries in place, Oniguruma moves on
]


@pytest.mark.parametrize(("pattern", "merge", "text"), ENGINES_DIFFER)
def test_regexes_the_engines_read_differently_keep_the_rust_call(pattern, merge, text):
    tok = tiny_byte_level(pattern, (merge,))
    want = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
    chunked = ChunkedTokenizer.of(tok)
    assert chunked is None or chunked.encode(text, [])[0] == want
