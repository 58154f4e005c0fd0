"""sp_convert.py: the fast twin of a slow sentencepiece tokenizer gives its ids, and is refused where it would not.

References: sentencepiece itself (`sp_model.encode`) and the slow `SentencePieceBackend`, on the real Mistral
model (dummy prefix, byte fallback, whitespace-only pieces; the layout of InternLM2's tokenizer.model)."""

from __future__ import annotations

import io
import logging
import random

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from transformers import LlamaTokenizer
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from llava_ft.data import sp_convert
from llava_ft.data.chunked import ChunkedTokenizer
from llava_ft.data.sp_convert import _entangled, fast_twin, sentencepiece_to_tokenizers
from llava_ft.data.tokenizer import load_tokenizer
from llava_ft.testing.tiny_llm import (
    INTERNLM2_SPECIAL_TOKENS,
    UPSTREAM_SPECIAL_PIECES,
    upstream_slow_ids,
    write_internlm2_tokenizer,
)

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


def test_twin_is_kept_until_the_tokenizer_changes(fresh_tokenizer):
    slow = fresh_tokenizer("sp")
    twin = fast_twin(slow)
    assert fast_twin(slow) is twin  # one conversion for every data file prepared with this tokenizer
    slow.add_tokens(["<new_marker>"])
    again = fast_twin(slow)
    assert again is not twin and again("a<new_marker>b")["input_ids"] == slow("a<new_marker>b")["input_ids"]


def test_twin_is_chunked(tokenizers):
    """Preparation's fast path: the twin's pipeline is one that ChunkedTokenizer reproduces."""
    chunked = ChunkedTokenizer.of(fast_twin(tokenizers["sp"]))
    assert chunked is not None and chunked._prepend == "dummy"


def test_no_twin_where_it_would_differ(tokenizers, fresh_tokenizer, tmp_path, monkeypatch, caplog):
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
        assert fast_twin(fresh_tokenizer("sp")) is None  # not one whose twin is kept from an earlier test
    assert "disagrees on the probe text" in caplog.text


def published_internlm2(path):
    """InternLM2's published layout: no dummy prefix, the chat markers as "[UNUSED_TOKEN_14x]" pieces renamed by
    tokenizer_config.json, tiktoken-style whitespace pieces ("\\n▁▁▁▁", "\\t▁"), a "\\x00" piece."""
    folder = write_internlm2_tokenizer(
        path, add_dummy_prefix=False, piece_names="upstream", tiktoken_style=True
    )
    return load_tokenizer(folder)


def test_twin_of_the_published_internlm2_layout(tmp_path):
    slow = published_internlm2(tmp_path / "tok")
    twin = fast_twin(slow)
    assert twin is not None
    sp = slow.sp_model
    specials = {t: slow.convert_tokens_to_ids(t) for t in ("<s>", "</s>", *INTERNLM2_SPECIAL_TOKENS)}
    code = [
        "\n    ",
        "\n\t",
        ";\n",
        ")\n",
        " }\n",
        "\t\t",
        "\n\n  ",
        "\x00",
        "[UNUSED_TOKEN_14]",
        "TOKEN_146]",
    ]
    texts = random_texts(2, 2000, [*specials, *UPSTREAM_SPECIAL_PIECES, *code])
    chunked = ChunkedTokenizer.of(twin)
    assert chunked is not None  # preparation's fast path
    for text in texts:
        want = upstream_slow_ids(sp, text, specials)
        assert slow(text, add_special_tokens=False)["input_ids"] == want, text
        assert twin(text, add_special_tokens=False)["input_ids"] == want, text
        assert chunked.encode(text, [])[0] == want, text
    for text in texts[:300]:
        assert twin.decode(twin(text)["input_ids"]) == slow.decode(slow(text)["input_ids"]), text
    # Both spellings of a marker are its id; it is named (and decoded) by tokenizer_config.json's name.
    for token, piece in zip(INTERNLM2_SPECIAL_TOKENS, UPSTREAM_SPECIAL_PIECES, strict=True):
        assert twin(f"a{piece}b{token}", add_special_tokens=False)["input_ids"][1::2] == [specials[token]] * 2
        assert twin.convert_ids_to_tokens(specials[token]) == token


def test_user_defined_piece_with_a_space_beside_renamed_markers(tmp_path):
    """With renamed markers, user-defined pieces are matched after spaces become "▁", as sentencepiece
    matches them: a piece "▁zz" is found in "a zz"."""
    folder = write_internlm2_tokenizer(tmp_path / "tok", add_dummy_prefix=False, piece_names="upstream")
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((folder / "tokenizer.model").read_bytes())
    piece = proto.pieces.add()
    piece.piece, piece.type = "▁zz", sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    slow = load_tokenizer(folder)
    twin = fast_twin(slow)
    chunked = ChunkedTokenizer.of(twin)
    assert twin is not None and chunked is not None
    zz = len(proto.pieces) - 1
    for text in ["a zz", "a zzb zz", "zz [UNUSED_TOKEN_146] zz<|im_end|> zz", " zz  zz"]:
        want = slow(text, add_special_tokens=False)["input_ids"]
        assert zz in want and want == slow.sp_model.encode(text.replace("<|im_end|>", "[UNUSED_TOKEN_145]"))
        assert twin(text, add_special_tokens=False)["input_ids"] == want == chunked.encode(text, [])[0], text


def test_renames_that_could_parse_otherwise_are_refused():
    """Replacing an old spelling before matching equals sentencepiece's leftmost-longest matching only when no
    spelling overlaps another token's, and none holds whitespace (matched after spaces become "▁")."""
    assert not _entangled({"[UNUSED_TOKEN_146]": "<|im_start|>"}, {"[UNUSED_TOKEN_14]", "Ａ", "<s>"})
    assert _entangled({"[UNUSED_TOKEN_146]": "<|im_start|>"}, {"146]x"})  # a suffix-prefix overlap
    assert _entangled({"[UNUSED_TOKEN_146]": "<|im_start|>"}, {"x[UNUSED_TOKEN_146]"})  # inside another
    assert _entangled({"[UNUSED_TOKEN_146]": "<|im_start|>"}, {"start|>"})  # the new name overlaps
    assert _entangled({"[UNUSED_TOKEN_146]": "<im start>"}, set())


def test_published_layout_under_a_dummy_prefix_is_refused(tmp_path):
    """With a dummy prefix, sentencepiece matches the placeholder pieces with no "▁" after them, unlike added
    tokens: no exact twin (preparation keeps the slow tokenizer; export says why)."""
    folder = write_internlm2_tokenizer(tmp_path / "tok", add_dummy_prefix=True, piece_names="upstream")
    with pytest.raises(ValueError, match="not added tokens, with a dummy prefix"):
        sentencepiece_to_tokenizers(load_tokenizer(folder))


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
