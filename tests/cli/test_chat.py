"""`llava-ft chat` through the real entry point, against conversations built by hand and answered with
`Assistant.generate_messages` (each turn's images' markers in front of its question, earlier answers in the
history)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava_ft.cli.chat import ChatSession, line_history, readline, run_interactive
from llava_ft.cli.main import main
from llava_ft.constants import IMAGE_TOKEN_INDEX
from llava_ft.data.conversation import Message
from llava_ft.inference import Assistant, load_assistant
from llava_ft.model.llava import LlavaModel
from llava_ft.stage import read_stage_config
from llava_ft.testing.tiny_llava import write_tiny_stage_output

MAX_NEW = 6
REFERENCE = Path(__file__).parents[1] / "reference" / "chat_templates.json"
GEN = {"max_new_tokens": MAX_NEW, "temperature": 0.0, "top_p": 1.0}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("chat")
    red, blue = root / "red.png", root / "blue.jpg"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(red)
    Image.new("RGB", (30, 30), (10, 10, 200)).save(blue)
    broken = root / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return {
        "vision": write_tiny_stage_output(root, root / "vision", vision_backend="open_clip"),
        "text": write_tiny_stage_output(root, root / "text", vision_backend=None),
        "red": red,
        "blue": blue,
        "broken": broken,
        "root": root,
    }


@pytest.fixture(scope="module")
def assistant(files):
    return load_assistant(str(files["vision"]), device="cpu")


def reference(assistant, turns: list[str], image_path=None) -> list[str]:
    """Answers of one conversation, built by hand: `<image>\\n` before the first question only."""
    return reference_turns(
        assistant, [(q, [image_path] if image_path and k == 0 else []) for k, q in enumerate(turns)]
    )


def reference_turns(assistant, turns: list[tuple[str, list]]) -> list[str]:
    """Answers of one conversation built by hand from (question, its image paths) turns: a turn's markers in
    front of its question (`<image>` once per image, then a line break), the images in marker order."""
    history: list[Message] = []
    images: list = []
    answers = []
    for question, paths in turns:
        images += [Image.open(p).convert("RGB") for p in paths]
        history.append(Message("user", "<image>" * len(paths) + "\n" + question if paths else question))
        answer = assistant.generate_messages([(history, list(images))], **GEN)[0]
        history.append(Message("assistant", answer))
        answers.append(answer)
    return answers


def chat(argv: list[str], capsys, monkeypatch, stdin: str = "") -> tuple[int, list[str], str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))  # not a terminal: script mode
    rc = main(["chat", *map(str, argv), "--max-new-tokens", str(MAX_NEW)])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err


def escaped(answer: str) -> str:
    return answer.replace("\\", "\\\\").replace("\n", "\\n")


def test_questions_are_turns_of_one_conversation(files, assistant, capsys, monkeypatch):
    turns = ["What is in the picture?", "And what colour is it?"]
    rc, lines, _ = chat(
        [files["vision"], "--image", files["red"], "--question", turns[0], "--question", turns[1]],
        capsys,
        monkeypatch,
    )
    assert rc == 0
    expected = reference(assistant, turns, files["red"])
    assert lines == [escaped(a) for a in expected]
    # The second answer depends on the first turn: a fresh conversation answers it differently.
    assert expected[1] != reference(assistant, turns[1:], files["red"])[0]


def test_stdin_questions_equal_question_flags(files, assistant, capsys, monkeypatch):
    turns = ["hello", "tell me more"]
    rc, lines, _ = chat([files["vision"]], capsys, monkeypatch, stdin="hello\n\ntell me more\n")
    assert rc == 0
    assert lines == [escaped(a) for a in reference(assistant, turns)]


def test_image_command_adds_an_image_and_reset_starts_again(files, assistant, capsys, monkeypatch):
    """/image adds an image to the conversation (the next question carries it); /reset drops the turns and the
    images added to them, and the --image image opens the new conversation again."""
    lines = ["What is this?", f"/image {files['blue']}", "What is this?", "Describe it.", "/reset"]
    stdin = "\n".join([*lines, "Describe it.", "/exit", "ignored", ""])
    rc, lines, _ = chat([files["vision"], "--image", files["red"]], capsys, monkeypatch, stdin=stdin)
    assert rc == 0
    red, blue = files["red"], files["blue"]
    first = reference_turns(
        assistant, [("What is this?", [red]), ("What is this?", [blue]), ("Describe it.", [])]
    )
    after_reset = reference(assistant, ["Describe it."], red)
    assert lines == [escaped(a) for a in first + after_reset]
    # The blue image reached the second turn: without it the same turn is answered differently.
    without = reference_turns(assistant, [("What is this?", [red]), ("What is this?", [])])
    assert first[1] != without[1], "the second image must change the answer for the test to mean anything"


def test_several_images_before_one_question(files, assistant, capsys, monkeypatch):
    """Several /image before a question all go to it, in order; a later /image goes to its own turn. The
    prompt ids are the official template's, with each marker's span of image positions where its marker is,
    and the embeddings at each span are the features of the image added there."""
    seen: list[tuple[list[Message], list]] = []
    prompt_ids = Assistant.prompt_ids
    generate = Assistant.generate_messages
    monkeypatch.setattr(
        Assistant, "prompt_ids", lambda self, m, n: seen.append(list(m)) or prompt_ids(self, m, n)
    )
    given: list[list] = []
    monkeypatch.setattr(
        Assistant,
        "generate_messages",
        lambda self, batch, **kw: given.append(list(batch[0][1])) or generate(self, batch, **kw),
    )
    embedded = []
    real_embed = LlavaModel.embed

    def embed_spy(self, input_ids, *args, **kwargs):
        embeds = real_embed(self, input_ids, *args, **kwargs)
        embedded.append((self, input_ids, embeds))
        return embeds

    monkeypatch.setattr(LlavaModel, "embed", embed_spy)
    red, blue = files["red"], files["blue"]
    stdin = f"/image {red}\n/image {blue}\nCompare them.\n/image {red}\nAnd this one?\n"
    rc, lines, _ = chat([files["vision"]], capsys, monkeypatch, stdin=stdin)
    assert rc == 0
    monkeypatch.undo()  # the reference below is answered by the real methods
    turns = [("Compare them.", [red, blue]), ("And this one?", [red])]
    assert lines == [escaped(a) for a in reference_turns(assistant, turns)]

    pixels = [list(Image.open(p).convert("RGB").getdata()) for p in (red, blue, red)]
    assert [[list(im.getdata()) for im in images] for images in given] == [pixels[:2], pixels]
    span = assistant.prompt_ids([Message("user", "<image>\nx")], 1).count(IMAGE_TOKEN_INDEX)
    assert span > 1
    name = read_stage_config(files["vision"]).data.template
    official = json.loads(REFERENCE.read_text())[name]["jinja"]
    for messages, n_images in zip(seen, (2, 3)):
        dicts = [{"role": m.role, "content": m.content} for m in messages]
        text = assistant.tokenizer.apply_chat_template(
            dicts, chat_template=official, tokenize=False, add_generation_prompt=True
        )
        assert text.count("<image>") == n_images
        expected: list[int] = []
        for k, part in enumerate(text.split("<image>")):
            expected += [IMAGE_TOKEN_INDEX] * span if k else []
            expected += assistant.tokenizer(part, add_special_tokens=False)["input_ids"] if part else []
        assert assistant.prompt_ids(messages, n_images) == expected

    prompts = [call for call in embedded if (call[1] == IMAGE_TOKEN_INDEX).any()]
    assert len(prompts) == 2
    for (model, input_ids, embeds), paths in zip(prompts, ([red, blue], [red, blue, red])):
        positions = (input_ids[0] == IMAGE_TOKEN_INDEX).nonzero().flatten()
        assert len(positions) == span * len(paths)
        for k, path in enumerate(paths):
            pixel_values = model.vision_tower.processor(Image.open(path).convert("RGB"))[None]
            with torch.no_grad():  # the image alone: one span through the same embed
                alone = real_embed(model, torch.full((1, span), IMAGE_TOKEN_INDEX), pixel_values)[0]
            torch.testing.assert_close(embeds[0, positions[k * span : (k + 1) * span]], alone)
    assert seen[0][-1].content == "<image><image>\nCompare them."
    assert [m.content for m in seen[1] if m.role == "user"] == [
        "<image><image>\nCompare them.",
        "<image>\nAnd this one?",
    ]


def test_typed_image_marker_is_refused(files, capsys, monkeypatch):
    rc, lines, err = chat(
        [files["vision"], "--image", files["red"]], capsys, monkeypatch, stdin="look: <image>\n"
    )
    assert rc == 2 and lines == [] and "<image> is reserved" in err


@pytest.mark.parametrize(
    ("which", "argv_extra", "message"),
    [
        ("missing", ["--image", "no_such.png"], "no_such.png: image file not found"),
        ("broken", ["--image", "{broken}"], "not a readable image"),
        ("folder", [], "not a llava_ft stage output"),
        ("text", ["--image", "{red}"], "text-only"),
    ],
)
def test_errors_are_one_line_exit_2(files, capsys, monkeypatch, which, argv_extra, message):
    ckpt = {"folder": files["root"], "text": files["text"]}.get(which, files["vision"])
    argv = [ckpt, *(a.format(**files) for a in argv_extra), "--question", "hi"]
    rc, lines, err = chat(argv, capsys, monkeypatch)
    assert rc == 2 and lines == []
    assert err.strip().splitlines() == [err.strip()] and err.startswith("llava-ft chat: error:")
    assert message in err


def test_bad_image_command_in_script_is_exit_2(files, capsys, monkeypatch):
    rc, lines, err = chat([files["vision"]], capsys, monkeypatch, stdin="hi\n\n/image nowhere.png\nhi\n")
    assert rc == 2 and len(lines) == 1
    # the stdin line that failed (a command, after a blank line), not a count of questions
    assert "error: line 3: " in err and "nowhere.png: image file not found" in err
    argv = [files["vision"], "--question", "hi", "--question", "/image nowhere.png"]
    rc, lines, err = chat(argv, capsys, monkeypatch)
    assert rc == 2 and "error: --question 2: " in err


def test_text_only_checkpoint_chats_without_image(files, capsys, monkeypatch):
    rc, lines, _ = chat([files["text"], "--question", "hello"], capsys, monkeypatch)
    assert rc == 0
    text_assistant = load_assistant(str(files["text"]), device="cpu")
    assert lines == [escaped(a) for a in reference(text_assistant, ["hello"])]


def test_interactive_session_streams_and_keeps_history(files, assistant):
    session = ChatSession(assistant, opening=[Image.open(files["red"]).convert("RGB")], gen=GEN)
    session.reset()
    inputs = iter(["What is this?", "/image nowhere.png", "/bogus", "And then?", "/exit", "never read"])
    out = io.StringIO()
    assert run_interactive(session, read=lambda prompt: next(inputs), out=out) == 0
    expected = reference(assistant, ["What is this?", "And then?"], files["red"])
    text = out.getvalue()
    assert f"assistant> {expected[0]}\n" in text and f"assistant> {expected[1]}\n" in text
    assert "error: nowhere.png: image file not found" in text and "unknown command '/bogus'" in text
    assert [m.role for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert text.startswith("chat (the next question carries 1 image); commands: /image PATH")


def test_interactive_image_and_reset_say_what_the_next_question_carries(files, assistant):
    session = ChatSession(assistant, gen=GEN)
    blue = str(files["blue"])
    inputs = iter([f"/image {blue}", f"/image {blue}", "What is this?", "/reset", "/exit"])
    out = io.StringIO()
    assert run_interactive(session, read=lambda prompt: next(inputs), out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("chat (no image for the next question)")
    assert lines[1:3] == ["(the next question carries 1 image)", "(the next question carries 2 images)"]
    assert lines[-1] == "(new conversation; no image for the next question)"
    assert session.history == [] and session.images == [] and session.pending == []


def test_load_4bit_answers(files, capsys, monkeypatch):
    """The flag reaches the loader: bitsandbytes quantizes the LLM (its CPU backend here) and chat answers."""
    rc, lines, _ = chat(
        [files["vision"], "--image", files["red"], "--question", "hi", "--load-4bit"], capsys, monkeypatch
    )
    assert rc == 0 and len(lines) == 1


SYSTEM = "You answer in one word."


def test_system_prompt_is_rendered_as_the_official_template_renders_it(files, capsys, monkeypatch):
    """`--system` opens every conversation (after /reset too); the prompt's ids are those of the template's
    official Jinja given the system message and the turns so far."""
    seen: list[tuple[list[Message], list[int]]] = []
    prompt_ids = Assistant.prompt_ids

    def spy(self, messages, n_images):
        ids = prompt_ids(self, messages, n_images)
        seen.append((list(messages), ids))
        return ids

    monkeypatch.setattr(Assistant, "prompt_ids", spy)
    argv = [
        files["text"],
        "--system",
        SYSTEM,
        "--question",
        "hi",
        "--question",
        "more",
        "--question",
        "/reset",
    ]
    rc, lines, _ = chat([*argv, "--question", "again"], capsys, monkeypatch)
    assert rc == 0 and len(lines) == 3
    assert [msgs[0].role for msgs, _ in seen] == ["system"] * 3
    assert [[m.role for m in msgs] for msgs, _ in seen][1] == ["system", "user", "assistant", "user"]
    assert len(seen[2][0]) == 2  # /reset dropped the turns, not the system message

    name = read_stage_config(files["text"]).data.template
    official = json.loads(REFERENCE.read_text())[name]["jinja"]
    tokenizer = load_assistant(str(files["text"]), device="cpu").tokenizer
    for messages, ids in seen:
        dicts = [{"role": m.role, "content": m.content} for m in messages]
        text = tokenizer.apply_chat_template(
            dicts, chat_template=official, tokenize=False, add_generation_prompt=True
        )
        assert SYSTEM in text
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_without_system_the_prompt_has_none(files, capsys, monkeypatch):
    seen: list[list[Message]] = []
    prompt_ids = Assistant.prompt_ids
    monkeypatch.setattr(
        Assistant, "prompt_ids", lambda self, m, n: seen.append(list(m)) or prompt_ids(self, m, n)
    )
    rc, _, _ = chat([files["text"], "--question", "hi"], capsys, monkeypatch)
    assert rc == 0 and [m.role for m in seen[0]] == ["user"]


@pytest.mark.skipif(readline is None, reason="this Python has no readline")
def test_line_history_is_kept_across_sessions(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    readline.clear_history()
    try:
        with line_history():
            readline.add_history("What is in the picture?")
        saved = tmp_path / ".cache" / "llava_ft" / "chat_history"
        assert "What is in the picture?" in saved.read_text()
        readline.clear_history()
        with line_history():  # a new session recalls the earlier question (Up arrow)
            assert readline.get_current_history_length() == 1
            assert readline.get_history_item(1) == "What is in the picture?"
        # Best effort: a history file that cannot be written costs nothing but the history.
        (tmp_path / "file").write_text("")
        with line_history(tmp_path / "file" / "chat_history"):
            readline.add_history("still fine")
    finally:
        readline.clear_history()


def test_interactive_chat_on_a_terminal_uses_line_history(files, monkeypatch):
    used = []

    @contextlib.contextmanager
    def fake_history():
        used.append(True)
        yield

    monkeypatch.setattr("llava_ft.cli.chat.line_history", fake_history)
    monkeypatch.setattr("llava_ft.cli.chat.run_interactive", lambda session: 0)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    assert main(["chat", str(files["text"]), "--max-new-tokens", str(MAX_NEW)]) == 0
    assert used == [True]


def test_a_moved_finetune_chats_with_base_model_flags(files, tmp_path, capsys, monkeypatch):
    """The finetune and its base models at new paths, the pretrain it started from renamed: the same answer,
    given --model.llm and --model.vision.model; without them a one-line error naming the flag, exit 2."""
    from llava_ft.testing.tiny_chain import write_tiny_chain

    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    _, finetune = write_tiny_chain(tmp_path / "old")
    ask = ["--image", str(files["red"]), "--question", "what shape?", "--max-new-tokens", str(MAX_NEW)]
    assert main(["chat", str(finetune), *ask]) == 0
    answer = capsys.readouterr().out
    assert answer.strip()
    (tmp_path / "old").rename(tmp_path / "new")
    (tmp_path / "new" / "pretrain").rename(tmp_path / "new" / "pretrain.old")
    moved, bases = tmp_path / "new" / "finetune", tmp_path / "new" / "bases"

    assert main(["chat", str(moved), *ask]) == 2
    err = capsys.readouterr().err
    old_llm = tmp_path / "old" / "bases" / "llm_internlm2"
    assert err == (
        f"llava-ft chat: error: `{moved / 'llava_ft.yaml'}`: model.llm {old_llm} not found; pass --model.llm DIR\n"
    )
    flags = [
        "--model.llm",
        str(bases / "llm_internlm2"),
        "--model.vision.model",
        str(bases / "clip_open_clip"),
    ]
    assert main(["chat", str(moved), *ask, *flags]) == 0
    assert capsys.readouterr().out == answer
