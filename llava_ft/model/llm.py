"""Load a causal LM and its tokenizer from a local folder: any transformers causal LM, and InternLM2 without
its remote code (converted to LlamaForCausalLM in memory). Optional 4-bit NF4 through bitsandbytes.

Nothing here downloads or executes code from the folder: weights come from safetensors or
`torch.load(weights_only=True)`, and `trust_remote_code` is never set.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AddedToken,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from llava_ft.model.internlm2 import internlm2_config_to_llama, internlm2_state_dict_to_llama, read_checkpoint

logger = logging.getLogger("llava_ft")

_INTERNLM2_TOKENIZER_CLASSES = ("InternLM2Tokenizer", "InternLM2TokenizerFast")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e


def is_internlm2(path: str | Path) -> bool:
    """True for a folder whose config.json says model_type "internlm2"."""
    return _read_json(Path(path) / "config.json").get("model_type") == "internlm2"


def _is_internlm2_tokenizer(folder: Path) -> bool:
    if not (folder / "tokenizer.model").is_file():
        return False
    if is_internlm2(folder):
        return True
    cfg = _read_json(folder / "tokenizer_config.json")
    auto_map = json.dumps(cfg.get("auto_map", {}))
    return cfg.get("tokenizer_class") in _INTERNLM2_TOKENIZER_CLASSES or "tokenization_internlm2" in auto_map


class InternLM2Tokenizer(SentencePieceBackend):
    """Plain-sentencepiece tokenization, as upstream's slow InternLM2Tokenizer, without its remote code.

    Text between special tokens is encoded by sentencepiece itself (legacy mode: each chunk gets sp's dummy
    prefix, as upstream), so whitespace runs tokenize like sentencepiece, unlike the converted fast BPE.
    """

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # The base class joins pieces as text, which leaves byte-fallback pieces ("<0x0A>") undecoded;
        # sentencepiece decodes runs of ordinary pieces, special tokens are kept verbatim.
        out, run = [], []
        special = set(self.all_special_tokens) | {t.content for t in self.added_tokens_decoder.values()}
        for token in tokens:
            if token in special:
                out.append(self.sp_model.decode(run))
                out.append(token)
                run = []
            else:
                run.append(token)
        out.append(self.sp_model.decode(run))
        return "".join(out)


def _token_str(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as serialized AddedToken dicts.
    return value.get("content") if isinstance(value, dict) else value


def _load_internlm2_tokenizer(folder: Path) -> InternLM2Tokenizer:
    cfg = _read_json(folder / "tokenizer_config.json")
    where = folder / "tokenizer_config.json"
    added: dict[int, AddedToken] = {}
    for key, fields in cfg.get("added_tokens_decoder", {}).items():
        try:
            added[int(key)] = AddedToken(**{k: v for k, v in fields.items() if k != "__type"})
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"{where}: added_tokens_decoder[{key!r}] is not a valid token entry ({e})"
            ) from e
    eos = _token_str(cfg.get("eos_token")) or "</s>"
    kwargs: dict[str, Any] = {
        "bos_token": _token_str(cfg.get("bos_token")) or "<s>",
        "eos_token": eos,
        "unk_token": _token_str(cfg.get("unk_token")) or "<unk>",
        "pad_token": _token_str(cfg.get("pad_token")) or eos,
        "added_tokens_decoder": added,
        "extra_special_tokens": cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens") or [],
        "clean_up_tokenization_spaces": cfg.get("clean_up_tokenization_spaces", False),
        # Upstream's add_bos_token/add_eos_token (defaults True/False); our own saved configs carry the pattern.
        "special_tokens_pattern": cfg.get("special_tokens_pattern")
        or {
            (True, False): "bos",
            (False, True): "eos",
            (True, True): "bos_eos",
            (False, False): "none",
        }[(bool(cfg.get("add_bos_token", True)), bool(cfg.get("add_eos_token", False)))],
        "padding_side": "right",
        "legacy": True,
    }
    if cfg.get("model_max_length") is not None:
        kwargs["model_max_length"] = cfg["model_max_length"]
    if cfg.get("chat_template") is not None:
        kwargs["chat_template"] = cfg["chat_template"]
    elif (folder / "chat_template.jinja").is_file():  # where transformers 5's save_pretrained puts it
        kwargs["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    tok = InternLM2Tokenizer(vocab_file=str(folder / "tokenizer.model"), **kwargs)
    tok.name_or_path = str(folder)
    return tok


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Tokenizer of a local model folder, offline, no remote code; padding on the right, pad token always set."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: tokenizer folder not found")
    if _is_internlm2_tokenizer(folder):
        tok = _load_internlm2_tokenizer(folder)
    else:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    if tok.pad_token is None:
        # Padded positions are masked out of attention and loss, so any existing token serves.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        if tok.pad_token is None:
            raise ValueError(f"{folder}: tokenizer has no pad, eos or unk token to pad with")
        logger.info("tokenizer %s: no pad token, using %r", folder, tok.pad_token)
    tok.padding_side = "right"
    logger.info("loaded tokenizer %s from %s (%d tokens)", type(tok).__name__, folder, len(tok))
    return tok


def nf4_config(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's 4-bit setting: NF4, double quantization, matmuls in `compute_dtype`."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )


def _check_loading_info(info: dict[str, Any], folder: Path) -> None:
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise ValueError(
            f"{folder}: checkpoint does not fit the model: missing {sorted(info['missing_keys'])[:8]}, "
            f"mismatched {sorted(info.get('mismatched_keys') or [])[:8]}"
        )
    if info.get("unexpected_keys"):
        logger.warning(
            "%s: %d checkpoint tensors not used by the model: %s",
            folder,
            len(info["unexpected_keys"]),
            sorted(info["unexpected_keys"])[:8],
        )


def load_llm(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    load_in_4bit: bool = False,
    attn_implementation: str | None = None,
    device_map: Any = None,
) -> PreTrainedModel:
    """Causal LM from a local folder. InternLM2 folders become an equivalent LlamaForCausalLM; anything else
    goes through AutoModelForCausalLM without remote code. Returned in eval mode, as from_pretrained does."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json, not a model folder")
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": device_map, "output_loading_info": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        kwargs["quantization_config"] = nf4_config(dtype)

    if is_internlm2(folder):
        raw = _read_json(folder / "config.json")
        config = internlm2_config_to_llama(raw)
        state_dict = internlm2_state_dict_to_llama(read_checkpoint(folder), raw)
        # from_pretrained with an in-memory state dict takes the same route as a folder, bitsandbytes included.
        model, info = LlamaForCausalLM.from_pretrained(None, config=config, state_dict=state_dict, **kwargs)
        del state_dict
        model.config.name_or_path = str(folder)
        if (folder / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
        source = "InternLM2 -> LlamaForCausalLM"
    else:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False, **kwargs
        )
        source = type(model).__name__
    _check_loading_info(info, folder)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "loaded LLM %s from %s: dtype=%s, 4-bit=%s, attn=%s, %.2fM parameters%s",
        source,
        folder,
        dtype,
        load_in_4bit,
        model.config._attn_implementation,
        n_params / 1e6,
        " (4-bit weights count packed)" if load_in_4bit else "",
    )
    return model
