"""Templates against the official Jinja, rendered by the tokenizer's own `apply_chat_template`."""

from __future__ import annotations

import pytest

from llava_ft.data.conversation import Conversation, DataError, Message
from llava_ft.data.templates import TEMPLATES, Segment, differs_from_tokenizer, get_template

CHAT_TEMPLATES = ("internlm2_chat", "qwen2_chat", "llama2_chat", "llama3_chat", "vicuna_v1")

SYSTEM = {"role": "system", "content": " Be brief.\n"}
# Whitespace at the edges and inside exercises the official quirks (llama2 strip, llama3 trim).
TURNS = [
    {"role": "user", "content": "<image>\nWhat is  in the picture? "},
    {"role": "assistant", "content": " A red  square.\n"},
    {"role": "user", "content": "Und die Farbe? 颜色"},
    {"role": "assistant", "content": "Rot (红)."},
]
CASES = {
    "single": TURNS[:2],
    "system_single": [SYSTEM, *TURNS[:2]],
    "multi": TURNS,
    "system_multi": [SYSTEM, *TURNS],
}


def conv_of(messages: list[dict], **kw) -> Conversation:
    return Conversation([Message(m["role"], m["content"]) for m in messages], source="t.jsonl:1", **kw)


@pytest.mark.parametrize("gen", [False, True], ids=["full", "gen_prompt"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", CHAT_TEMPLATES)
@pytest.mark.parametrize("fam", ["sp", "bpe"])  # two bos/eos spellings
def test_render_is_byte_identical_to_official_jinja(
    name, case, gen, fam, tokenizers, official_jinja, trained_reference, monkeypatch
):
    tok = tokenizers[fam]
    monkeypatch.setattr(tok, "chat_template", official_jinja[name])
    messages = CASES[case][:-1] if gen else CASES[case]  # a generation prompt follows a user turn
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    segments = get_template(name).segments(
        conv_of(messages), bos=tok.bos_token, eos=tok.eos_token, add_generation_prompt=gen
    )
    assert "".join(s.text for s in segments) == want
    trained = [s.text for s in segments if s.trainable]
    assert trained == trained_reference(name, messages, tok.bos_token, tok.eos_token)


def test_untrained_parts_of_chatml():
    segs = get_template("internlm2_chat").segments(conv_of(CASES["system_single"]), bos="<s>", eos="</s>")
    assert segs == [
        Segment(
            "<s><|im_start|>system\n Be brief.\n<|im_end|>\n<|im_start|>user\n"
            + TURNS[0]["content"]
            + "<|im_end|>\n<|im_start|>assistant\n",
            False,
        ),  # fmt: skip
        Segment(TURNS[1]["content"] + "<|im_end|>", True),
        Segment("\n", False),  # the separator after <|im_end|> is not part of the turn
    ]


def test_last_turn_only_and_opt_out():
    tpl = get_template("qwen2_chat")
    last = tpl.segments(conv_of(TURNS), bos="", eos="<|im_end|>", last_turn_only=True)
    assert [s.text for s in last if s.trainable] == ["Rot (红).<|im_end|>"]
    conv = conv_of(TURNS)
    conv.messages[3].trainable = False
    opted = tpl.segments(conv, bos="", eos="<|im_end|>")
    assert [s.text for s in opted if s.trainable] == [TURNS[1]["content"] + "<|im_end|>"]
    # Opting out the last turn under last_turn_only leaves nothing trained (the encoder drops such samples).
    assert not any(s.trainable for s in tpl.segments(conv, bos="", eos="", last_turn_only=True))


@pytest.mark.parametrize("name", [*TEMPLATES])
def test_text_kind_trains_text_and_eos_not_bos(name):
    conv = Conversation([Message("assistant", "Plain corpus text.\n")], kind="text")
    segs = get_template(name).segments(conv, bos="<s>", eos="</s>")
    assert segs == [Segment("Plain corpus text.\n</s>", True)]  # BOS: an id the Encoder puts first


def test_plain_is_llava_pretrain_format():
    # LLaVA preprocess_plain: the prompt becomes just the image token, target = caption + "\n" (conv sep).
    conv = conv_of([{"role": "user", "content": "<image>\nDescribe the image briefly."},
                    {"role": "assistant", "content": "A cat on a mat."}])  # fmt: skip
    segs = get_template("plain").segments(conv, bos="<s>", eos="</s>")
    assert segs == [Segment("<s><image>", False), Segment("A cat on a mat.\n", True)]
    with pytest.raises(DataError, match=r"t\.jsonl:1: plain template takes one user"):
        get_template("plain").segments(conv_of(TURNS), bos="<s>", eos="</s>")


@pytest.mark.parametrize("fam", ["sp", "bpe"])
def test_plain_jinja_renders_like_the_plain_template(fam, tokenizers):
    """`plain` has no upstream Jinja: its own statement of LLaVA's format must render as the template does."""
    tok, plain = tokenizers[fam], get_template("plain")
    messages = [
        {"role": "user", "content": "<image>\nDescribe it."},
        {"role": "assistant", "content": "A cat."},
    ]
    rendered = tok.apply_chat_template(messages, chat_template=plain.jinja, tokenize=False)
    assert rendered == plain.render(conv_of(messages), bos=tok.bos_token, eos=tok.eos_token)


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("name", CHAT_TEMPLATES)
def test_tokenizer_template_matches_named(name, gen, tokenizers, official_jinja, monkeypatch):
    tok = tokenizers["sp"]
    monkeypatch.setattr(tok, "chat_template", official_jinja[name])
    tpl = get_template("tokenizer", tok)
    assert tok.eos_token in tpl.stop_words or "<|im_end|>" in tpl.stop_words
    for case in CASES.values():
        messages = case[:-1] if gen else case
        kw = dict(bos=tok.bos_token, eos=tok.eos_token, add_generation_prompt=gen)
        assert tpl.segments(conv_of(messages), **kw) == get_template(name).segments(conv_of(messages), **kw)


def test_tokenizer_template_errors(tokenizers, monkeypatch):
    tok = tokenizers["sp"]
    monkeypatch.setattr(tok, "chat_template", None)
    with pytest.raises(ValueError, match="has no chat_template"):
        get_template("tokenizer", tok)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        get_template("tokenizer")
    # Renders only the last message: earlier turns are not a prefix of the whole.
    monkeypatch.setattr(tok, "chat_template", "{{ messages[-1]['content'] }}")
    with pytest.raises(DataError, match=r"t\.jsonl:1: .*not prefix-stable at message 1"):
        get_template("tokenizer", tok).segments(conv_of(TURNS), bos="<s>", eos="</s>")
    monkeypatch.setattr(tok, "chat_template", "{{ raise_exception('nope') }}")
    with pytest.raises(DataError, match="chat template failed: nope"):
        get_template("tokenizer", tok).segments(conv_of(TURNS), bos="<s>", eos="</s>")


@pytest.mark.parametrize(
    "roles, problem",
    [
        (["user", "user"], "message 1: expected role 'assistant', got 'user'"),
        (["assistant"], "message 0: expected role 'user'"),
        (["user", "assistant", "system"], "message 2: expected role 'user', got 'system'"),
        ([], "empty conversation"),
    ],
)
def test_bad_roles(roles, problem):
    conv = Conversation([Message(r, "x") for r in roles], source="d.json[3]")
    with pytest.raises(DataError, match=r"d\.json\[3\]: " + problem):
        get_template("internlm2_chat").segments(conv, bos="", eos="")


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown template 'chatml'"):
        get_template("chatml")


def test_each_template_carries_the_official_jinja_and_stop_words(official_reference):
    assert set(CHAT_TEMPLATES) == set(official_reference) - {"_about"}
    for name in CHAT_TEMPLATES:
        assert TEMPLATES[name].jinja == official_reference[name]["jinja"], name
        assert TEMPLATES[name].stop_words == official_reference[name]["stop_words"], name
        assert official_reference[name]["source"], name  # where the reference comes from


@pytest.mark.parametrize("fam", ["sp", "bpe"])
def test_a_template_other_than_the_tokenizers_own_is_named(fam, tokenizers, official_jinja, monkeypatch):
    tok = tokenizers[fam]
    for name in CHAT_TEMPLATES:
        monkeypatch.setattr(tok, "chat_template", official_jinja[name])
        assert differs_from_tokenizer(get_template(name), tok) is None, name  # each model's own: silent
        assert (
            differs_from_tokenizer(get_template("plain"), tok) is None
        )  # LLaVA pretraining: not a chat format
        other = "qwen2_chat" if name != "qwen2_chat" else "llama3_chat"
        problem = differs_from_tokenizer(get_template(other), tok)
        assert problem and problem.startswith(f"data.template '{other}' renders ") and "Hello" in problem
    monkeypatch.setattr(tok, "chat_template", None)
    assert differs_from_tokenizer(get_template("qwen2_chat"), tok) is None  # nothing to compare with
