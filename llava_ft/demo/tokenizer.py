"""A tiny sentencepiece tokenizer in InternLM2's format (same special tokens, chat markers as user-defined
pieces) for the tiny demo LLM: a few hundred pieces, every word of the training texts one piece, whitespace
kept verbatim so that decode(encode(text)) == text for rendered chat strings.
"""

from __future__ import annotations

import io
import re
import string
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from llava_ft.data.tokenizer import INTERNLM2_SPECIAL_TOKENS

# The chat template's role names follow "<|im_start|>": one piece each, whatever the texts hold.
CHAT_ROLES = ("system", "user", "assistant")
# Every printable ASCII character is a piece, so ASCII text (typed into the demo chat) never becomes <unk>.
# (Space is not listed: sentencepiece stores it as "▁".)
_REQUIRED_CHARS = "".join(c for c in string.printable if c not in string.whitespace)


def build_tiny_tokenizer(out_dir: str | Path, texts: Iterable[str]) -> Path:
    """Train a BPE sentencepiece model on texts and write out_dir/tokenizer.model; returns its path.

    BPE merges until no pair is left inside any word (`hard_vocab_limit=False` with a large `vocab_size`),
    so every word of texts is a single piece, with and without a leading space. Deterministic: one thread,
    fixed seed, no input shuffling, and the model is written from memory (no temp-file path in its proto).
    """
    lines = list(dict.fromkeys(texts))
    if not lines:
        raise ValueError("build_tiny_tokenizer: no texts to train on")
    # Each word alone and after a space, so both forms become pieces whatever context the texts give them.
    words = sorted({w for text in lines for w in re.findall(r"\w+", text)} | set(CHAT_ROLES))
    sentences = lines + words + [" " + w for w in words]

    model = io.BytesIO()
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=100_000,
        hard_vocab_limit=False,
        character_coverage=1.0,
        required_chars=_REQUIRED_CHARS,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        # No dummy "▁" prefix: a word at the start of a text, or after "\n" or a chat marker, is the un-prefixed
        # piece ("red" in "assistant\nred"), so a text encodes the same whole or cut at those points (turn by
        # turn, or between special tokens as transformers' tokenizers do).
        add_dummy_prefix=False,
        split_by_whitespace=True,
        user_defined_symbols=[*INTERNLM2_SPECIAL_TOKENS, "\n"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,  # InternLM2 pads with </s>; tokenizer_config.json says so
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path
