"""Source adapters: each format -> the Conversation written out by hand; every bad record named by file+line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_ft.data.conversation import Conversation, DataError, Message
from llava_ft.data.sources import iter_conversations, read_conversations


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records) + "\n"
    )
    return path


def test_llava_json(tmp_path):
    records = [
        {"id": 7, "image": "coco/1.jpg", "conversations": [
            {"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A cat."},
            {"from": "user", "value": "Colour?"}, {"from": "assistant", "value": "Black.", "train": False}]},
        # No marker: LLaVA puts the image before the first user turn.
        {"id": "b", "image": "coco/2.jpg", "conversations": [
            {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Describe."},
            {"from": "gpt", "value": "A dog."}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]  # fmt: skip
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    convs, bad = read_conversations(path)
    assert len(bad) == 0
    assert convs == [
        Conversation(
            [Message("user", "<image>\nWhat is this?"), Message("assistant", "A cat."),
             Message("user", "Colour?"), Message("assistant", "Black.", trainable=False)],
            images=["coco/1.jpg"], id="7", source=f"{path}[0]",
        ),
        Conversation(
            [Message("system", "Be brief."), Message("user", "<image>\nDescribe."), Message("assistant", "A dog.")],
            images=["coco/2.jpg"], id="b", source=f"{path}[1]",
        ),
        Conversation([Message("user", "Hi"), Message("assistant", "Hello")], id="text-only", source=f"{path}[2]"),
    ]  # fmt: skip


def _llava_preprocess_multimodal(value: str) -> str:
    """LLaVA-1.5's training rule (llava/train/train.py, preprocess_multimodal), restated: a turn holding the marker
    becomes the marker, a newline and the rest of its text, stripped."""
    if "<image>" not in value:
        return value
    return ("<image>\n" + value.replace("<image>", "").strip()).strip()


@pytest.mark.parametrize(
    "value",
    [
        "What is this?\n<image>",
        "  <image>\n\nWhat is this?  \n",
        "Look: <image> what?",
        "<image>",
        "<image>\nPlain.",
    ],
)
def test_llava_single_image_goes_first_as_llava_trains_it(tmp_path, value):
    # The marker in a later turn; other turns keep their text as written (LLaVA strips only the marker's turn).
    record = {"image": "a.jpg", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": " Hello "},
        {"from": "human", "value": value}, {"from": "gpt", "value": "Yes."}]}  # fmt: skip
    (conv,), _ = read_conversations(write_jsonl(tmp_path / "a.jsonl", [record]))
    assert [m.content for m in conv.messages] == [
        "Hi",
        " Hello ",
        _llava_preprocess_multimodal(value),
        "Yes.",
    ]


def test_llava_multi_image_markers_stay_where_written(tmp_path):
    value = "Compare <image> with <image> please."
    record = {"images": ["a.jpg", "b.jpg"], "conversations": [
        {"from": "human", "value": value}, {"from": "gpt", "value": "Same."}]}  # fmt: skip
    (conv,), _ = read_conversations(write_jsonl(tmp_path / "a.jsonl", [record]))
    assert conv.messages[0].content == value


def test_xtuner_alpaca_text_jsonl(tmp_path):
    xt = write_jsonl(tmp_path / "xt.jsonl", [{"image": ["a.png", "b.png"], "conversation": [
        {"system": "Sys", "input": "<image><image>\nSame?", "output": "No."},
        {"system": "", "input": "Why?", "output": "Colours.", "need_eos_token": True}]}])  # fmt: skip
    assert read_conversations(xt)[0] == [
        Conversation(
            [Message("system", "Sys"), Message("user", "<image><image>\nSame?"), Message("assistant", "No."),
             Message("user", "Why?"), Message("assistant", "Colours.")],
            images=["a.png", "b.png"], source=f"{xt}:1",
        )
    ]  # fmt: skip
    al = write_jsonl(tmp_path / "al.jsonl", [
        {"instruction": "Translate.", "input": "Hallo", "output": "Hello", "system": "You translate."},
        {"instruction": "Say hi.", "input": "", "output": "Hi"}])  # fmt: skip
    convs, _ = read_conversations(al)
    assert [c.messages for c in convs] == [
        [
            Message("system", "You translate."),
            Message("user", "Translate.\nHallo"),
            Message("assistant", "Hello"),
        ],
        [Message("user", "Say hi."), Message("assistant", "Hi")],
    ]
    tx = write_jsonl(tmp_path / "tx.jsonl", [{"text": "Some corpus."}])
    assert read_conversations(tx)[0] == [
        Conversation([Message("assistant", "Some corpus.")], kind="text", source=f"{tx}:1")
    ]


def test_openai_messages(tmp_path):
    path = write_jsonl(tmp_path / "oa.jsonl", [
        {"messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image_url",
                                         "image_url": {"url": "img/x.png"}}, {"type": "text", "text": " what?"}]},
            {"role": "assistant", "content": "A box.", "weight": 0},
            {"role": "user", "content": "And?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Red."}], "loss": True}]},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hm"}]},
                      {"role": "assistant", "content": "Ok", "train": False}], "images": ["y.png"]},
    ])  # fmt: skip
    convs, _ = read_conversations(path)
    assert convs[0] == Conversation(
        [Message("system", "S"), Message("user", "Look: <image>\n what?"),
         Message("assistant", "A box.", trainable=False), Message("user", "And?"), Message("assistant", "Red.")],
        images=["img/x.png"], source=f"{path}:1",
    )  # fmt: skip
    assert convs[1].images == ["y.png"] and convs[1].messages[0].content == "<image>\nHm"
    assert convs[1].messages[1].trainable is False


@pytest.mark.parametrize(
    "parts",
    [
        [{"type": "image"}, {"type": "text", "text": "What colour?"}],
        [
            {"type": "text", "text": "Compare"},
            {"type": "image"},
            {"type": "image"},
            {"type": "text", "text": "now."},
        ],
    ],
)
def test_openai_parts_read_as_an_hf_llava_export_renders_them(tmp_path, parts):
    """Content parts train on the text an exported model's processor renders for the same parts (its chat
    template turns them into a string first), so training and inference see the same prompt."""
    import jinja2

    from llava_ft.export import _CONTENT_AS_TEXT

    n_images = sum(p["type"] == "image" for p in parts)
    messages = [{"role": "user", "content": parts}, {"role": "assistant", "content": "Red."}]
    path = write_jsonl(
        tmp_path / "oa.jsonl", [{"messages": messages, "images": [f"{i}.png" for i in range(n_images)]}]
    )
    (conv,), _ = read_conversations(path)
    rendered = jinja2.Template(_CONTENT_AS_TEXT + "{{ messages[0]['content'] }}").render(messages=messages)
    assert conv.messages[0].content == rendered
    if n_images == 1:  # and what chat asks: the image, a newline, the question
        assert rendered == "<image>\nWhat colour?"


def test_format_detected_per_file_or_named(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "instruction": "x", "output": "y"}])
    assert read_conversations(path)[0][0].kind == "chat"  # "instruction" wins over "text" (alpaca first)
    assert read_conversations(path, "text")[0][0].kind == "text"
    with pytest.raises(ValueError, match="unknown data format 'sharegpt'"):
        read_conversations(path, "sharegpt")


GOOD = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}


@pytest.mark.parametrize(
    "record, problem",
    [
        ("{not json", "malformed JSON line"),
        ({"conversations": [{"from": "human"}]}, "missing key 'value'"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "turn 0: unknown role 'robot'"),
        ({"conversations": []}, "empty conversation"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]},
         "message 1: expected role 'assistant', got 'user'"),
        ({"conversations": [{"from": "human", "value": "q"}]}, "must end with an assistant turn"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]}, "empty assistant turn"),
        ({**GOOD, "image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}]}, "1 <image> marker.* but 2 image"),
        ({"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]},
         "1 <image> marker.* but 0 image"),
        ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]}, "must be a string"),
        ({"conversation": "x"}, "missing key 'conversations'"),
        ([1, 2], "must be a JSON object"),
    ],
)  # fmt: skip
def test_bad_record_names_file_and_line(tmp_path, record, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", record])  # the bad record is on line 3
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: .*{problem}"):
        read_conversations(path)
    convs, bad = read_conversations(path, "llava", skip_bad=True)
    assert len(convs) == 1 and [where for where, _ in bad.items] == [f"{path}:3"]
    assert f"{path}:3" in bad.summary() and "bad records: 1" in bad.summary()


def test_json_list_index_and_file_errors(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([GOOD, {"conversations": [{"from": "gpt", "value": "a"}]}]))
    with pytest.raises(DataError, match=r"d\.json\[1\]: message 0: expected role 'user'"):
        read_conversations(path)
    (tmp_path / "obj.json").write_text(json.dumps(GOOD))
    with pytest.raises(DataError, match="must hold a list of records"):
        read_conversations(tmp_path / "obj.json")
    (tmp_path / "broken.json").write_text('[\n{"a": 1},\n{oops}\n]')
    with pytest.raises(DataError, match=r"broken\.json:3: malformed JSON"):
        read_conversations(tmp_path / "broken.json")
    with pytest.raises(DataError, match=r"missing\.jsonl: cannot read file"):
        read_conversations(tmp_path / "missing.jsonl")
    (tmp_path / "latin.jsonl").write_bytes(
        json.dumps(GOOD).encode() + b"\n" + '{"text": "caf\xe9"}'.encode("latin-1")
    )
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not UTF-8"):
        read_conversations(tmp_path / "latin.jsonl")
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(DataError, match=r"d\.csv: expected a \.json"):
        read_conversations(tmp_path / "d.csv")


def test_iter_is_lazy(tmp_path):
    path = write_jsonl(tmp_path / "lazy.jsonl", [GOOD, "{broken"])
    it = iter_conversations(path)
    assert next(it).source == f"{path}:1"  # the bad line 2 is not parsed yet
    with pytest.raises(DataError, match=r"lazy\.jsonl:2"):
        next(it)


def test_image_spellings_and_alpaca_history(tmp_path):
    """`image` or `images` in every chat format; LLaMA-Factory's alpaca `history` turns come first."""
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"images": ["a.png"], "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"image": "b.png", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ])  # fmt: skip
    llava, _ = read_conversations(path, "llava", skip_bad=True)
    openai, _ = read_conversations(path, "openai", skip_bad=True)
    assert llava[0].images == ["a.png"] and llava[0].messages[0].content == "<image>\nq"
    assert openai[0].images == ["b.png"] and openai[0].messages[0].content == "<image>\nq"
    al = write_jsonl(tmp_path / "al.jsonl", [{"instruction": "And then?", "output": "He left.", "images": "c.png",
                                             "history": [["Who came?", "Tom."], ["When?", "At noon."]]}])  # fmt: skip
    (conv,), _ = read_conversations(al)
    assert conv.messages == [
        Message("user", "<image>\nWho came?"), Message("assistant", "Tom."), Message("user", "When?"),
        Message("assistant", "At noon."), Message("user", "And then?"), Message("assistant", "He left."),
    ]  # fmt: skip
    assert conv.images == ["c.png"]


CHAT = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


@pytest.mark.parametrize(
    "fmt, record, problem",
    [
        ("openai", {"messages": [{"role": ["user"], "content": "q"}]}, r"message 0: unknown role \['user'\]"),
        ("openai", {"messages": [CHAT[0], {**CHAT[1], "weight": 0.5}]}, "message 1: 'weight' must be 0 or 1"),
        ("openai", {"messages": [CHAT[0], {**CHAT[1], "loss": 0}]}, "message 1: 'loss' must be true or false"),
        ("llava", {**GOOD, "conversations": [GOOD["conversations"][0], {**GOOD["conversations"][1],
         "train": "false"}]}, "turn 1: 'train' must be true or false"),  # fmt: skip
        ("llava", {**GOOD, "image": "a.png", "images": ["a.png"]}, "both 'image' and 'images'"),
        ("alpaca", {"instruction": "i", "output": "o", "input": 0}, "'input' must be a string"),
        ("alpaca", {"instruction": "i", "output": "o", "system": False}, "'system' must be a string"),
        ("alpaca", {"instruction": "i", "output": "o", "history": [["q"]]}, "history 0: must be an"),
        ("xtuner", {"conversation": [{"system": 0, "input": "i", "output": "o"}]}, "item 0 'system' must be"),
        ("text", {"text": "corpus", "image": "a.png"}, "plain-text records take no images"),
    ],
)  # fmt: skip
def test_wrong_values_are_refused_not_ignored(tmp_path, fmt, record, problem):
    """A wrong-typed optional field or an opt-out flag that is not a boolean is an error naming the record:
    read as absent, it would silently change what trains."""
    path = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(DataError, match=rf"bad\.jsonl:1: .*{problem}"):
        read_conversations(path, fmt)
    convs, bad = read_conversations(path, fmt, skip_bad=True)
    assert convs == [] and len(bad) == 1


@pytest.mark.parametrize("fmt", ["llava", "openai"])
def test_opening_assistant_turn_is_trimmed_as_llava_does(tmp_path, fmt):
    """LLaVA-1.5 leaves out an assistant turn that opens a record (after an optional system message) and
    trains the rest; the conversation says so, for the "trimmed" count. One marker in that turn moves to the
    first user turn, as for a record without markers."""
    greeting = [
        ("assistant", "<image>\nHello! Ask me about the picture."),
        ("user", "What is it?"),
        ("assistant", "A cat."),
    ]

    def record(turns):
        if fmt == "llava":
            names = {"system": "system", "user": "human", "assistant": "gpt"}
            return {"image": "x.png", "conversations": [{"from": names[r], "value": v} for r, v in turns]}
        return {"images": ["x.png"], "messages": [{"role": r, "content": v} for r, v in turns]}

    rows = [record(greeting), record(greeting[1:]), record([("system", "Be brief."), *greeting])]
    convs, _ = read_conversations(write_jsonl(tmp_path / "d.jsonl", rows), fmt)
    want = [Message("user", "<image>\nWhat is it?"), Message("assistant", "A cat.")]
    assert [c.messages for c in convs] == [want, want, [Message("system", "Be brief."), *want]]
    assert [c.trimmed for c in convs] == [True, False, True]
    # Only one opening turn goes, as in LLaVA: two in a row still break the alternation.
    twice = record([greeting[0], *greeting])
    with pytest.raises(DataError, match="message 0: expected role 'user', got 'assistant'"):
        read_conversations(write_jsonl(tmp_path / "e.jsonl", [twice]), fmt)
