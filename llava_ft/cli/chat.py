"""`llava-ft chat CHECKPOINT [--image IMG ...]`: talk to a stage output in the terminal.

Interactive on a terminal (answers stream in); with `--question` or questions piped on stdin it answers
without prompts, one answer per line, for scripts. Both keep one multi-turn conversation and understand
`/image PATH` (adds an image to the conversation: the next question carries it; several before one question
all go to it), `/reset` (a new conversation) and `/exit`. `--image` images open every conversation: the first
question carries them, after `/reset` too. `--system TEXT` opens every conversation with a system message,
rendered as the checkpoint's chat template renders one. On a terminal, lines can be edited and earlier
questions recalled (readline), kept across sessions in HISTORY_FILE.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

try:
    import readline
except ImportError:  # not built into every Python (Windows): chat then reads plain lines
    readline = None

from llava_ft.constants import IMAGE_TOKEN
from llava_ft.data.conversation import DataError, Message
from llava_ft.folders import add_base_path_args, base_overrides, folder_has_vision, saved_template_name
from llava_ft.query import Query

if TYPE_CHECKING:
    from llava_ft.inference import Assistant

COMMANDS = "/image PATH (add an image: the next question carries it), /reset (new conversation), /exit"
HISTORY_FILE = Path("~/.cache/llava_ft/chat_history")
HISTORY_LENGTH = 1000


class ChatError(ValueError):
    """A user mistake inside the session (bad image, unknown command): reported, the session goes on."""


@dataclass
class ChatSession:
    """Conversation state: the turns so far, the images their markers stand for, and the images that the next
    question will carry."""

    assistant: Assistant
    opening: list = field(default_factory=list)
    """PIL images the first question of every conversation carries (`--image`): kept by /reset."""
    history: list[Message] = field(default_factory=list)
    images: list = field(default_factory=list)
    """PIL images of `history`, one per `<image>` marker, in order."""
    pending: list = field(default_factory=list)
    """PIL images added since the last question; the next question carries them (`reset` puts `opening`
    here)."""
    gen: dict = field(default_factory=dict)
    """max_new_tokens, temperature, top_p for generate_messages."""
    system: str | None = None
    """A system message opening every conversation (kept out of `history`, so /reset keeps it)."""

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Answer `text` as the next user turn, which carries the pending images; a failed turn leaves the
        conversation and the pending images as they were."""
        if IMAGE_TOKEN in text:
            raise ChatError(f"{IMAGE_TOKEN} is reserved for images; use /image PATH")
        # The pending images' markers go in front of the question, as for an evaluation question (Query).
        messages = [*self.history, Message("user", Query(text, self.pending).user_text())]
        images = [*self.images, *self.pending]
        head = [Message("system", self.system)] if self.system is not None else []
        answer = self.assistant.generate_messages(
            [([*head, *messages], images)], on_text=on_text, **self.gen
        )[0]
        self.history = [*messages, Message("assistant", answer)]
        self.images, self.pending = images, []
        return answer

    def reset(self) -> None:
        """A new conversation: the turns and the images added to them go; the opening images come back."""
        self.history, self.images, self.pending = [], [], list(self.opening)

    def add_image(self, path: str) -> None:
        self.pending.append(open_image(path, self.assistant.has_vision))

    def command(self, line: str) -> bool:
        """Run a /command; False for /exit."""
        name, _, arg = line.partition(" ")
        if name == "/exit":
            return False
        if name == "/reset":
            self.reset()
        elif name == "/image":
            if not arg.strip():
                raise ChatError("usage: /image PATH")
            self.add_image(arg.strip())
        else:
            raise ChatError(f"unknown command {name!r}; commands: {COMMANDS}")
        return True


def open_image(path: str, has_vision: bool):
    if not has_vision:
        raise ChatError("this checkpoint is text-only (no vision tower); it takes no image")
    if not Path(path).is_file():  # load_image's first check, made before torch is imported
        raise DataError(path, "image file not found")
    # Imported here, as load_assistant below: their modules import torch, seconds that a wrong folder, image
    # path or flag should not wait for (start-up time).
    from llava_ft.data.images import load_image

    return load_image(path)


def run_script(session: ChatSession, lines: Iterable[str], out, *, unit: str = "line") -> int:
    """Answer each line (commands run silently), one answer per line; line breaks inside an answer are written
    as the two characters `\\n` (and a backslash as `\\\\`), so every answer stays one line. An error names the
    failing input as `unit` and its 1-based number (blank lines and commands counted: "line" for stdin)."""
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not session.command(line):
                    break
                continue
            answer = session.ask(line)
        except (ChatError, DataError) as e:
            print(f"llava-ft chat: error: {unit} {n}: {e}", file=sys.stderr)
            return 2
        print(answer.replace("\\", "\\\\").replace("\n", "\\n"), file=out, flush=True)
    return 0


def run_interactive(session: ChatSession, read: Callable[[str], str] = input, out=None) -> int:
    out = out or sys.stdout
    print(f"chat ({images_note(len(session.pending))}); commands: {COMMANDS}", file=out)
    while True:
        try:
            line = read("user> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return 0
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not session.command(line):
                    return 0
                if line.startswith("/image"):
                    print(f"({images_note(len(session.pending))})", file=out)
                else:
                    print(f"(new conversation; {images_note(len(session.pending))})", file=out)
                continue
            print("assistant> ", end="", file=out, flush=True)
            session.ask(line, on_text=lambda piece: print(piece, end="", file=out, flush=True))
            print(file=out)
        except (ChatError, DataError) as e:
            print(f"error: {e}", file=out)
        except KeyboardInterrupt:
            print("\n(interrupted; the turn is dropped)", file=out)


def images_note(n: int) -> str:
    if not n:
        return "no image for the next question"
    return f"the next question carries {n} image{'s' if n > 1 else ''}"


@contextlib.contextmanager
def line_history(path: Path = HISTORY_FILE) -> Iterator[None]:
    """readline line editing for `input`, with the history read from and saved to `path`; best effort: an
    unreadable or unwritable file only costs the history."""
    if readline is None:
        yield
        return
    path = path.expanduser()
    readline.set_history_length(HISTORY_LENGTH)
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)


NO_SYSTEM = (
    "--system: the checkpoint's template is plain (LLaVA's pretraining format: an image and its caption), which "
    "has no system message; leave out --system"
)


def load_assistant(checkpoint: str, **kwargs) -> Assistant:
    """inference.load_assistant, imported when a model loads (start-up time: it imports torch)."""
    from llava_ft.inference import load_assistant

    return load_assistant(checkpoint, **kwargs)


def cmd_chat(args: argparse.Namespace) -> int:
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        print(
            "llava-ft chat: error: need --temperature >= 0, 0 < --top-p <= 1, --max-new-tokens >= 1",
            file=sys.stderr,
        )
        return 2
    try:
        # Cheap checks first, so a wrong folder or image fails before the model loads.
        has_vision = folder_has_vision(args.checkpoint)
        opening = [open_image(path, has_vision) for path in args.image or []]
        # Refused once, rather than as the same error on every question: before the model loads where the
        # folder records its template, else once the template is known.
        if args.system is not None and saved_template_name(args.checkpoint) == "plain":
            raise ChatError(NO_SYSTEM)
        assistant = load_assistant(args.checkpoint, load_4bit=args.load_4bit, overrides=base_overrides(args))
        if args.system is not None and assistant.template.name == "plain":
            raise ChatError(NO_SYSTEM)
        gen = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
        session = ChatSession(assistant, opening=opening, gen=gen, system=args.system)
        session.reset()  # the first conversation opens with the --image images
    except (OSError, ValueError) as e:  # missing files, bad image, config or template errors
        print(f"llava-ft chat: error: {e}", file=sys.stderr)
        return 2
    if args.question:
        return run_script(session, args.question, sys.stdout, unit="--question")
    if not sys.stdin.isatty():
        return run_script(session, sys.stdin, sys.stdout)
    with line_history():
        return run_interactive(session)


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "chat",
        help="chat with a stage output in the terminal",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "checkpoint", help="stage output folder (holds llava_ft.yaml) or hf-llava / merged-llm export"
    )
    p.add_argument(
        "--image",
        action="append",
        help="image the first question of every conversation carries (repeatable: several images, in order); "
        "/image PATH adds one to the conversation",
    )
    p.add_argument(
        "--question",
        action="append",
        help="answer this and exit (repeatable: turns of one conversation); without it, questions piped on "
        "stdin are answered the same way. One answer per line, a line break inside one written as \\n",
    )
    p.add_argument(
        "--system",
        metavar="TEXT",
        help="system prompt opening each conversation (replaces the template's default one, if it has one)",
    )
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, with --temperature > 0")
    p.add_argument("--load-4bit", action="store_true", help="load the LLM in 4-bit NF4 (bitsandbytes)")
    add_base_path_args(p)
    p.set_defaults(func=cmd_chat)
