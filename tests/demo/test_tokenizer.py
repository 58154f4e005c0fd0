"""The tiny InternLM2-format tokenizer, checked with sentencepiece itself, the official InternLM2 chat template
(rendered by jinja2) and transformers' sentencepiece tokenizer backend."""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import jinja2
import pytest
import sentencepiece as spm
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from llava_ft.demo.shapes import corpus_texts, generate_shapes_dataset, vocab_words
from llava_ft.demo.tokenizer import CHAT_ROLES, INTERNLM2_SPECIAL_TOKENS, build_tiny_tokenizer

TEMPLATES = Path(__file__).parents[1] / "reference" / "chat_templates.json"
ROLE = {"human": "user", "gpt": "assistant"}
MARKUP = re.compile(r"(<\|im_start\|>|<\|im_end\|>|\n)")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train_images=60, n_heldout_images=8)


@pytest.fixture(scope="module")
def texts(data) -> list[str]:
    return corpus_texts(data)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, texts) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), texts)


@pytest.fixture(scope="module")
def sp(model_path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(model_path))


@pytest.fixture(scope="module")
def chats(data) -> list[str]:
    """Finetune records rendered with the official InternLM2 chat template (bos left to the tokenizer)."""
    template = jinja2.Template(json.loads(TEMPLATES.read_text())["internlm2_chat"]["jinja"])
    rendered = []
    for record in json.loads(data.finetune.read_text()):
        messages = [{"role": ROLE[t["from"]], "content": t["value"]} for t in record["conversations"]]
        if len(rendered) % 5 == 0:
            messages.insert(0, {"role": "system", "content": "Answer in one word."})
        rendered.append(template.render(messages=messages, bos_token="", add_generation_prompt=False))
        rendered.append(template.render(messages=messages[:-1], bos_token="", add_generation_prompt=True))
    return rendered


def test_special_tokens(sp):
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    for token in INTERNLM2_SPECIAL_TOKENS:
        (token_id,) = sp.encode(token)
        assert sp.id_to_piece(token_id) == token
    assert 100 <= sp.get_piece_size() <= 1000  # a few hundred pieces, the words of both settings included


def test_vocabulary_words_are_single_pieces(sp):
    # The tokenizer's words are runs of word characters ("option's" is two).
    words = {w for word in vocab_words("default") for w in re.findall(r"\w+", word)}
    for word in (*sorted(words), *CHAT_ROLES):
        assert sp.encode(word, out_type=str) == [word]
        assert sp.encode(" " + word, out_type=str) == ["▁" + word]


def test_data_texts_round_trip_without_unk(sp, texts):
    for text in texts:
        ids = sp.encode(text)
        assert sp.unk_id() not in ids, text
        assert sp.decode(ids) == text


def test_chat_strings_round_trip_and_markers_are_single_ids(sp, chats):
    im_start, im_end, newline = (sp.piece_to_id(p) for p in ("<|im_start|>", "<|im_end|>", "\n"))
    for chat in chats:
        ids = sp.encode(chat)
        assert sp.decode(ids) == chat
        assert sp.unk_id() not in ids
        assert ids.count(im_start) == chat.count("<|im_start|>") > 0
        assert ids.count(im_end) == chat.count("<|im_end|>")
        assert ids.count(newline) == chat.count("\n")


def test_encoding_is_the_same_whole_or_cut_at_markup(sp, chats):
    # Labels are built turn by turn and transformers encodes between special tokens: both must agree with
    # encoding the whole string, which a dummy "▁" prefix would break.
    for chat in chats:
        pieces = [p for p in MARKUP.split(chat) if p]
        assert [i for p in pieces for i in sp.encode(p)] == sp.encode(chat)


def test_whitespace_and_ascii_round_trip(sp):
    for text in ["  two  spaces\n\n and trailing ", "\nred\n", " ", "x" + string.punctuation + string.digits]:
        assert sp.decode(sp.encode(text)) == text
        assert sp.unk_id() not in sp.encode(text)
    assert sp.unk_id() in sp.encode("héllo")  # outside ASCII and the data: <unk>, not silently dropped


def test_transformers_backend_agrees(model_path, sp, chats):
    tok = SentencePieceBackend(
        vocab_file=str(model_path),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens=list(INTERNLM2_SPECIAL_TOKENS),
    )
    for chat in chats[:50]:
        assert tok.encode(chat, add_special_tokens=False) == sp.encode(chat)


def test_deterministic(tmp_path, texts, model_path):
    again = build_tiny_tokenizer(tmp_path / "a", texts)
    assert again.name == "tokenizer.model"
    assert again.read_bytes() == model_path.read_bytes()
    assert build_tiny_tokenizer(tmp_path / "b", texts + ["zebra"]).read_bytes() != model_path.read_bytes()


def test_no_texts(tmp_path):
    with pytest.raises(ValueError, match="no texts"):
        build_tiny_tokenizer(tmp_path, [])
