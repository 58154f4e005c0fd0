"""Tiny random causal-LM checkpoints on disk, for tests and the CPU demo (keep this API stable).

`write_tiny_internlm2` writes the real InternLM2 on-disk layout (config with auto_map, grouped wqkv, upstream key
names, a sentencepiece tokenizer whose chat markers are placeholder pieces renamed by tokenizer_config.json),
so the loader is exercised exactly as on a published checkpoint. `write_tiny_llama` / `write_tiny_qwen2` write standard transformers folders.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from sentencepiece import sentencepiece_model_pb2
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from llava_ft.data.templates import TEMPLATES
from llava_ft.data.tokenizer import INTERNLM2_SPECIAL_TOKENS, load_tokenizer


def _base_sp_model() -> Path:
    # mistral-common (a test requirement, so imported here) ships a Llama-style 32k sentencepiece BPE model: a
    # real tokenizer without a download.
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


# Published InternLM2 tokenizer.model files name the chat-marker ids 92538..92543 by these placeholders (as
# InternEvo's tools/tokenizer_internlm2.model, 92544 pieces, does); tokenizer_config.json's added_tokens_decoder
# names them INTERNLM2_SPECIAL_TOKENS.
UPSTREAM_SPECIAL_PIECES = tuple(f"[UNUSED_TOKEN_{n}]" for n in range(141, 147))
# Pieces of the published model that a vocabulary trained by sentencepiece lacks (it was converted from a
# tiktoken one): whitespace after other characters, and "\x00", which sentencepiece leaves unused under byte
# fallback. Scores high enough that merges reach them.
TIKTOKEN_STYLE_PIECES = (
    "\n",
    "\t",
    "\n\n",
    "\n▁",
    "\n▁▁",
    "\n▁▁▁▁",
    "\t▁",
    "\t\t",
    ";\n",
    ")\n",
    "▁}\n",
    "\x00",
)


def write_internlm2_sp_model(
    path: str | Path,
    *,
    add_dummy_prefix: bool = True,
    piece_names: Literal["chat", "upstream"] = "chat",
    tiktoken_style: bool = False,
    vocab_size: int | None = None,
) -> Path:
    """A 32006-piece (32018 with `tiktoken_style`) sentencepiece model: a Llama-style 32k BPE model (shipped with
    mistral-common) plus the InternLM2 special tokens appended as user-defined pieces, so they are single pieces
    of the sp vocab.
    `add_dummy_prefix=False` gives the variant whose text does not get a leading "▁" (the published one's).
    `piece_names="upstream"` names those pieces as published files do (UPSTREAM_SPECIAL_PIECES), and
    `tiktoken_style` adds TIKTOKEN_STYLE_PIECES before them. `vocab_size` (92544: the published size) pads
    with unused filler pieces before the special tokens, so those take the last ids as published."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(_base_sp_model().read_bytes())
    proto.normalizer_spec.add_dummy_prefix = add_dummy_prefix
    kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
    for k, text in enumerate(TIKTOKEN_STYLE_PIECES if tiktoken_style else ()):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = text, -0.5 - k / 100, kinds.NORMAL
    filler = 0 if vocab_size is None else vocab_size - len(proto.pieces) - len(INTERNLM2_SPECIAL_TOKENS)
    if filler < 0:
        needed = len(proto.pieces) + len(INTERNLM2_SPECIAL_TOKENS)
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {needed} pieces it needs")
    for k in range(filler):
        # Unused pieces are never produced by encoding (sentencepiece resegments them, the fast twin has no
        # merge to them), so text tokenizes as without them.
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"<filler_{k}>", 0.0, kinds.UNUSED
    for token in UPSTREAM_SPECIAL_PIECES if piece_names == "upstream" else INTERNLM2_SPECIAL_TOKENS:
        piece = proto.pieces.add()
        piece.piece, piece.score = token, 0.0
        piece.type = kinds.USER_DEFINED
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(proto.SerializeToString())
    return path


def write_internlm2_tokenizer(out_dir: str | Path, **sp_model_options) -> Path:
    """An InternLM2 tokenizer folder (tokenizer.model, upstream-style tokenizer_config.json) around
    `write_internlm2_sp_model(**sp_model_options)`; returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_internlm2_tokenizer(
        out_dir, write_internlm2_sp_model(out_dir / "tokenizer.model", **sp_model_options)
    )
    return out_dir


def upstream_slow_ids(sp, text: str, specials: dict[str, int]) -> list[int]:
    """Upstream's slow InternLM2 tokenizer stated independently, for tests: the added tokens (`specials`, text ->
    id) split out first, sentencepiece (`sp`, a SentencePieceProcessor) on each piece between them."""
    ids: list[int] = []
    for chunk in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        if chunk in specials:
            ids.append(specials[chunk])
        elif chunk:
            ids.extend(sp.encode(chunk))
    return ids


def _sp_pieces(path: Path) -> list[str]:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return [p.piece for p in proto.pieces]


def _added(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def _write_internlm2_tokenizer(out_dir: Path, tokenizer_model: str | Path | None) -> int:
    """tokenizer.model + upstream-style tokenizer_config.json; returns the sp vocab size."""
    sp_path = out_dir / "tokenizer.model"
    if tokenizer_model is None:  # as published: placeholder names, no dummy prefix, tiktoken-style pieces
        write_internlm2_sp_model(sp_path, add_dummy_prefix=False, piece_names="upstream", tiktoken_style=True)
    else:
        sp_path.write_bytes(Path(tokenizer_model).read_bytes())
    pieces = _sp_pieces(sp_path)
    ids = {p: i for i, p in enumerate(pieces)}
    # The chat markers under their own names, or under the placeholders of published files.
    named = dict(zip(INTERNLM2_SPECIAL_TOKENS, UPSTREAM_SPECIAL_PIECES))
    if all(t in ids for t in INTERNLM2_SPECIAL_TOKENS):
        named = {t: t for t in INTERNLM2_SPECIAL_TOKENS}
    named |= {t: t for t in ("<unk>", "<s>", "</s>")}
    missing = [piece for piece in named.values() if piece not in ids]
    if missing:
        raise ValueError(f"{tokenizer_model}: sentencepiece model lacks the InternLM2 tokens {missing}")
    decoder = {str(ids[piece]): _added(t) for t, piece in named.items()}
    decoder = dict(sorted(decoder.items(), key=lambda kv: int(kv[0])))
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(reversed(INTERNLM2_SPECIAL_TOKENS)),
        "auto_map": {
            "AutoTokenizer": [
                "tokenization_internlm2.InternLM2Tokenizer",
                "tokenization_internlm2_fast.InternLM2TokenizerFast",
            ]
        },
        "bos_token": "<s>",
        "chat_template": TEMPLATES["internlm2_chat"].jinja,  # the official one
        "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False,
        "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "</s>",
        "sp_model_kwargs": None,
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    return len(pieces)


def _random_internlm2_state_dict(
    *,
    vocab: int,
    hidden: int,
    inter: int,
    layers: int,
    heads: int,
    kv_heads: int,
    bias: bool,
    seed: int,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    # Weights scaled 1/sqrt(fan_in) and norms away from 1, so attention is peaked and every tensor (norms
    # included) visibly changes the logits: a wrong mapping cannot hide behind near-uniform attention.
    # Each tensor takes `dtype` as it is drawn, so a full-size model never exists in float32 at once.
    g = torch.Generator().manual_seed(seed)

    def lin(out_f: int, in_f: int) -> torch.Tensor:
        return (torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)).to(dtype)

    def norm() -> torch.Tensor:
        return (1.0 + 0.2 * torch.randn(hidden, generator=g)).to(dtype)

    def vector(n: int) -> torch.Tensor:
        return (0.1 * torch.randn(n, generator=g)).to(dtype)

    head_dim = hidden // heads
    sd = {"model.tok_embeddings.weight": torch.randn(vocab, hidden, generator=g).to(dtype)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "attention.wqkv.weight"] = lin((heads + 2 * kv_heads) * head_dim, hidden)
        sd[p + "attention.wo.weight"] = lin(hidden, heads * head_dim)
        if bias:
            sd[p + "attention.wqkv.bias"] = vector((heads + 2 * kv_heads) * head_dim)
            sd[p + "attention.wo.bias"] = vector(hidden)
        sd[p + "feed_forward.w1.weight"] = lin(inter, hidden)
        sd[p + "feed_forward.w3.weight"] = lin(inter, hidden)
        sd[p + "feed_forward.w2.weight"] = lin(hidden, inter)
        sd[p + "attention_norm.weight"] = norm()
        sd[p + "ffn_norm.weight"] = norm()
    sd["model.norm.weight"] = norm()
    sd["output.weight"] = lin(vocab, hidden)
    return sd


def _save_shards(sd: dict[str, torch.Tensor], out_dir: Path, shards: int, fmt: str) -> None:
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")
    ext, single, index = (
        ("safetensors", "model.safetensors", "model.safetensors.index.json")
        if fmt == "safetensors"
        else ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json")
    )
    prefix = single.rsplit(".", 1)[0]

    def save(part: dict[str, torch.Tensor], name: str) -> None:
        part = {k: v.contiguous() for k, v in part.items()}
        if fmt == "safetensors":
            save_file(part, out_dir / name, metadata={"format": "pt"})
        else:
            torch.save(part, out_dir / name)

    if shards == 1:
        save(sd, single)
        return
    keys = list(sd)
    per = math.ceil(len(keys) / shards)
    weight_map = {}
    for s in range(shards):
        name = f"{prefix}-{s + 1:05d}-of-{shards:05d}.{ext}"
        chunk = keys[s * per : (s + 1) * per]
        save({k: sd[k] for k in chunk}, name)
        weight_map.update(dict.fromkeys(chunk, name))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (out_dir / index).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def write_tiny_internlm2(
    out_dir: str | Path,
    *,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    bias: bool = False,
    rope_theta: float = 1_000_000.0,
    rope_scaling: dict | None = None,
    max_position_embeddings: int = 2048,
    tokenizer_model: str | Path | None = None,
    shards: int = 1,
    fmt: Literal["safetensors", "bin"] = "safetensors",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Path:
    """Random InternLM2 checkpoint + tokenizer in the upstream on-disk layout. vocab_size defaults to the
    tokenizer's piece count (32018 with the default sentencepiece model). `dtype` is the saved weights' and
    config's torch_dtype (published checkpoints: bfloat16). Returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sp_size = _write_internlm2_tokenizer(out_dir, tokenizer_model)
    vocab_size = vocab_size or sp_size
    if vocab_size < sp_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {sp_size} pieces")
    if num_heads % num_kv_heads or hidden_size % num_heads:
        raise ValueError("num_heads must divide hidden_size and be a multiple of num_kv_heads")
    im_end = load_tokenizer(out_dir).convert_tokens_to_ids("<|im_end|>")
    config = {
        "architectures": ["InternLM2ForCausalLM"],
        "attn_implementation": "eager",
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "bias": bias,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "model_type": "internlm2",
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "pad_token_id": 2,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": rope_scaling,
        "rope_theta": rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": "4.41.0",
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    generation_config = {"bos_token_id": 1, "eos_token_id": [2, im_end], "pad_token_id": 2}
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    sd = _random_internlm2_state_dict(
        vocab=vocab_size,
        hidden=hidden_size,
        inter=intermediate_size,
        layers=num_layers,
        heads=num_heads,
        kv_heads=num_kv_heads,
        bias=bias,
        seed=seed,
        dtype=dtype,
    )
    _save_shards(sd, out_dir, shards, fmt)
    return out_dir


def _resolve_tokenizer(tokenizer: str | Path | PreTrainedTokenizerBase | None) -> PreTrainedTokenizerBase:
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    # A standard transformers 5 Llama tokenizer: the sp model converted to the tokenizers backend, as
    # from_pretrained does for a Llama-2 folder holding only tokenizer.model + tokenizer_config.json.
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(_base_sp_model().read_bytes())
        llama_config = {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(llama_config))
        return LlamaTokenizer.from_pretrained(tmp, local_files_only=True)


def _write_hf(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _write_tiny_causal_lm(
    config_cls, model_cls, out_dir, tokenizer, *, seed: int, tie_word_embeddings: bool, **shape
) -> Path:
    tok = _resolve_tokenizer(tokenizer)
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=len(tok),
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return _write_hf(model_cls(config), tok, out_dir)


def write_tiny_llama(
    out_dir: str | Path,
    tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> Path:
    """Random LlamaForCausalLM folder (save_pretrained, safetensors) with `tokenizer` (a tokenizer, a folder
    load_tokenizer reads, or None: a standard 32k Llama tokenizer). Vocab = len(tokenizer)."""
    return _write_tiny_causal_lm(
        LlamaConfig,
        LlamaForCausalLM,
        out_dir,
        tokenizer,
        seed=seed,
        tie_word_embeddings=tie_word_embeddings,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
    )


def write_tiny_qwen2(
    out_dir: str | Path,
    tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
) -> Path:
    """Random Qwen2ForCausalLM folder (qkv biases, tied embeddings as the small Qwen2 models)."""
    return _write_tiny_causal_lm(
        Qwen2Config,
        Qwen2ForCausalLM,
        out_dir,
        tokenizer,
        seed=seed,
        tie_word_embeddings=True,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
    )
