"""`llava-ft serve CHECKPOINT [--host 127.0.0.1] [--port N] [--share]`: chat with a stage output in the browser.

A local gradio page: upload images (each upload adds one: the next question carries it, as `/image` in
`llava-ft chat`), chat over several turns with answers streamed in, start a new conversation on the same
images, remove the images, set max new tokens and temperature; a text-only checkpoint gets no image controls.
Answers come from the same `ChatSession` as `llava-ft chat`. An upload that is not an image, is corrupt,
decodes to too many pixels or is over --max-upload-mb gets a message in the page. Each page keeps only its
images as the model sees them (tower-sized), and its state goes soon after the page closes. Nothing leaves the
machine: gradio's analytics and version check are off, fonts are served locally; only --share opens a public
gradio.live link to the page.
"""

from __future__ import annotations

import argparse
import ctypes
import html
import logging
import os
import queue
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_ft.cli.chat import ChatError, ChatSession, images_note, load_assistant, open_image
from llava_ft.constants import IMAGE_TOKEN
from llava_ft.data.conversation import DataError, Message
from llava_ft.folders import add_base_path_args, base_overrides, folder_kind

log = logging.getLogger("llava_ft")

DEFAULT_MAX_UPLOAD_MB = 20
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def release_freed_memory() -> None:
    """Hand freed heap pages back to the system (glibc's malloc_trim): glibc keeps the pages of a freed large
    image for reuse, so a server's memory would stay at its largest upload's decode. No-op elsewhere."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _load_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # not glibc
        return None


_malloc_trim = _load_malloc_trim()


def upload_limit_bytes(max_upload_mb: float) -> int:
    """The upload limit in bytes (MB = 2**20, as gradio counts): what both the web server and the handler
    enforce. gradio's own "<n>mb" strings take integers only, so it is given the byte count."""
    return int(max_upload_mb * 2**20)


def positive_mb(text: str) -> float:
    """argparse type of --max-upload-mb: a number of MB above zero (fractions allowed)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    # nan/inf would reach gradio as an invalid size; below one byte nothing could be uploaded.
    if not value > 0 or value == float("inf") or upload_limit_bytes(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a size in MB above zero, got {text!r}")
    return value


# A closed page's state is kept this long in case the page only lost its connection and comes back.
SESSION_GRACE_S = 60.0
ENDED_KEPT = 10_000
ENDED = (
    "⚠️ This conversation was closed on the server (the page was closed or lost its connection for a while). "
    "Upload the images again or ask again to start a new one."
)


@dataclass
class PageState:
    """One browser session: the turns so far, the images they carry, the images the next question carries.
    Images are kept as the model sees them (`ImageProcessor.resized`), never the upload at full size."""

    history: list[Message] = field(default_factory=list)
    images: list = field(default_factory=list)
    """The images of `history`, one per `<image>` marker, in order."""
    pending: list = field(default_factory=list)
    """Uploaded since the last question: the next question carries them."""
    shown: list[tuple[str, str]] = field(default_factory=list)
    """(upload path, file name) of `images` then `pending`, as the page shows them."""

    def session(self, assistant, gen: dict) -> ChatSession:
        return ChatSession(
            assistant,
            history=list(self.history),
            images=list(self.images),
            pending=list(self.pending),
            gen=gen,
        )

    def new_conversation(self) -> PageState:
        """No turns; the next question carries every image of the page."""
        return PageState(pending=[*self.images, *self.pending], shown=list(self.shown))


class Sessions:
    """Each page's PageState by gradio's session hash. A closed page's state is dropped `grace` seconds later
    unless the page is used again meanwhile (a page whose connection dropped reconnects under the same hash):
    gradio would keep a gr.State, image included, for an hour after the page closed."""

    def __init__(self, grace: float = SESSION_GRACE_S):
        self.grace = grace
        self._states: dict[str, PageState] = {}
        self._closing: dict[str, object] = {}
        # Sessions dropped, so that one coming back is told rather than answered without its image.
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._states)

    def get(self, session: str) -> PageState | None:
        """The session's state (a new one for a new session); None, once, for a session that was dropped."""
        with self._lock:
            self._closing.pop(session, None)
            if session in self._ended:
                del self._ended[session]
                return None
            return self._states.get(session, PageState())

    def put(self, session: str, state: PageState) -> None:
        with self._lock:
            if session not in self._ended:  # not dropped while its handler ran
                self._states[session] = state

    def close(self, session: str) -> threading.Timer | None:
        """The page closed (gradio's unload): its state goes after the grace period (the timer returned)."""
        token = object()
        with self._lock:
            if session not in self._states:
                return None
            self._closing[session] = token
        timer = threading.Timer(self.grace, self._drop, (session, token))
        timer.daemon = True
        timer.start()
        return timer

    def _drop(self, session: str, token: object) -> None:
        with self._lock:
            if self._closing.get(session) is not token:  # used again since it closed
                return
            del self._closing[session]
            self._states.pop(session, None)
            self._ended[session] = None
            while len(self._ended) > ENDED_KEPT:
                self._ended.popitem(last=False)


def user_bubble(text: str, names: list[str]) -> str:
    """A question as the page's chatbot shows it: the names of the images it carries, then the text typed."""
    return f"[{', '.join(names)}] {text}" if names else text


def chat_messages(history: list[Message], names: list[str]) -> list[dict]:
    """The conversation as the page's chatbot shows it: each question without its `<image>` markers, after the
    names of the images it carries (`names`: those of the conversation's images, in order)."""
    shown, used = [], 0
    for m in history:
        n = m.content.count(IMAGE_TOKEN) if m.role == "user" else 0
        text = m.content.removeprefix(f"{IMAGE_TOKEN * n}\n") if n else m.content
        shown.append({"role": m.role, "content": user_bubble(text, names[used : used + n])})
        used += n
    return shown


def shown_messages(state: PageState) -> list[dict]:
    return chat_messages(state.history, [name for _, name in state.shown])


class DemoApp:
    """The page's handlers, kept apart from gradio so that they read as plain functions of (input, state)."""

    def __init__(self, assistant, *, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB):
        self.assistant = assistant
        self.max_upload_bytes = upload_limit_bytes(max_upload_mb)
        self.sessions = Sessions()
        # One model: answers are generated one at a time, whichever button or session asked.
        self.lock = threading.Lock()

    def load_image(self, path: str | None, state: PageState) -> tuple[PageState, str, bool]:
        """(state, status message, whether the image was taken). A good file is added to the conversation (the
        next question carries it); a bad one leaves the images and the conversation as they were."""
        if not path:
            return state, "No file received.", False
        name = Path(path).name
        try:
            size = os.path.getsize(path)
            if size > self.max_upload_bytes:
                raise ChatError(
                    f"{name} is {size / 2**20:.1f} MB, over the {self.max_upload_bytes / 2**20:g} MB limit"
                )
            image = open_image(path, self.assistant.has_vision)
            width, height = image.size
            image = self.assistant.processor.resized(image)
            release_freed_memory()  # the full-size decode, freed just now
        except (ChatError, DataError, OSError) as e:
            # The server's upload path means nothing to the person at the page: name the file they chose.
            problem = (e.problem if isinstance(e, DataError) else str(e)).replace(path, name)
            log.warning("serve: upload %s refused: %s", name, problem)
            return (
                state,
                f"⚠️ Could not use {name}: {problem}. The images and conversation are unchanged.",
                False,
            )
        added = PageState(state.history, state.images, [*state.pending, image], [*state.shown, (path, name)])
        return added, f"Added image {name} ({width}x{height}); {images_note(len(added.pending))}.", True

    def remove_image(self, state: PageState) -> tuple[PageState, str]:
        return PageState(), "Images removed; new conversation."

    def reset(self, state: PageState) -> tuple[PageState, str]:
        fresh = state.new_conversation()
        return (
            fresh,
            f"New conversation; {images_note(len(fresh.pending))}." if fresh.pending else "New conversation.",
        )

    def respond(
        self, text: str, state: PageState, max_new_tokens: float, temperature: float
    ) -> Iterator[tuple[list[dict], PageState, str]]:
        """Yields (chatbot messages, state, status) as the answer grows; the last one holds the whole turn."""
        text = (text or "").strip()
        shown = shown_messages(state)
        if not text:
            yield shown, state, "Type a question first."
            return
        gen = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature), "top_p": 1.0}
        session = state.session(self.assistant, gen)
        pieces: queue.Queue[str | None] = queue.Queue()
        outcome: dict[str, Any] = {}

        def generate() -> None:
            try:
                with self.lock:
                    outcome["answer"] = session.ask(text, on_text=pieces.put)
            except (ChatError, DataError, ValueError) as e:
                outcome["error"] = e
            except Exception as e:  # keep serving: the page reports it, the log keeps the traceback
                log.exception("serve: generation failed")
                outcome["error"] = e
            finally:
                pieces.put(None)

        started = time.monotonic()
        threading.Thread(target=generate, daemon=True).start()
        carried = [name for _, name in state.shown[len(state.images) :]]
        shown = [
            *shown,
            {"role": "user", "content": user_bubble(text, carried)},
            {"role": "assistant", "content": ""},
        ]
        yield shown, state, "Answering…"
        while (piece := pieces.get()) is not None:
            shown[-1] = {"role": "assistant", "content": shown[-1]["content"] + piece}
            yield shown, state, "Answering…"
        if "error" in outcome:
            yield shown_messages(state), state, f"⚠️ {outcome['error']}"
            return
        done = PageState(session.history, session.images, session.pending, state.shown)
        yield shown_messages(done), done, f"Answered in {time.monotonic() - started:.1f} s."


def build_page(app: DemoApp, *, title: str, max_new_tokens: int, temperature: float):
    """The gradio Blocks of the page (not launched)."""
    import gradio as gr  # optional: only `llava-ft serve` needs it

    vision = app.assistant.has_vision
    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.Markdown(f"### {title}")
        with gr.Row():
            with gr.Column(scale=1, visible=vision):
                preview = gr.Gallery(
                    label="Images", interactive=False, elem_id="preview", height=260, columns=3
                )
                upload = gr.UploadButton(
                    "Add image", file_types=["image"], type="filepath", elem_id="upload", size="md"
                )
                remove = gr.Button("Remove images", size="md", elem_id="remove-image")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(
                    label="Conversation",
                    elem_id="chatbot",
                    height=380,
                    render_markdown=False,  # answers are shown exactly as generated
                    feedback_options=None,
                )
                question = gr.Textbox(
                    placeholder="Ask a question and press Enter",
                    show_label=False,
                    elem_id="question",
                    lines=1,
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    reset = gr.Button("New conversation", elem_id="reset")
                status = gr.Markdown(
                    "" if vision else "Text-only checkpoint: no image input.", elem_id="status"
                )
                with gr.Accordion("Generation settings", open=True):
                    max_new = gr.Slider(
                        1, 2048, value=max_new_tokens, step=1, label="Max new tokens", elem_id="max-new"
                    )
                    temp = gr.Slider(
                        0.0,
                        2.0,
                        value=temperature,
                        step=0.05,
                        label="Temperature (0 = greedy)",
                        elem_id="temperature",
                    )

        # Each page's state is kept in app.sessions by gradio's session hash, not in a gr.State, so that it can
        # go when the page closes. The status line is Markdown: messages quote user text and file names, so they
        # are shown escaped.
        sessions = app.sessions

        def image_changed(path, request):
            st = sessions.get(request.session_hash) or PageState()
            st, message, taken = app.load_image(path, st)
            sessions.put(request.session_hash, st)
            # The page shows the files as uploaded (served from gradio's upload folder); a refused file leaves
            # the images shown as they were.
            preview = list(st.shown) if taken else gr.skip()
            return preview, shown_messages(st), html.escape(message)

        def remove_image(request):
            st, message = app.remove_image(sessions.get(request.session_hash) or PageState())
            sessions.put(request.session_hash, st)
            return None, [], message

        def reset_chat(request):
            st = sessions.get(request.session_hash)
            if st is None:
                return [], html.escape(ENDED)
            st, message = app.reset(st)
            sessions.put(request.session_hash, st)
            return [], html.escape(message)

        def respond(text, max_new_tokens, temperature, request):
            st = sessions.get(request.session_hash)
            if st is None:
                yield [], html.escape(ENDED)
                return
            answered = st
            for shown, new_state, message in app.respond(text, st, max_new_tokens, temperature):
                answered = new_state  # the last one holds the whole turn
                yield shown, html.escape(message)
            sessions.put(request.session_hash, answered)

        def page_closed(request):
            sessions.close(request.session_hash)

        # gradio passes the page's Request to a parameter annotated gr.Request; gradio is imported here only,
        # so the annotation is set on the function rather than written (this module's annotations are strings).
        for fn in (image_changed, remove_image, reset_chat, respond, page_closed):
            fn.__annotations__["request"] = gr.Request

        upload.upload(image_changed, [upload], [preview, chatbot, status], concurrency_id="model")
        remove.click(remove_image, None, [preview, chatbot, status])
        reset.click(reset_chat, None, [chatbot, status])
        ask = {"fn": respond, "inputs": [question, max_new, temp], "outputs": [chatbot, status]}
        for event in (send.click, question.submit):
            event(**ask, concurrency_id="model").then(lambda: "", None, question)
        page.unload(page_closed)
    return page


def serve(
    checkpoint: str,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    load_4bit: bool = False,
    overrides: dict[str, str | None] | None = None,
    share: bool = False,
    block: bool = True,
):
    """Load the checkpoint and serve the page; returns the launched Blocks when block=False."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = (
        "False"  # before gradio is imported: no telemetry, no version check
    )
    import gradio as gr

    assistant = load_assistant(checkpoint, load_4bit=load_4bit, overrides=overrides)
    app = DemoApp(assistant, max_upload_mb=max_upload_mb)
    kind = "image + text" if assistant.has_vision else "text-only"
    page = build_page(
        app,
        title=f"llava-ft: {Path(checkpoint).name} ({kind})",
        max_new_tokens=max_new_tokens,
        temperature=temperature,
    )
    page.queue(default_concurrency_limit=1)
    page.launch(
        server_name=host,
        server_port=port,
        max_file_size=app.max_upload_bytes,  # int bytes: gradio rejects "2.5mb" ("Invalid file size unit")
        ssr_mode=False,
        share=share,  # given either way, so that gradio's GRADIO_SHARE variable cannot open a link unasked
        prevent_thread_lock=not block,
        theme=gr.themes.Default(),
        quiet=False,
    )
    return page


def cmd_serve(args: argparse.Namespace) -> int:

    if args.temperature < 0 or args.max_new_tokens < 1:
        print(
            "llava-ft serve: error: need --temperature >= 0, --max-new-tokens >= 1",
            file=sys.stderr,
        )
        return 2
    if args.host not in LOOPBACK:
        log.warning("serving on %s: anyone who can reach this address can use the page (no login)", args.host)
    if args.share:
        log.warning(
            "--share: anyone with the public gradio.live link can use the page and the model (no login)"
        )
    try:
        folder_kind(args.checkpoint)  # a wrong folder fails before gradio and the model load
        serve(
            args.checkpoint,
            host=args.host,
            port=args.port,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            max_upload_mb=args.max_upload_mb,
            load_4bit=args.load_4bit,
            overrides=base_overrides(args),
            share=args.share,
        )
    except (OSError, ValueError) as e:
        print(f"llava-ft serve: error: {e}", file=sys.stderr)
        return 2
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="chat with a stage output in a local web page (gradio)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "checkpoint", help="stage output folder (holds llava_ft.yaml) or hf-llava / merged-llm export"
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    p.add_argument(
        "--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free one)"
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="initial value of the page's setting")
    p.add_argument(
        "--temperature", type=float, default=0.0, help="initial value of the page's setting (0 = greedy)"
    )
    p.add_argument(
        "--max-upload-mb",
        type=positive_mb,
        default=DEFAULT_MAX_UPLOAD_MB,
        help="largest image file accepted, in MB (fractions allowed, e.g. 2.5)",
    )
    p.add_argument("--load-4bit", action="store_true", help="load the LLM in 4-bit NF4 (needs a GPU)")
    p.add_argument(
        "--share",
        action="store_true",
        help="also make a public https://*.gradio.live link to the page through gradio's tunnel, which gradio "
        "keeps for up to a week: anyone with the link can use the model, with no login. Needs internet; "
        "without it gradio says it could not create the link and the page stays local",
    )
    add_base_path_args(p)
    p.set_defaults(func=cmd_serve)
