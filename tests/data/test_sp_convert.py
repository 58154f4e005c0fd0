"""sp_convert.py: the fast twin of a slow sentencepiece tokenizer gives its ids, and is refused where it would not.

References: sentencepiece itself (`sp_model.encode`) and the slow `SentencePieceBackend`, on the real Mistral
model (dummy prefix, byte fallback, whitespace-only pieces; the layout of InternLM2's tokenizer.model)."""

from __future__ import annotations

import io
import logging
import random

import sentencepiece as spm
from transformers import LlamaTokenizer
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from llava_ft.data import sp_convert
from llava_ft.data.chunked import ChunkedTokenizer
from llava_ft.data.sp_convert import fast_twin

from .conftest import EXTRA_SPECIALS, MISTRAL_SP

# Whitespace runs (where transformers' own LlamaTokenizer conversion differs), byte fallback, "▁" itself, and
# what a precompiled normalizer would read differently (control characters, "\r\n", combining marks).
ALPHABET = [*"abcXYZ019.,?-(\n\t\r", " ", "  ", "   ", "\n\n", " \n", "\r\n ", "é", "e\u0301", "中文", "😀",
            "\u2581", "\u3000", "ｆｕｌｌ", " Hello", " the", "don't", "\x0b", "\x1b", "\x00"]  # fmt: skip


def random_texts(seed: int, n: int, specials: list[str]) -> list[str]:
    rng = random.Random(seed)
    pieces = ALPHABET + specials
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def test_twin_ids_equal_sentencepiece(tokenizers):
    slow = tokenizers["sp"]
    twin = fast_twin(slow)
    assert twin is not None and twin.is_fast
    sp = spm.SentencePieceProcessor(model_file=str(MISTRAL_SP))
    for text in random_texts(0, 1500, []):
        assert twin(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    for text in random_texts(1, 1500, EXTRA_SPECIALS + ["<s>", "</s>"]):
        want = slow(text, add_special_tokens=False)["input_ids"]
        assert twin(text, add_special_tokens=False)["input_ids"] == want, text
    assert twin("Hi")["input_ids"] == slow("Hi")["input_ids"]  # BOS as the slow one adds it


def test_twin_is_chunked(tokenizers):
    """Preparation's fast path: the twin's pipeline is one that ChunkedTokenizer reproduces."""
    chunked = ChunkedTokenizer.of(fast_twin(tokenizers["sp"]))
    assert chunked is not None and chunked._prepend == "dummy"


def test_no_twin_where_it_would_differ(tokenizers, tmp_path, monkeypatch, caplog):
    assert fast_twin(tokenizers["llama"]) is None  # already fast
    # legacy=False: no dummy prefix after special tokens, which the conversion does not reproduce.
    modern = SentencePieceBackend(vocab_file=str(MISTRAL_SP), legacy=False, unk_token="<unk>")
    assert fast_twin(modern) is None
    # A user-defined piece that the slow tokenizer leaves to sentencepiece gets no dummy prefix after it there,
    # but would as an added token of the twin.
    inner = tiny_sentencepiece(tmp_path / "inner.model", user_defined_symbols=["<x>"])
    assert fast_twin(inner) is None
    assert inner("a<x>b", add_special_tokens=False)["input_ids"] == inner.sp_model.encode("a<x>b")
    # A precompiled normalization table (nmt_nfkc): transformers' Precompiled normalizer differs from
    # sentencepiece's on control characters, "\r\n" and combining marks.
    assert fast_twin(tiny_sentencepiece(tmp_path / "nfkc.model", normalization_rule_name="nmt_nfkc")) is None
    # A conversion that disagrees on the probe texts (transformers' own, on whitespace runs) is not used.
    monkeypatch.setattr(sp_convert, "sentencepiece_to_tokenizers", llama_conversion)
    with caplog.at_level(logging.WARNING, logger="llava_ft"):
        assert fast_twin(tokenizers["sp"]) is None
    assert "disagrees on the probe text" in caplog.text


def tiny_sentencepiece(path, **options) -> SentencePieceBackend:
    """A small BPE model with a dummy prefix (and `options`), loaded as plain sentencepiece."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a b <x> c", "ab ba cab"] * 50),
        model_writer=model,
        model_type="bpe",
        vocab_size=16,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        minloglevel=2,
        **{"normalization_rule_name": "identity", **options},
    )
    path.write_bytes(model.getvalue())
    return SentencePieceBackend(vocab_file=str(path), unk_token="<unk>")


def llama_conversion(tok):
    """transformers' own conversion of the same model, with the same specials."""
    converted = LlamaTokenizer(vocab_file=str(MISTRAL_SP))
    converted.add_special_tokens({"additional_special_tokens": EXTRA_SPECIALS})
    return converted
