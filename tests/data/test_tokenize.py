"""Encoder against independent references: the tokenizer on the whole text rendered by the official Jinja
(`apply_chat_template`), and trained spans stated from the official formats."""

from __future__ import annotations

from pathlib import Path

import mistral_common
import pytest
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from llava_ft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_ft.data.anyres import AnyresGeometry
from llava_ft.data.conversation import Conversation, DataError, Message
from llava_ft.data.templates import ChatTemplate, get_template
from llava_ft.data.tokenize import (
    DroppedSample,
    Encoder,
    EncodeStats,
    TokenizationMismatch,
    TokenizedSample,
    apply_limits,
    encode_all,
    expand_images,
)

N_IMG = 5
TURNS = [
    {"role": "user", "content": "<image>\nWhat is  in the picture? "},
    {"role": "assistant", "content": " A red  square.\n"},
    {"role": "user", "content": "Und die Farbe? 颜色"},
    {"role": "assistant", "content": "Rot (红)."},
]
CASES = {"multi": TURNS, "system_multi": [{"role": "system", "content": "Be brief."}, *TURNS]}
CHAT_TEMPLATES = ("internlm2_chat", "qwen2_chat", "llama2_chat", "llama3_chat", "vicuna_v1")


def conv_of(messages: list[dict], images=("a.png",)) -> Conversation:
    msgs = [Message(m["role"], m["content"]) for m in messages]
    return Conversation(msgs, images=list(images), source="t.jsonl:7")


def reference_ids(tok, text: str, n: int = N_IMG) -> list[int]:
    """The tokenizer on the whole text, split only at image markers."""
    ids: list[int] = []
    for k, part in enumerate(text.split("<image>")):
        ids += [IMAGE_TOKEN_INDEX] * n if k else []
        ids += tok(part, add_special_tokens=False)["input_ids"] if part else []
    return ids


def decode(tok, ids: list[int]) -> str:
    """Text of ids. SentencePieceBackend.decode leaves byte pieces as "<0x0A>", so decode with sentencepiece
    itself between special tokens."""
    if tok.is_fast:
        return tok.decode(ids)
    out, buf = [], []
    for i in [*ids, None]:
        if i is None or i in tok.all_special_ids:
            out.append(tok.sp_model.decode(buf))
            buf = []
            out.append(tok.convert_ids_to_tokens(i) if i is not None else "")
        else:
            buf.append(i)
    return "".join(out)


def trained_runs(tok, sample: TokenizedSample) -> list[str]:
    runs, cur = [], []
    for i, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE_INDEX:
            assert label == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return [decode(tok, r) for r in runs + ([cur] if cur else [])]


def same_text(tok, got: list[str], want: list[str]) -> bool:
    # Sentencepiece decoders drop a leading space of a piece of text; byte-level BPE round-trips exactly.
    if tok.is_fast and "Ġ" in tok.convert_ids_to_tokens(tok(" a", add_special_tokens=False)["input_ids"])[0]:
        return got == want
    return [g.lstrip(" ") for g in got] == [w.lstrip(" ") for w in want]


def encoder(tok, name="internlm2_chat", **kw) -> Encoder:
    return Encoder(tok, get_template(name, tok), **{"max_length": None, "image_tokens": N_IMG, **kw})


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", [*CHAT_TEMPLATES, "tokenizer"])
def test_ids_equal_whole_text_and_labels_cover_answers(
    name, case, family, tokenizers, official_jinja, trained_reference, monkeypatch
):
    tok = tokenizers[family]
    jinja = official_jinja["internlm2_chat" if name == "tokenizer" else name]
    monkeypatch.setattr(tok, "chat_template", jinja)
    messages = CASES[case]
    sample = encoder(tok, name).encode(conv_of(messages))

    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert sample.input_ids == reference_ids(tok, rendered)
    assert sample.num_images == 1 and sample.input_ids.count(IMAGE_TOKEN_INDEX) == N_IMG
    ref_name = "internlm2_chat" if name == "tokenizer" else name
    want = trained_reference(ref_name, messages, tok.bos_token, tok.eos_token)
    assert same_text(tok, trained_runs(tok, sample), want)
    # BOS, headers and image positions are never trained.
    untrained = {
        tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|start_header_id|>", "<|end_header_id|>")
    }
    for i, label in zip(sample.input_ids, sample.labels):
        if i in untrained or i == IMAGE_TOKEN_INDEX:
            assert label == IGNORE_INDEX
    if ref_name != "qwen2_chat":
        assert sample.input_ids[0] == tok.bos_token_id and sample.labels[0] == IGNORE_INDEX


def test_chatml_end_markers_and_separator(family, tokenizers):
    tok = tokenizers[family]
    sample = encoder(tok).encode(conv_of(CASES["system_multi"]))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ends = [(k, label) for k, (i, label) in enumerate(zip(sample.input_ids, sample.labels)) if i == im_end]
    # system, user, assistant, user, assistant: only the assistants' <|im_end|> is trained ...
    assert [label != IGNORE_INDEX for _, label in ends] == [False, False, True, False, True]
    # ... and whatever encodes the "\n" after it is not.
    k = ends[2][0]
    assert sample.labels[k + 1] == IGNORE_INDEX


def test_last_turn_only_and_opt_out(family, tokenizers, trained_reference):
    tok = tokenizers[family]
    want = trained_reference("internlm2_chat", TURNS, tok.bos_token, tok.eos_token)
    last = encoder(tok, last_turn_only=True).encode(conv_of(TURNS))
    assert same_text(tok, trained_runs(tok, last), want[1:])
    conv = conv_of(TURNS)
    conv.messages[1].trainable = False
    assert same_text(tok, trained_runs(tok, encoder(tok).encode(conv)), want[1:])


def test_text_kind_trains_everything_but_bos(family, tokenizers):
    tok = tokenizers[family]
    conv = Conversation([Message("assistant", "Plain  corpus text.\nSecond line 二.")], kind="text")
    text = conv.messages[0].content
    sample = encoder(tok).encode(conv)
    # As the tokenizer itself encodes a document (BOS as an id, then the text from its start, as pretraining
    # does), not the string "<s>" + text: sentencepiece would then start the first word without its "▁".
    assert sample.input_ids == [tok.bos_token_id] + reference_ids(tok, text + tok.eos_token)
    own = tok(text)["input_ids"]
    if own[0] == tok.bos_token_id:  # a tokenizer that adds BOS itself: exactly its own call, plus EOS
        assert sample.input_ids == own + [tok.eos_token_id]
    assert sample.labels == [IGNORE_INDEX] + sample.input_ids[1:]


def test_plain_template(family, tokenizers):
    tok = tokenizers[family]
    conv = conv_of(
        [{"role": "user", "content": "<image>\nDescribe."}, {"role": "assistant", "content": "A cat."}]
    )
    sample = encoder(tok, "plain").encode(conv)
    caption = tok("A cat.\n", add_special_tokens=False)["input_ids"]
    assert sample.input_ids == [tok.bos_token_id] + [IMAGE_TOKEN_INDEX] * N_IMG + caption
    assert sample.labels == [IGNORE_INDEX] * (1 + N_IMG) + caption


def test_images_are_atomic_and_never_trained(family, tokenizers):
    tok = tokenizers[family]
    messages = [{"role": "user", "content": "left<image>mid<image><image>right"},
                {"role": "assistant", "content": "x<image>y"}]  # fmt: skip
    sample = encoder(tok).encode(conv_of(messages, images=["a", "b", "c", "d"]))
    rendered = get_template("internlm2_chat").render(conv_of(messages), bos=tok.bos_token, eos=tok.eos_token)
    assert sample.input_ids == reference_ids(tok, rendered)
    assert sample.num_images == 4 and sample.input_ids.count(IMAGE_TOKEN_INDEX) == 4 * N_IMG
    assert all(
        label == IGNORE_INDEX for i, label in zip(sample.input_ids, sample.labels) if i == IMAGE_TOKEN_INDEX
    )
    # The text around each image is tokenized on its own: "mid" and "right" appear exactly as alone.
    mid = tok("mid", add_special_tokens=False)["input_ids"]
    first = sample.input_ids.index(IMAGE_TOKEN_INDEX) + N_IMG
    assert sample.input_ids[first : first + len(mid) + 1] == [*mid, IMAGE_TOKEN_INDEX]


def test_truncation_keeps_head_and_images(tokenizers):
    tok = tokenizers["bpe"]
    conv = conv_of(TURNS)
    full = encoder(tok).encode(conv)
    images_end = max(k for k, i in enumerate(full.input_ids) if i == IMAGE_TOKEN_INDEX) + 1
    answer_start = next(k for k, label in enumerate(full.labels) if label != IGNORE_INDEX)
    cut = encoder(tok, max_length=answer_start + 2).encode(conv)
    assert cut.truncated and not full.truncated
    assert (
        cut.input_ids == full.input_ids[: answer_start + 2] and cut.labels == full.labels[: answer_start + 2]
    )
    with pytest.raises(DroppedSample, match=r"t\.jsonl:7: dropped: images do not fit"):
        encoder(tok, max_length=images_end - 1).encode(conv)
    with pytest.raises(DroppedSample, match="no supervised tokens after truncation"):
        encoder(tok, max_length=answer_start).encode(conv)
    assert encoder(tok, max_length=len(full.input_ids)).encode(conv) == full


def test_zero_supervised_is_dropped(tokenizers):
    conv = conv_of(TURNS)
    for m in conv.messages:
        m.trainable = False
    with pytest.raises(DroppedSample, match="no supervised tokens"):
        encoder(tokenizers["bpe"]).encode(conv)


class _SplitWordTemplate(ChatTemplate):
    """Test-only: a segment boundary inside the word "Hello", which every tokenizer here keeps as one token."""

    name = "split_word"

    def _chat(self, conv, trained, out, *, bos, eos, generation_prompt):
        out.add(bos + "Question: hi. Answer: Hel", False)
        out.add("lo world" + eos, True)


def test_boundary_inside_a_token(family, tokenizers):
    tok = tokenizers[family]
    conv = conv_of(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello world"}], images=()
    )
    enc = Encoder(tok, _SplitWordTemplate(), max_length=None, image_tokens=N_IMG)
    whole = reference_ids(tok, f"{tok.bos_token}Question: hi. Answer: Hello world{tok.eos_token}")
    if not tok.is_fast:  # no offsets: the straddling token cannot be labelled, so the record is rejected
        with pytest.raises(
            TokenizationMismatch, match=r"t\.jsonl:7: segment/whole tokenization mismatch at token"
        ):
            enc.encode(conv)
        return
    sample = enc.encode(conv)
    assert sample.realigned and sample.input_ids == whole
    # The straddling token carries trained characters, so it is trained; everything after it too.
    first = next(k for k, label in enumerate(sample.labels) if label != IGNORE_INDEX)
    assert "Hel" in decode(tok, sample.input_ids[first : first + 1])
    assert sample.labels[first:] == sample.input_ids[first:]
    # Without the check the segment-wise ids are used as they are (and differ from the whole text).
    unchecked = Encoder(tok, _SplitWordTemplate(), max_length=None, image_tokens=N_IMG, check=False)
    assert unchecked.encode(conv).input_ids != whole


def test_encode_all_counts_everything(tokenizers):
    tok = tokenizers["sp"]
    good = conv_of(TURNS)
    opted = conv_of(TURNS)
    for m in opted.messages:
        m.trainable = False
    split = conv_of(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello world"}], images=()
    )
    split.source = "t.jsonl:9"
    enc = Encoder(tok, _SplitWordTemplate(), max_length=None, image_tokens=N_IMG)
    with pytest.raises(TokenizationMismatch):
        encode_all([split], enc)
    _, stats = encode_all([split], enc, skip_bad=True)
    assert (stats.records, stats.kept, stats.mismatched, stats.problems[0][0]) == (1, 0, 1, "t.jsonl:9")
    # Drops are policy: counted with their reason, never raised.
    samples, stats = encode_all([good, opted, split], encoder(tok))
    assert (stats.records, stats.kept, len(samples), stats.dropped) == (3, 2, 2, {"no supervised tokens": 1})
    assert [w for w, _ in stats.problems] == ["t.jsonl:7"] and stats.realigned == 2
    samples, stats = encode_all([good, opted, good], encoder(tok, max_length=N_IMG), skip_bad=True)
    assert stats.dropped == {"images do not fit": 2, "no supervised tokens": 1} and not samples
    samples, stats = encode_all([good, good], encoder(tok))
    assert stats.total_tokens == 2 * len(samples[0].input_ids)
    assert stats.image_tokens == 2 * N_IMG
    assert stats.supervised_tokens == 2 * sum(label != IGNORE_INDEX for label in samples[0].labels)
    tokens = stats.total_tokens
    pairs, more = encode_all([good], encoder(tok), keep_convs=True)
    assert pairs == [(good, samples[0])]
    assert stats.merge(more) is stats and (stats.records, stats.kept, stats.total_tokens) == (
        3,
        3,
        tokens * 3 // 2,
    )
    assert "records 3: kept 3" in stats.summary()
    assert stats.as_dict()["kept"] == 3


def test_bad_template_input_counted_as_failed(tokenizers):
    bad = conv_of([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], images=())
    with pytest.raises(DataError, match=r"t\.jsonl:7: message 1: expected role 'assistant'"):
        encode_all([bad], encoder(tokenizers["bpe"]))
    _, stats = encode_all([bad], encoder(tokenizers["bpe"]), skip_bad=True)
    assert stats.failed == 1 and stats.problems[0][0] == "t.jsonl:7"


def test_markers_must_be_single_tokens():
    sp_model = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    bare = SentencePieceBackend(
        vocab_file=str(sp_model), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    with pytest.raises(ValueError, match=r"encodes '<\|im_start\|>' as \d+ tokens"):
        encoder(bare)
    assert encoder(bare, "vicuna_v1").eos == "</s>"  # needs only bos/eos
    with pytest.raises(ValueError, match="image_tokens"):
        encoder(bare, "vicuna_v1", image_tokens=-1)


def test_encode_prompt_matches_official_generation_prompt(family, tokenizers, official_jinja, monkeypatch):
    tok = tokenizers[family]
    monkeypatch.setattr(tok, "chat_template", official_jinja["llama3_chat"])
    messages = TURNS[:3]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert encoder(tok, "llama3_chat").encode_prompt(conv_of(messages)) == reference_ids(tok, rendered)


def test_encode_stats_defaults():
    assert EncodeStats().summary().startswith("records 0: kept 0")


def test_text_only_model_rejects_image_records(tokenizers):
    tok = tokenizers["bpe"]
    conv = Conversation(
        [Message("user", "<image>\nWhat is it?"), Message("assistant", "a cat")],
        images=["a.png"],
        source="d.json[3]",
    )
    with pytest.raises(
        DataError, match=r"d.json\[3\]: record has 1 image\(s\) but the model has no vision tower"
    ):
        encoder(tok, image_tokens=0).encode(conv)
    text = Conversation([Message("user", "hi"), Message("assistant", "hello")])
    assert IMAGE_TOKEN_INDEX not in encoder(tok, image_tokens=0).encode(text).input_ids


# ---------------------------------------------------------------- image tokens per image (any-resolution)

GEOMETRY = AnyresGeometry.build(32, 4)  # a 32-px tower of 8-px patches: LLaVA-NeXT's five canvases
TWO_IMAGES = [
    {"role": "user", "content": "<image> and <image>: which is wider?"},
    {"role": "assistant", "content": "The first."},
]
SIZES = [(40, 100), (300, 90)]  # (height, width): wide and tall, so their counts differ


def image_spans(ids: list[int]) -> list[int]:
    """Lengths of the runs of IMAGE_TOKEN_INDEX, in order."""
    runs, n = [], 0
    for t in [*ids, None]:
        if t == IMAGE_TOKEN_INDEX:
            n += 1
        elif n:
            runs, n = [*runs, n], 0
    return runs


def test_expand_images_repeats_each_image_by_its_own_count():
    ids = [1, IMAGE_TOKEN_INDEX, 2, IMAGE_TOKEN_INDEX, 3]
    labels = [IGNORE_INDEX, IGNORE_INDEX, 2, IGNORE_INDEX, 3]
    out_ids, out_labels = expand_images(ids, labels, [2, 4])
    assert out_ids == [1, *[IMAGE_TOKEN_INDEX] * 2, 2, *[IMAGE_TOKEN_INDEX] * 4, 3]
    assert out_labels == [IGNORE_INDEX] * 3 + [2] + [IGNORE_INDEX] * 4 + [3]
    with pytest.raises(ValueError, match="2 image"):
        expand_images(ids, labels, [2])


def test_anyres_encoder_counts_each_image_from_its_size(tokenizers):
    tok = tokenizers["llama"]
    conv = conv_of(TWO_IMAGES, images=("a.png", "b.png"))
    want = [GEOMETRY.num_tokens(h, w) for h, w in SIZES]
    assert want[0] != want[1]
    sample = encoder(tok, image_tokens=GEOMETRY).encode_compact(conv, SIZES)
    assert sample.image_tokens == want and sample.num_images == 2
    expanded = sample.expand()
    assert image_spans(expanded.input_ids) == want and expanded.image_tokens == want
    assert sample.length == len(expanded.input_ids)
    # The text around the images is what a fixed count gives.
    fixed = encoder(tok, image_tokens=1).encode_compact(conv)
    assert (fixed.input_ids, fixed.labels) == (sample.input_ids, sample.labels)
    # Prompts expand by the same counts.
    prompt = conv_of(TWO_IMAGES[:1], images=("a.png", "b.png"))
    assert image_spans(encoder(tok, image_tokens=GEOMETRY).encode_prompt(prompt, SIZES)) == want
    # Without the sizes (or with too few): one line naming the record.
    for sizes, given in ((None, "none"), (SIZES[:1], "1")):
        with pytest.raises(DataError, match=rf"^t\.jsonl:7: any-resolution .*: 2 image\(s\), {given} size"):
            encoder(tok, image_tokens=GEOMETRY).encode(conv, sizes)
        with pytest.raises(DataError, match=r"^t\.jsonl:7: any-resolution"):
            encoder(tok, image_tokens=GEOMETRY).encode_prompt(prompt, sizes)


def test_truncation_never_cuts_an_image_span_with_variable_counts():
    img, ign = IMAGE_TOKEN_INDEX, IGNORE_INDEX
    ids = [5, img, 6, 7, img, 8, 9, 10, 11]
    labels = [ign, ign, 6, 7, ign, 8, 9, 10, 11]
    counts = [3, 10]
    full = len(ids) + sum(counts) - 2
    last_span_end = 5 + sum(counts) - 2  # compact index of the last image + 1, plus the expansion
    kept = []
    for max_length in range(1, full + 3):
        try:
            out_ids, out_labels, truncated = apply_limits(
                ids, labels, image_tokens=counts, max_length=max_length, where="w"
            )
        except DroppedSample as err:
            assert max_length < last_span_end and err.reason == "images do not fit"
            continue
        kept.append(max_length)
        expanded, _ = expand_images(out_ids, out_labels, counts)
        assert len(expanded) <= max_length and image_spans(expanded) == counts
        assert truncated == (max_length < full) and out_ids == ids[: len(out_ids)]
    assert kept[0] == last_span_end
    # The same ids at a fixed count of 3 fit much earlier: the counts are what is compared with max_length.
    assert apply_limits(ids, labels, image_tokens=[3, 3], max_length=9, where="w")[2]


def test_max_image_tokens_drops_and_counts(tokenizers):
    tok = tokenizers["bpe"]
    one = conv_of(TURNS)
    two = conv_of(TWO_IMAGES, images=("a.png", "b.png"))
    samples, stats = encode_all([one, two, one], encoder(tok, max_image_tokens=N_IMG))
    assert len(samples) == stats.kept == 2 and stats.dropped == {"too many image tokens": 1}
    assert stats.problems == [("t.jsonl:7", f"dropped: too many image tokens (2 image(s) carry {2 * N_IMG} > "
                                            f"data.max_image_tokens {N_IMG})")]  # fmt: skip
    assert "dropped (too many image tokens): 1" in stats.summary()
    # Per sample under any-resolution geometry: the wide image fits alone, not with the tall one.
    small, both = GEOMETRY.num_tokens(*SIZES[0]), sum(GEOMETRY.num_tokens(*s) for s in SIZES)
    enc = encoder(tok, image_tokens=GEOMETRY, max_image_tokens=both - 1)
    assert enc.encode_compact(conv_of(TURNS), SIZES[:1]).image_tokens == [small]
    with pytest.raises(DroppedSample, match="too many image tokens"):
        enc.encode_compact(two, SIZES)
    with pytest.raises(ValueError, match="max_image_tokens"):
        encoder(tok, max_image_tokens=0)


def test_encode_stats_report_the_image_token_distribution(tokenizers):
    tok = tokenizers["bpe"]
    enc = encoder(tok, image_tokens=GEOMETRY)
    stats = EncodeStats()
    sizes = [[(40, 100)], [(300, 90), (40, 100)], [(64, 64)], []]
    text_only = [{"role": "user", "content": "hi"}, TURNS[1]]
    for s in sizes:
        messages = {0: text_only, 1: TURNS, 2: TWO_IMAGES}[len(s)]
        stats.add(enc.encode_compact(conv_of(messages, images=[f"{k}.png" for k in range(len(s))]), s))
    per_image = sorted(GEOMETRY.num_tokens(h, w) for s in sizes for h, w in s)
    per_sample = sorted(sum(GEOMETRY.num_tokens(h, w) for h, w in s) for s in sizes if s)
    assert sorted(stats.tokens_per_image.elements()) == per_image
    assert sorted(stats.tokens_per_sample.elements()) == per_sample
    assert stats.image_tokens == sum(per_image)
    lines = stats.image_token_lines()
    assert lines == [
        f"image tokens per image: min {per_image[0]}  median {per_image[1]}  p95 {per_image[-1]}  "
        f"max {per_image[-1]}  (4)",
        f"image tokens per sample: min {per_sample[0]}  median {per_sample[1]}  p95 {per_sample[-1]}  "
        f"max {per_sample[-1]}  (3)",
    ]
    # A kept sample found bad afterwards takes its images out of the distribution.
    stats.unkeep([("x", "gone")], total=0, supervised=0, image=[[GEOMETRY.num_tokens(64, 64)]])
    assert sorted(stats.tokens_per_image.elements()) == sorted(
        GEOMETRY.num_tokens(h, w) for s in sizes[:2] for h, w in s
    )
    assert len(list(stats.tokens_per_sample.elements())) == 2
    assert EncodeStats().image_token_lines() == []
