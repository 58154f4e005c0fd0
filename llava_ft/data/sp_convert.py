"""Plain sentencepiece BPE (the official slow InternLM2Tokenizer) as an equal `tokenizers` pipeline.

Exports use it so that other tools load the tokenizer without custom code, and data preparation uses it as a
fast twin of a slow sentencepiece tokenizer: the same ids, with offsets, at Rust (or chunked) speed.
"""

from __future__ import annotations

import logging
import random

from sentencepiece import sentencepiece_model_pb2
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import AddedToken, PreTrainedTokenizerBase, TokenizersBackend
from transformers.convert_slow_tokenizer import generate_merges
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

log = logging.getLogger("llava_ft")


def sentencepiece_to_tokenizers(tokenizer) -> PreTrainedTokenizerBase:
    """A `TokenizersBackend` equal to plain sentencepiece BPE encoding (as InternLM2Tokenizer, legacy mode).

    transformers' own conversion (LlamaTokenizer) differs on whitespace runs: it merges across words and orders
    merges by piece id, while sentencepiece splits words before each non-whitespace run's last "▁" and merges
    by piece score (whitespace-only pieces score lowest). Reproduced here: words = "▁*[^▁]+" or a trailing "▁+",
    merges ranked by score, the dummy prefix prepended to every text span between special tokens (legacy).
    """
    sp = tokenizer.sp_model
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    where = getattr(tokenizer, "vocab_file", "tokenizer.model")
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    piece_type = sentencepiece_model_pb2.ModelProto.SentencePiece
    # The slow tokenizer splits its added and special tokens out before sentencepiece sees the text; other
    # user-defined pieces are matched by sentencepiece inside it, with no dummy prefix after them.
    registered = {t.content for t in tokenizer.added_tokens_decoder.values()} | set(
        tokenizer.all_special_tokens
    )
    inner = [p.piece for p in proto.pieces if p.type == piece_type.USER_DEFINED and p.piece not in registered]
    unsupported = {
        "model_type is not BPE": trainer.model_type != sentencepiece_model_pb2.TrainerSpec.BPE,
        "treat_whitespace_as_suffix": trainer.treat_whitespace_as_suffix,
        "remove_extra_whitespaces": norm.remove_extra_whitespaces,
        # transformers' Precompiled normalizer differs from sentencepiece's on control characters, "\r\n" and
        # combining marks (ids, and offsets that hide a mark), e.g. with the nmt_nfkc rule.
        f"a precompiled normalization table ({norm.name})": bool(norm.precompiled_charsmap),
        "escape_whitespaces is off": not norm.escape_whitespaces,
        "legacy=False (no dummy prefix after special tokens)": not getattr(tokenizer, "legacy", True),
        f"user-defined pieces {inner[:5]} that are not added tokens, with a dummy prefix": inner
        and norm.add_dummy_prefix,
    }
    if problems := [name for name, bad in unsupported.items() if bad]:
        raise ValueError(f"{where}: sentencepiece options with no exact tokenizers equivalent: {problems}")

    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    scores = {p.piece: p.score for p in proto.pieces}
    # sentencepiece never builds control/unused/user-defined pieces by merging; user-defined ones are matched
    # whole, which added tokens do.
    skip = [p.piece for p in proto.pieces if p.type not in (piece_type.NORMAL, piece_type.BYTE)]
    backend = Tokenizer(
        BPE(
            vocab=vocab,
            merges=generate_merges(vocab, scores, skip_tokens=skip),
            unk_token=proto.pieces[sp.unk_id()].piece,
            fuse_unk=True,
            byte_fallback=trainer.byte_fallback,
        )
    )
    steps = [normalizers.Prepend("▁")] if norm.add_dummy_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    word = "▁*[^▁]+|▁+" if trainer.allow_whitespace_only_pieces else "▁[^▁]*|[^▁]+"
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(word), behavior="isolated")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else [])
    )
    pattern = tokenizer.special_tokens_pattern
    out = TokenizersBackend(
        tokenizer_object=backend,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        unk_token=tokenizer.unk_token,
        pad_token=tokenizer.pad_token,
        add_bos_token=pattern in ("bos", "bos_eos"),
        add_eos_token=pattern in ("eos", "bos_eos"),
        extra_special_tokens=list(tokenizer.extra_special_tokens),
        chat_template=tokenizer.chat_template,
        clean_up_tokenization_spaces=False,
        model_max_length=tokenizer.model_max_length,
    )
    special = set(tokenizer.all_special_tokens)
    added = [
        AddedToken(t.content, special=t.special, normalized=False, lstrip=t.lstrip, rstrip=t.rstrip)
        for _, t in sorted(tokenizer.added_tokens_decoder.items())
    ]
    added += [
        AddedToken(p.piece, special=p.piece in special, normalized=False)
        for p in proto.pieces
        if p.type == piece_type.USER_DEFINED and p.piece not in {t.content for t in added}
    ]
    out.add_tokens(added)
    out.padding_side = tokenizer.padding_side
    if len(out) != len(tokenizer):
        raise ValueError(f"{where}: converted tokenizer has {len(out)} tokens, the original {len(tokenizer)}")
    return out


def fast_twin(tokenizer) -> PreTrainedTokenizerBase | None:
    """A fast tokenizer that gives a slow sentencepiece tokenizer's ids (checked here on probe texts, and in the
    tests on random ones), or None for any other tokenizer or where the conversion is not exact."""
    if getattr(tokenizer, "is_fast", False) or not isinstance(tokenizer, SentencePieceBackend):
        return None
    try:
        twin = sentencepiece_to_tokenizers(tokenizer)
    except ValueError as err:
        log.info("no fast twin for %s: %s", type(tokenizer).__name__, err)
        return None
    bad = next((t for t in _probe_texts(tokenizer) if _ids(twin, t) != _ids(tokenizer, t)), None)
    if bad is not None:
        log.warning(
            "no fast twin for %s: it disagrees on the probe text %r", type(tokenizer).__name__, bad[:80]
        )
        return None
    return twin


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _probe_texts(tokenizer) -> list[str]:
    """Whitespace runs, control characters, combining marks, byte fallback, and every added or special token in
    context."""
    rng = random.Random(0)
    specials = sorted(
        {t.content for t in tokenizer.added_tokens_decoder.values()} | set(tokenizer.all_special_tokens)
    )
    alphabet = [*"abcXYZ019.,?-(\n\t\r\x00\x1b", " ", "  ", "\n\n", "\r\n ", "é", "e\u0301", "ü", "中文", "😀",
                "\u2581", "\u3000", "\u00a0", "ｆｕｌｌ", " Hello", "don't"]  # fmt: skip
    texts = ["".join(rng.choice(alphabet + specials) for _ in range(rng.randint(1, 40))) for _ in range(200)]
    return texts + [
        f"{a}{s}{b}" for s in specials for a in ("", " ", "x ", "\n") for b in ("", " ", "y", "\n ")
    ]
