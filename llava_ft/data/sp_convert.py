"""Plain sentencepiece BPE (the official slow InternLM2Tokenizer) as an equal `tokenizers` pipeline.

Exports use it so that other tools load the tokenizer without custom code, and data preparation uses it as a
fast twin of a slow sentencepiece tokenizer: the same ids, with offsets, at Rust (or chunked) speed.
"""

from __future__ import annotations

import logging
import random
import re
import weakref

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
    merges by piece id, while sentencepiece merges by piece score over the whole text (whitespace-only pieces
    score lowest). Reproduced here: merges ranked by score within words that no piece crosses (`_word_pattern`),
    the dummy prefix prepended to every text span between special tokens (legacy). Ids that tokenizer_config.json
    renames keep both spellings, and one-character unused pieces are never produced, as in sentencepiece.
    """
    sp = tokenizer.sp_model
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    where = getattr(tokenizer, "vocab_file", "tokenizer.model")
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    piece_type = sentencepiece_model_pb2.ModelProto.SentencePiece
    added_tokens = tokenizer.added_tokens_decoder
    # Published InternLM2 folders name ids 92538..92543 "<|im_start|>" etc. in tokenizer_config.json while
    # tokenizer.model calls them "[UNUSED_TOKEN_141]".."[UNUSED_TOKEN_146]": the slow tokenizer maps both
    # spellings to the id (the added token before sentencepiece, the piece inside it) and decodes the new one.
    renamed = {
        i: t.content
        for i, t in added_tokens.items()
        if i < len(proto.pieces) and proto.pieces[i].piece != t.content
    }
    names = [renamed.get(i, p.piece) for i, p in enumerate(proto.pieces)]
    # sentencepiece never emits an unused piece (it resegments it; "\x00" becomes one under byte fallback),
    # while BPE would take a one-character vocabulary entry as a starting symbol: such an entry gets a name that
    # normalized text cannot hold (a space).
    for i, p in enumerate(proto.pieces):
        if p.type == piece_type.UNUSED and len(p.piece) == 1 and i not in renamed:
            names[i] = f"<unused {i}>"
    # The slow tokenizer splits its added and special tokens out before sentencepiece sees the text; other
    # user-defined pieces are matched by sentencepiece inside it, with no dummy prefix after them.
    registered = _registered(tokenizer)
    inner = _unregistered_user_defined(proto, registered)
    # A renamed user-defined piece still matches its old spelling in text: a Replace to the new name, matched
    # after normalization (with every other user-defined piece, as sentencepiece matches them).
    respelled = {
        proto.pieces[i].piece: new
        for i, new in renamed.items()
        if proto.pieces[i].type == piece_type.USER_DEFINED
    }
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
        f"added tokens {sorted(renamed.values())[:5]} renaming ordinary pieces": any(
            proto.pieces[i].type in (piece_type.NORMAL, piece_type.BYTE) for i in renamed
        ),
        f"added tokens {sorted(renamed.values())[:5]} that are also other pieces": len(set(names))
        < len(names),
        f"renamed pieces {sorted(respelled)[:5]} whose spellings overlap other tokens or hold whitespace": respelled
        and _entangled(respelled, registered | set(inner)),
    }
    if problems := [name for name, bad in unsupported.items() if bad]:
        raise ValueError(f"{where}: sentencepiece options with no exact tokenizers equivalent: {problems}")

    vocab = {name: i for i, name in enumerate(names)}
    scores = {name: p.score for name, p in zip(names, proto.pieces)}
    # sentencepiece never builds control/unused/user-defined pieces by merging; user-defined ones are matched
    # whole, which added tokens do.
    skip = [
        name for name, p in zip(names, proto.pieces) if p.type not in (piece_type.NORMAL, piece_type.BYTE)
    ]
    backend = Tokenizer(
        BPE(
            vocab=vocab,
            merges=generate_merges(vocab, scores, skip_tokens=skip),
            unk_token=names[sp.unk_id()],
            fuse_unk=True,
            byte_fallback=trainer.byte_fallback,
        )
    )
    steps = [normalizers.Prepend("▁")] if norm.add_dummy_prefix else []
    steps += [normalizers.Replace(old, new) for old, new in respelled.items()]
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    normal = [name for name, p in zip(names, proto.pieces) if p.type == piece_type.NORMAL]
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(_word_pattern(normal)), behavior="isolated")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else [])
    )
    # Matched after normalization: the respelled pieces' new names and, with them, the user-defined pieces.
    late = set(respelled.values()) | set(inner) if respelled else set()
    special = set(tokenizer.all_special_tokens)
    added = [
        AddedToken(
            t.content, special=t.special, normalized=t.content in late, lstrip=t.lstrip, rstrip=t.rstrip
        )
        for _, t in sorted(added_tokens.items())
    ]
    already = {t.content for t in added}
    added += [
        AddedToken(name, special=name in special, normalized=name in late)
        for name, p in zip(names, proto.pieces)
        if p.type == piece_type.USER_DEFINED and name not in already
    ]
    # Registered with the backend before transformers wraps it, which would add its special tokens unnormalized.
    backend.add_tokens(added)
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
    out.padding_side = tokenizer.padding_side
    if len(out) != len(tokenizer):
        raise ValueError(f"{where}: converted tokenizer has {len(out)} tokens, the original {len(tokenizer)}")
    return out


def _registered(tokenizer) -> set[str]:
    """What the slow tokenizer splits out before sentencepiece sees the text: its added and special tokens."""
    return {t.content for t in tokenizer.added_tokens_decoder.values()} | set(tokenizer.all_special_tokens)


def _unregistered_user_defined(proto, registered: set[str]) -> list[str]:
    """User-defined pieces that sentencepiece itself matches inside the text."""
    user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return [p.piece for p in proto.pieces if p.type == user_defined and p.piece not in registered]


def _word_pattern(pieces: list[str]) -> str:
    """Words that no piece crosses, so that BPE within each word is sentencepiece's BPE over the whole text
    (which merges by score and never splits): a cut before each "▁" that no piece holds after the character
    before it. Derived from the vocabulary, not the trainer flags: InternLM2's pieces (converted from a
    tiktoken vocabulary) hold "\n▁▁▁▁\n" or "\t▁" whatever allow_whitespace_only_pieces says."""
    if not any("▁" in piece[1:] for piece in pieces):
        return "▁[^▁]*|[^▁]+"  # "▁" only leads a piece: a cut before every "▁"
    # Characters that some piece puts before a "▁"; a "▁" after any other character starts a word.
    before = {piece[k - 1] for piece in pieces for k in range(1, len(piece)) if piece[k] == "▁"} - {"▁"}
    if not before:
        return "▁*[^▁]+|▁+"  # whitespace-only pieces: a cut before each run of "▁" after other text
    joined = "".join(sorted(re.escape(c) for c in before))
    return f"▁*(?:[^▁{joined}]+|[{joined}]▁*)+|▁+"  # runs of other characters: fewer regex steps


def _entangled(respelled: dict[str, str], others: set[str]) -> bool:
    """Whether replacing the old spellings before matching could parse text otherwise than sentencepiece's
    leftmost-longest matching: a spelling that holds whitespace, or that overlaps another matchable token (one
    inside the other, or one's end the other's start)."""
    spellings = set(respelled) | set(respelled.values())
    for a in spellings:
        if any(c in a for c in " ▁"):
            return True
        for b in (spellings | others) - {a}:
            if (
                a in b
                or b in a
                or any(a.endswith(b[:k]) or b.endswith(a[:k]) for k in range(1, min(len(a), len(b))))
            ):
                return True
    return False


def fast_twin(tokenizer) -> PreTrainedTokenizerBase | None:
    """A fast tokenizer that gives a slow sentencepiece tokenizer's ids (checked here on probe texts, and in the
    tests on random ones), or None for any other tokenizer or where the conversion is not exact.

    Kept per tokenizer object while what decides its ids is unchanged: training prepares each data file with
    the same tokenizer, and the conversion costs 0.2-0.7 s (a 32k-92k vocabulary)."""
    if getattr(tokenizer, "is_fast", False) or not isinstance(tokenizer, SentencePieceBackend):
        return None
    state = _id_state(tokenizer)
    if (kept := _TWINS.get(tokenizer)) is not None and kept[0] == state:
        return kept[1]
    twin = _checked_twin(tokenizer)
    _TWINS[tokenizer] = (state, twin)
    return twin


_TWINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _id_state(tokenizer) -> tuple:
    added = tuple(
        (i, t.content, t.special, t.lstrip, t.rstrip, t.normalized, t.single_word)
        for i, t in sorted(tokenizer.added_tokens_decoder.items())
    )
    return (
        tokenizer.sp_model.serialized_model_proto(),
        added,
        tuple(tokenizer.all_special_tokens),
        tokenizer.special_tokens_pattern,
        getattr(tokenizer, "legacy", True),
        len(tokenizer),
    )


def _checked_twin(tokenizer) -> PreTrainedTokenizerBase | None:
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
    context, with the user-defined pieces that sentencepiece matches itself (the renamed ones, and a few)."""
    rng = random.Random(0)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.sp_model.serialized_model_proto())
    registered = _registered(tokenizer)
    user_defined = _unregistered_user_defined(proto, registered)
    # The pieces at the added tokens' ids: their old spellings where tokenizer_config.json renames them.
    at_added_ids = [proto.pieces[i].piece for i in tokenizer.added_tokens_decoder if i < len(proto.pieces)]
    specials = sorted(registered | set(at_added_ids))
    alphabet = [*"abcXYZ019.,?-(\n\t\r\x00\x1b", " ", "  ", "\n\n", "\r\n ", "é", "e\u0301", "ü", "中文", "😀",
                "\u2581", "\u3000", "\u00a0", "ｆｕｌｌ", " Hello", "don't"]  # fmt: skip
    alphabet += specials + user_defined[:10] + user_defined[-10:]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(200)]
    return texts + [
        f"{a}{s}{b}" for s in specials for a in ("", " ", "x ", "\n") for b in ("", " ", "y", "\n ")
    ]
