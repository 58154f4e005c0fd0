"""Load the tokenizer of a local model folder, offline and without remote code.

InternLM2 folders get `InternLM2Tokenizer`, plain sentencepiece as upstream's slow tokenizer encodes;
`sp_convert.py` builds its fast `tokenizers` twin. Everything else goes through `AutoTokenizer`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from transformers import AddedToken, AutoTokenizer, PreTrainedTokenizerBase
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from llava_ft.errors import remote_code_refusal

logger = logging.getLogger("llava_ft")

# The tokenizer's chat and tool markers, in vocabulary order (ids 92538..92543 in the real 92544-piece vocab).
INTERNLM2_SPECIAL_TOKENS = (
    "<|plugin|>",
    "<|interpreter|>",
    "<|action_end|>",
    "<|action_start|>",
    "<|im_end|>",
    "<|im_start|>",
)

_INTERNLM2_TOKENIZER_CLASSES = ("InternLM2Tokenizer", "InternLM2TokenizerFast")


def read_json(path: Path) -> dict[str, Any]:
    """A folder's JSON file, {} when absent; invalid JSON names the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e


def is_internlm2(path: str | Path) -> bool:
    """True for a folder whose config.json says model_type "internlm2"."""
    return read_json(Path(path) / "config.json").get("model_type") == "internlm2"


def _is_internlm2_tokenizer(folder: Path) -> bool:
    if not (folder / "tokenizer.model").is_file():
        return False
    if is_internlm2(folder):
        return True
    cfg = read_json(folder / "tokenizer_config.json")
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
    cfg = read_json(folder / "tokenizer_config.json")
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
        try:
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        except ValueError as e:
            if "trust_remote_code" not in str(e):
                raise
            # transformers' own message advises trust_remote_code, an option llava-ft does not offer.
            which = (
                "tokenizer_config.json"
                if "auto_map" in read_json(folder / "tokenizer_config.json")
                else "config.json"
            )
            raise remote_code_refusal(folder, which) from None
    if tok.pad_token is None:
        # Padded positions are masked out of attention and loss, so any existing token serves.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        if tok.pad_token is None:
            raise ValueError(f"{folder}: tokenizer has no pad, eos or unk token to pad with")
        logger.info("tokenizer %s: no pad token, using %r", folder, tok.pad_token)
    tok.padding_side = "right"
    logger.info("loaded tokenizer %s from %s (%d tokens)", type(tok).__name__, folder, len(tok))
    return tok
