"""Tokenizer and model loading from local folders: InternLM2 tokenizes as sentencepiece does, nothing from the
folder is executed, and the AutoModel path gives what transformers' own classes give."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from transformers import LlamaForCausalLM, Qwen2ForCausalLM

from llava_ft.data.tokenizer import is_internlm2, load_tokenizer
from llava_ft.model.llm import load_llm
from llava_ft.testing.tiny_llm import (
    INTERNLM2_SPECIAL_TOKENS,
    UPSTREAM_SPECIAL_PIECES,
    upstream_slow_ids,
    write_internlm2_sp_model,
    write_tiny_internlm2,
    write_tiny_llama,
    write_tiny_qwen2,
)

TRICKY = [
    " Hello  there\nfriend",
    "Hello world",
    "  two leading spaces",
    "trailing spaces   ",
    "   ",
    "",
    "tabs\tand\t\ttabs",
    "line1\n\nline3\n",
    "\n\nstarts with newlines",
    "windows\r\nline endings",
    "code:\n    def f(x):\n        return x  # four spaces",
    "unicode: naïve café, 日本語, Ελληνικά, emoji 🤖🚀",
    "digits 1234567 and 3.14159",
    "many     spaces\u3000ideographic space",
]
TRAP = """import pathlib
pathlib.Path(__file__).with_name("REMOTE_CODE_RAN").write_text(__file__)
raise RuntimeError("remote code executed")
"""
TRAP_MODULES = (
    "tokenization_internlm2.py",
    "tokenization_internlm2_fast.py",
    "configuration_internlm2.py",
    "modeling_internlm2.py",
)


@pytest.fixture(scope="module")
def internlm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = write_tiny_internlm2(tmp_path_factory.mktemp("internlm2"), num_layers=1)
    for name in TRAP_MODULES:
        (folder / name).write_text(TRAP)
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize("dummy_prefix", [True, False])
def test_internlm2_tokenizes_like_sentencepiece(tmp_path: Path, dummy_prefix: bool) -> None:
    sp_file = write_internlm2_sp_model(tmp_path / "sp.model", add_dummy_prefix=dummy_prefix)
    folder = write_tiny_internlm2(tmp_path / "m", num_layers=1, tokenizer_model=sp_file)
    tok = load_tokenizer(folder)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    for text in TRICKY:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text), text
        assert tok(text)["input_ids"] == [sp.bos_id(), *sp.encode(text)], text
        assert tok.decode(ids) == sp.decode(ids), text


def test_internlm2_special_tokens_are_single_ids(internlm2_dir: Path) -> None:
    """As published: tokenizer.model holds the markers as placeholder pieces ("[UNUSED_TOKEN_146]"), which
    tokenizer_config.json renames ("<|im_start|>"); both spellings give the one id, and it decodes by its name."""
    tok = load_tokenizer(internlm2_dir)
    sp = spm.SentencePieceProcessor(model_file=str(internlm2_dir / "tokenizer.model"))
    specials = {"<s>": sp.bos_id(), "</s>": sp.eos_id(), "<unk>": sp.unk_id()}
    for token, piece in zip(INTERNLM2_SPECIAL_TOKENS, UPSTREAM_SPECIAL_PIECES, strict=True):
        specials[token] = sp.piece_to_id(piece)
        assert specials[token] != sp.unk_id() and sp.id_to_piece(specials[token]) == piece
        assert tok(token, add_special_tokens=False)["input_ids"] == [specials[token]]
        assert tok(piece, add_special_tokens=False)["input_ids"] == [specials[token]] == sp.encode(piece)
        assert tok.convert_ids_to_tokens(specials[token]) == token
    assert sp.get_piece_size() - 6 == specials["<|plugin|>"]  # the last six ids, as 92538..92543 of 92544
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (sp.bos_id(), sp.eos_id(), sp.eos_id())
    assert tok.padding_side == "right"
    conversation = "<|im_start|>user\n Hi  there\n\tx;\n<|im_end|>\n<|im_start|>assistant\nok</s>"
    ids = tok(conversation, add_special_tokens=False)["input_ids"]
    assert ids == upstream_slow_ids(sp, conversation, specials)
    assert tok.decode(ids) == conversation
    old_style = conversation.replace("<|im_start|>", "[UNUSED_TOKEN_146]").replace(
        "<|im_end|>", "[UNUSED_TOKEN_145]"
    )
    assert tok(old_style, add_special_tokens=False)["input_ids"] == ids


def test_internlm2_chat_template_is_kept(internlm2_dir: Path) -> None:
    tok = load_tokenizer(internlm2_dir)
    config = json.loads((internlm2_dir / "tokenizer_config.json").read_text())
    assert tok.chat_template == config["chat_template"]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # InternLM2's documented chat format
    assert (
        text
        == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>assistant\n"
    )


def test_no_remote_code_is_run(internlm2_dir: Path, tmp_path: Path) -> None:
    marker = internlm2_dir / "REMOTE_CODE_RAN"
    tok = load_tokenizer(internlm2_dir)
    model = load_llm(internlm2_dir)
    assert not marker.exists()
    assert type(model) is LlamaForCausalLM and tok.__class__.__module__ == "llava_ft.data.tokenizer"
    # the trap does fire when its code is run
    (tmp_path / "trap.py").write_text(TRAP)
    with pytest.raises(RuntimeError):
        runpy.run_path(str(tmp_path / "trap.py"))
    assert (tmp_path / "REMOTE_CODE_RAN").exists()


def test_internlm2_generation_config_is_read(internlm2_dir: Path) -> None:
    model = load_llm(internlm2_dir)
    im_end = load_tokenizer(internlm2_dir).convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == [2, im_end]
    assert is_internlm2(internlm2_dir) and not model.training


def test_saved_internlm2_tokenizer_reloads_identically(internlm2_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(internlm2_dir)
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    text = "<|im_start|>user\n Hello  there\n<|im_end|>\n"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.chat_template == tok.chat_template
    assert again.pad_token_id == tok.pad_token_id


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_auto_model_path_matches_transformers(tmp_path: Path, arch: str) -> None:
    writer, cls = {
        "llama": (write_tiny_llama, LlamaForCausalLM),
        "qwen2": (write_tiny_qwen2, Qwen2ForCausalLM),
    }[arch]
    folder = writer(tmp_path / arch)
    config = json.loads((folder / "config.json").read_text())
    # A Llama folder that also advertises remote code must still load natively, without running it.
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_internlm2.py").write_text(TRAP)
    model = load_llm(folder)
    reference = cls.from_pretrained(folder)
    ids = torch.randint(0, config["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert type(model) is cls
    assert torch.equal(got, want), (got - want).abs().max()
    assert want.abs().max() > 0
    assert not (folder / "REMOTE_CODE_RAN").exists()


def test_auto_tokenizer_path(llama_dir: Path) -> None:
    tok = load_tokenizer(llama_dir)
    assert tok.pad_token == tok.eos_token == "</s>"  # the Llama tokenizer has no pad token of its own
    assert tok.padding_side == "right"
    assert tok("hi")["input_ids"][0] == tok.bos_token_id


def test_4bit_auto_model(llama_dir: Path) -> None:
    import bitsandbytes as bnb

    model = load_llm(llama_dir, load_in_4bit=True)
    reference = LlamaForCausalLM.from_pretrained(llama_dir)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 2 * 7
    ids = torch.randint(0, reference.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids).logits.flatten(), reference(ids).logits.flatten()
    assert torch.corrcoef(torch.stack([got, want]))[0, 1] > 0.9


def test_missing_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_llm(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "nope")
