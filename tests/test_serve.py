"""`llava-ft serve`: the page, driven in a real headless chromium, answers exactly as `llava-ft chat`.

The server runs as the real command in a subprocess; the reference answers come from `llava-ft chat
--question` on the same checkpoint, image and questions. The browser part needs Debian's chromium
(`bash scripts/setup_browser.sh`) and playwright; without them it skips, or fails when
LLAVA_FT_REQUIRE_BROWSER=1 (CI). The handler tests below run without a browser.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llava_ft.cli.main import main
from llava_ft.data.images import ImageProcessor, load_image
from llava_ft.demo.shapes import generate_shapes_dataset
from llava_ft.inference import load_assistant
from llava_ft.testing.browser import CHROMIUM_FLAGS, chromium_path
from llava_ft.testing.tiny_llava import write_tiny_stage_output

MAX_NEW = 8
# Records every distinct text of the newest answer bubble, so the test sees the answer grow.
WATCH_ANSWER = """() => {
  window.__answers = [];
  const root = document.querySelector('#chatbot');
  new MutationObserver(() => {
    const bubbles = root.querySelectorAll('[data-testid="bot"] .message-content');
    if (!bubbles.length) return;
    const text = bubbles[bubbles.length - 1].textContent;
    if (window.__answers[window.__answers.length - 1] !== text) window.__answers.push(text);
  }).observe(root, {subtree: true, childList: true, characterData: true});
}"""


def need_browser() -> str:
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package")
    path = chromium_path()
    if path is None:
        missing.append("chromium (bash scripts/setup_browser.sh)")
    if missing:
        reason = f"browser test needs {' and '.join(missing)}"
        if os.environ.get("LLAVA_FT_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG header claiming width x height, with almost no pixel data: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serve")
    shapes = generate_shapes_dataset(root / "shapes", n_train_images=8, n_heldout_images=4, seed=3)
    heldout = json.loads(shapes.heldout.read_text())
    not_image = root / "notes.png"
    not_image.write_bytes(b"\x89PNG\r\n\x1a\n but not really a picture")
    too_big = root / "huge.png"
    too_big.write_bytes(os.urandom(int(1.5 * 2**20)))  # over the 1 MB limit the server is started with
    return {
        "vision": write_tiny_stage_output(root, root / "vision", vision_backend="open_clip", seed=1),
        "text": write_tiny_stage_output(root, root / "text", vision_backend=None, seed=2),
        # Questions as typed into the page or given to `chat --question`: the image marker is the UI's job.
        # The open question of each held-out image (its multiple-choice one is on the same image).
        "heldout": [
            (shapes.images_dir / r["image"], r["conversations"][0]["value"].removeprefix("<image>\n"))
            for r in heldout
            if r["style"] == "open"
        ],
        "not_image": not_image,
        "bomb": png_header_only(root / "bomb.png", 30_000, 30_000),
        "too_big": too_big,
    }


def chat_cli(capsys, checkpoint: Path, questions: list[str], *images: Path) -> list[str]:
    """Answers of `llava-ft chat --image IMAGE ... --question ...` (one conversation), unescaped; a question
    may be a command (`/image PATH`), which has no answer."""
    argv = ["chat", str(checkpoint), "--max-new-tokens", str(MAX_NEW)]
    for image in images:
        argv += ["--image", str(image)]
    for q in questions:
        argv += ["--question", q]
    capsys.readouterr()
    assert main(argv) == 0
    # One answer per line; split on "\n" alone: an untrained model's answer may hold "\r", "\x85" or
    # "\u2028", which str.splitlines would also cut at.
    lines = capsys.readouterr().out.split("\n")[:-1]
    assert len(lines) == len([q for q in questions if not q.startswith("/")])
    # The page's innerText shows a carriage return as a line break.
    return [line.replace("\\n", "\n").replace("\\\\", "\\").replace("\r", "\n") for line in lines]


# ------------------------------------------------------------------------------------------ the browser


@pytest.fixture(scope="module")
def server(files):
    """`llava-ft serve` on a free port of 127.0.0.1; yields its URL."""
    need_browser()
    port = free_port()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(files["vision"].parent / "serve.log", "w")  # noqa: SIM115 (closed at teardown)
    argv = [sys.executable, "-m", "llava_ft.cli.main", "serve", str(files["vision"]), "--port", str(port)]
    argv += ["--max-new-tokens", str(MAX_NEW), "--max-upload-mb", "1"]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"llava-ft serve exited with {proc.returncode}:\n{Path(log.name).read_text()[-3000:]}"
                )
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"llava-ft serve did not come up:\n{Path(log.name).read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser_page(server):
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="llava_ft_chromium_")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=need_browser(), headless=True, args=CHROMIUM_FLAGS
        )
        outside = []
        context.on("request", lambda r: outside.append(r.url) if not r.url.startswith(server) else None)
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(server)
        page.wait_for_selector("#upload")
        yield page
        context.close()
    shutil.rmtree(profile, ignore_errors=True)
    assert [u for u in outside if not u.startswith(("data:", "blob:"))] == [], (
        "the page fetched from elsewhere"
    )


class Page:
    """The demo page's controls, by the element ids serve.py gives them."""

    def __init__(self, page):
        self.page = page

    def status(self) -> str:
        return self.page.inner_text("#status")

    def upload(self, path: Path) -> str:
        before = self.status()
        self.page.locator("input[type=file]").first.set_input_files(str(path))
        self.page.wait_for_function(
            "([b, name]) => { const s = document.querySelector('#status').innerText;"
            " return s !== b && s.includes(name); }",
            arg=[before, path.name],
        )
        return self.status()

    def ask(self, question: str) -> tuple[str, list[str]]:
        """(final answer text in the page, every text the answer bubble showed on the way)."""
        self.page.evaluate(WATCH_ANSWER)
        self.page.fill("#question textarea", question)
        self.page.click("#send")
        try:
            self.page.wait_for_function("document.querySelector('#status').innerText.startsWith('Answered')")
        except Exception as e:
            seen = self.page.evaluate("window.__answers")
            raise AssertionError(
                f"no answer to {question!r}; status {self.status()!r}, answer texts {seen}"
            ) from e
        # The page clears the question box in a follow-up event: wait for it, or the next fill could be wiped.
        self.page.wait_for_function("document.querySelector('#question textarea').value === ''")
        bubbles = self.page.locator('#chatbot [data-testid="bot"] .message-content')
        return bubbles.last.text_content(), self.page.evaluate("window.__answers")

    def click(self, element_id: str, status: str) -> None:
        self.page.click(f"#{element_id}")
        self.page.wait_for_function(f"document.querySelector('#status').innerText.startsWith({status!r})")

    def bot_messages(self) -> int:
        return self.page.locator('#chatbot [data-testid="bot"]').count()

    def images_shown(self) -> int:
        return self.page.locator("#preview img").count()


def test_page_streams_the_same_answers_as_chat(browser_page, files, capsys):
    page = Page(browser_page)
    image, question = files["heldout"][0]
    assert page.upload(image).startswith(f"Added image {image.name}")
    first, seen = page.ask(question)
    follow_up = "Where is it?"
    second, _ = page.ask(follow_up)
    assert [first, second] == chat_cli(capsys, files["vision"], [question, follow_up], image)
    # Streamed: the bubble showed the answer growing, each step a prefix of the final text.
    grown = [s for s in seen if s]
    assert len(grown) >= 2 and grown[-1] == first, seen
    assert all(first.startswith(s) for s in grown)


def test_several_images_and_new_conversation(browser_page, files, capsys):
    """Each upload adds an image that the next question carries; the page shows every image; a new
    conversation keeps them all for its first question; removing them leaves a text-only conversation."""
    page = Page(browser_page)
    (image_a, question), (image_b, _) = files["heldout"][0], files["heldout"][2]
    page.click("remove-image", "Images removed")
    assert page.bot_messages() == 0 and page.images_shown() == 0
    assert "the next question carries 1 image" in page.upload(image_b)
    on_b, _ = page.ask(question)
    assert "the next question carries 1 image" in page.upload(image_a)
    assert page.images_shown() == 2
    follow_up = "And this one?"
    on_a, _ = page.ask(follow_up)
    assert [on_b, on_a] == chat_cli(
        capsys, files["vision"], [question, f"/image {image_a}", follow_up], image_b
    )
    without_a = chat_cli(capsys, files["vision"], [question, follow_up], image_b)[1]
    assert on_a != without_a, "the second image must change the answer for this test to mean anything"
    page.click("reset", "New conversation; the next question carries 2 images")
    assert page.bot_messages() == 0 and page.images_shown() == 2
    again, _ = page.ask(question)
    assert again == chat_cli(capsys, files["vision"], [question], image_b, image_a)[0]
    page.click("remove-image", "Images removed")
    assert page.images_shown() == 0
    text_only, _ = page.ask(question)
    assert text_only == chat_cli(capsys, files["vision"], [question])[0]


def test_bad_uploads_get_a_message_and_the_server_keeps_serving(browser_page, files, capsys):
    page = Page(browser_page)
    image, question = files["heldout"][2]
    page.click("remove-image", "Images removed")
    page.upload(image)
    before, _ = page.ask(question)

    status = page.upload(files["not_image"])
    assert "Could not use notes.png" in status and "not a readable image" in status
    assert "gradio" not in status, "the message names the file chosen, not the server's upload path"
    status = page.upload(files["bomb"])
    assert "Could not use bomb.png" in status and "too large" in status

    browser_page.locator("input[type=file]").first.set_input_files(str(files["too_big"]))
    toast = browser_page.locator(".toast-body", has_text="huge.png")
    toast.wait_for()
    assert "maximum allowed size" in toast.inner_text()

    # The refused files left the images and the conversation as they were; the next turn is answered.
    assert page.bot_messages() == 1 and page.images_shown() == 1
    follow_up = "What shape is it?"
    after, _ = page.ask(follow_up)
    assert [before, after] == chat_cli(capsys, files["vision"], [question, follow_up], image)


# ------------------------------------------------------------------------------------------ no browser


@pytest.fixture(scope="module")
def text_app(files):
    from llava_ft.cli.serve import DemoApp

    return DemoApp(load_assistant(str(files["text"]), device="cpu"))


def test_text_only_checkpoint(text_app, files, capsys):
    from llava_ft.cli.serve import PageState, build_page

    build_page(
        text_app, title="text", max_new_tokens=MAX_NEW, temperature=0.0
    )  # builds without image controls
    state, message, taken = text_app.load_image(str(files["heldout"][0][0]), PageState())
    assert not taken and "text-only" in message and state == PageState()

    questions = ["Hello, who are you?", "Tell me more."]
    answers = []
    for q in questions:
        steps = list(text_app.respond(q, state, MAX_NEW, 0.0))
        chat, state, status = steps[-1]
        assert status.startswith("Answered")
        answers.append(chat[-1]["content"])
        # The answer as streamed (pieces appended) ends as the final answer.
        assert steps[-2][0][-1]["content"] == answers[-1]
    assert answers == chat_cli(capsys, files["text"], questions)


def test_empty_question_and_reserved_marker(text_app):
    from llava_ft.cli.serve import PageState

    ((chat, state, status),) = text_app.respond("   ", PageState(), MAX_NEW, 0.0)
    assert chat == [] and status == "Type a question first."
    *_, (chat, state, status) = text_app.respond("look: <image>", PageState(), MAX_NEW, 0.0)
    assert chat == [] and state.history == [] and "<image> is reserved" in status


def test_large_file_refused_by_the_handler_too(files):
    """The handler checks the size itself, whatever limit the web server was started with."""
    from llava_ft.cli.serve import DemoApp, PageState

    class Vision:
        has_vision = True
        processor = ImageProcessor(24)

    app = DemoApp(Vision(), max_upload_mb=1)
    state, message, taken = app.load_image(str(files["too_big"]), PageState())
    assert not taken and "over the 1 MB limit" in message
    good = files["heldout"][0][0]
    state, message, taken = app.load_image(str(good), PageState())
    width, height = Image.open(good).size
    assert taken and f"({width}x{height})" in message and [im.size for im in state.pending] == [(24, 24)]


def test_fractional_upload_limit_reaches_gradio_as_bytes(monkeypatch):
    """--max-upload-mb 2.5 reaches gradio as a whole number of bytes (it refuses "2.5MB" after the model loaded)."""
    import gradio as gr
    from gradio.utils import _parse_file_size

    from llava_ft.cli import serve as serve_module
    from llava_ft.cli.serve import serve

    class TextOnly:
        has_vision = False

    launched: dict = {}
    monkeypatch.setattr(serve_module, "load_assistant", lambda *a, **k: TextOnly())
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(kw))
    for mb, limit in ((2.5, int(2.5 * 2**20)), (1e6, 10**6 * 2**20), (0.5, 2**19)):
        serve("ckpt", max_upload_mb=mb, block=False)
        assert _parse_file_size(launched["max_file_size"]) == limit


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "abc", "1e-9"])
def test_bad_upload_limit_refused_at_argument_parsing(value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "no/such/checkpoint", "--max-upload-mb", value])
    assert e.value.code == 2
    assert "--max-upload-mb" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ memory


@pytest.mark.parametrize("aspect", ["pad", "crop", "resize"])
def test_an_upload_is_kept_tower_sized_and_the_model_sees_it_alike(tmp_path, aspect):
    """The page keeps the image as the model sees it, not the upload at full size; processing that copy gives the
    same pixel tensor as processing the upload."""
    from llava_ft.cli.serve import DemoApp, PageState

    class Vision:
        has_vision = True
        processor = ImageProcessor(48, aspect=aspect)

    rng = np.random.default_rng(0)
    upload = tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 256, (700, 1900, 4), dtype=np.uint8), "RGBA").save(upload)
    state, message, taken = DemoApp(Vision()).load_image(str(upload), PageState())
    assert taken and "(1900x700)" in message
    (image,) = state.pending
    assert image.size == (48, 48) and image.mode == "RGB"
    seen = Vision.processor(load_image(upload))
    assert torch.equal(Vision.processor(image), seen)


def test_the_page_answers_from_its_copy_as_chat_does_from_the_file(files, capsys):
    from llava_ft.cli.serve import DemoApp, PageState

    app = DemoApp(load_assistant(str(files["vision"]), device="cpu"))
    image, question = files["heldout"][1]
    state, _, taken = app.load_image(str(image), PageState())
    assert taken and state.pending[0].size != Image.open(image).size  # a copy at the tower's size
    *_, (chat, state, status) = app.respond(question, state, MAX_NEW, 0.0)
    assert status.startswith("Answered")
    assert [chat[-1]["content"]] == chat_cli(capsys, files["vision"], [question], image)


def test_several_uploads_are_the_images_of_the_next_question(files, capsys):
    """Without a browser: two uploads before a question, one before the next; the answers are chat's with the
    same images (`--image`, `/image`), the chatbot names each question's images, a refused upload changes
    nothing, a new conversation keeps every image for its first question, removing them leaves none."""
    from llava_ft.cli.serve import DemoApp, PageState

    app = DemoApp(load_assistant(str(files["vision"]), device="cpu"))
    (a, question), (b, _), (c, _) = files["heldout"][:3]
    state = PageState()
    for path in (a, b):
        state, message, taken = app.load_image(str(path), state)
        assert taken and message.startswith(f"Added image {path.name}")
    assert "the next question carries 2 images" in message
    *_, (chat, state, status) = app.respond(question, state, MAX_NEW, 0.0)
    assert status.startswith("Answered") and len(state.images) == 2 and state.pending == []
    state, message, taken = app.load_image(str(files["not_image"]), state)
    assert not taken and "The images and conversation are unchanged" in message
    state, message, taken = app.load_image(str(c), state)
    assert "the next question carries 1 image" in message
    *_, (chat, state, status) = app.respond("And this one?", state, MAX_NEW, 0.0)
    assert [m["content"] for m in chat if m["role"] == "user"] == [
        f"[{a.name}, {b.name}] {question}",
        f"[{c.name}] And this one?",
    ]
    answers = [m["content"] for m in chat if m["role"] == "assistant"]
    assert answers == chat_cli(capsys, files["vision"], [question, f"/image {c}", "And this one?"], a, b)
    assert [name for _, name in state.shown] == [a.name, b.name, c.name]

    state, message = app.reset(state)
    assert message == "New conversation; the next question carries 3 images."
    assert state.history == [] and len(state.pending) == 3
    *_, (chat, state, _) = app.respond(question, state, MAX_NEW, 0.0)
    assert chat[-1]["content"] == chat_cli(capsys, files["vision"], [question], a, b, c)[0]
    state, message = app.remove_image(state)
    assert state == PageState() and message == "Images removed; new conversation."


def test_a_closed_pages_state_goes_after_the_grace_period():
    from llava_ft.cli.serve import PageState, Sessions

    sessions = Sessions(grace=3600)
    sessions.put("a", PageState(shown=[("/up/a.png", "a.png")]))
    sessions.put("b", PageState(shown=[("/up/b.png", "b.png")]))
    timers = [sessions.close("a"), sessions.close("b")]
    for t in timers:  # fired by hand: the test does not wait for the hour
        t.cancel()
    assert sessions.get("b").shown == [
        ("/up/b.png", "b.png")
    ]  # "b" is used again: its connection only dropped
    for t in timers:
        t.function(*t.args)
    assert len(sessions) == 1
    assert sessions.get("a") is None, "a page coming back after its state went is told so, once"
    assert sessions.get("a") == PageState() and sessions.get("b").shown == [("/up/b.png", "b.png")]
    assert sessions.close("never-used") is None


def serve_in_process(checkpoint: Path, monkeypatch):
    """(URL, DemoApp) of `serve` on a free port of this process, with a one-second grace for closed pages."""
    from llava_ft.cli import serve as serve_module

    apps = []

    class Recorded(serve_module.DemoApp):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.sessions.grace = 1.0
            apps.append(self)

    monkeypatch.setattr(serve_module, "DemoApp", Recorded)
    page = serve_module.serve(str(checkpoint), port=free_port(), block=False, max_new_tokens=MAX_NEW)
    return page, apps[0]


def test_pages_closed_through_gradio_free_their_state(files, monkeypatch):
    """gradio's unload (the page's heartbeat ends) drops the page's state: here pages driven by gradio_client."""
    from gradio_client import Client, handle_file

    page, app = serve_in_process(files["vision"], monkeypatch)
    try:
        image, question = files["heldout"][0]
        clients = []
        for _ in range(2):
            client = Client(page.local_url, verbose=False)
            status = client.predict(handle_file(str(image)), api_name="/image_changed")[-1]
            assert status.startswith("Added image")
            chat, status = client.predict(question, MAX_NEW, 0.0, api_name="/respond")
            assert status.startswith("Answered") and len(chat) == 2
            clients.append(client)
        assert len(app.sessions) == 2
        for client in clients:
            client.close()
        deadline = time.monotonic() + 120  # a bound on waiting for the unload events, not a timing check
        while len(app.sessions) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(app.sessions) == 0
    finally:
        page.close()


def server_rss_after_sessions(
    checkpoint: Path, image: Path, sessions: int, grace_wait: float
) -> dict[str, int]:
    """Resident memory (MB) of a `llava-ft serve` process: started, after `sessions` pages (driven by
    gradio_client) each uploaded `image` and asked one question, and `grace_wait` seconds after they closed."""
    from gradio_client import Client, handle_file

    port = free_port()
    argv = [sys.executable, "-m", "llava_ft.cli.main", "serve", str(checkpoint), "--port", str(port)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"

    def rss() -> int:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) // 1024

    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None, "llava-ft serve exited"
                time.sleep(0.5)
        figures = {"started": rss()}
        clients = []
        for _ in range(sessions):
            clients.append(Client(url, verbose=False))
            clients[-1].predict(handle_file(str(image)), api_name="/image_changed")
            clients[-1].predict("What is it?", MAX_NEW, 0.0, api_name="/respond")
        figures[f"{sessions} pages open"] = rss()
        for client in clients:
            client.close()
        time.sleep(grace_wait)
        figures[f"{grace_wait:.0f} s after they closed"] = rss()
        return figures
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    # python tests/test_serve.py FOLDER [SESSIONS]: the figure for 30 pages with an 8000x8000 PNG each.
    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    big = folder / "8000x8000.png"
    if not big.exists():
        Image.new("RGB", (8000, 8000), (200, 30, 30)).save(big)
    checkpoint = folder / "vision"
    if not (checkpoint / "llava_ft.yaml").exists():
        write_tiny_stage_output(folder, checkpoint, vision_backend="open_clip", seed=1)
    print(server_rss_after_sessions(checkpoint, big, int(sys.argv[2]) if len(sys.argv) > 2 else 30, 70))
