"""Source adapters: raw records (LLaVA, XTuner, alpaca, OpenAI messages, plain text) -> `Conversation`.

Files are `.json` (a list of records) or `.jsonl` (one record per line). The format is detected per file from
the first record's keys, or named. Every problem is a `DataError` naming the file and the record
("file.jsonl:LINE", 1-based, or "file.json[INDEX]"); with `skip_bad` bad records are collected in
`BadRecords` instead, so nothing is dropped without being counted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from llava_ft.constants import IMAGE_TOKEN
from llava_ft.data.conversation import Conversation, DataError, Message

FORMATS = ("llava", "xtuner", "alpaca", "openai", "text")
# First key found wins; checked in this order so that e.g. a llava record with a stray "text" key is llava.
_DETECT_KEYS = (("conversations", "llava"), ("conversation", "xtuner"), ("messages", "openai"),
                ("instruction", "alpaca"), ("text", "text"))  # fmt: skip
_LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_OPENAI_ROLES = {"system", "user", "assistant"}


@dataclass
class BadRecords:
    """Records skipped under `skip_bad`, each as (where, problem)."""

    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, err: DataError) -> None:
        self.items.append((err.where, err.problem))

    def __len__(self) -> int:
        return len(self.items)

    def summary(self, limit: int = 20) -> str:
        if not self.items:
            return "bad records: 0"
        lines = [f"bad records: {len(self.items)}"]
        lines += [f"  {where}: {problem}" for where, problem in self.items[:limit]]
        if len(self.items) > limit:
            lines.append(f"  ... and {len(self.items) - limit} more")
        return "\n".join(lines)


def detect_format(record: Any, where: str) -> str:
    if isinstance(record, dict):
        for key, fmt in _DETECT_KEYS:
            if key in record:
                return fmt
        raise DataError(
            where, f"cannot detect the format from keys {sorted(record)}; name it (one of {FORMATS})"
        )
    raise DataError(where, f"a record must be a JSON object, got {type(record).__name__}")


def iter_conversations(
    path: str | Path, fmt: str = "auto", *, skip_bad: bool = False, bad: BadRecords | None = None
) -> Iterator[Conversation]:
    """Yield conversations lazily. Bad records raise `DataError`, or with `skip_bad` go to `bad`."""
    if skip_bad and bad is None:
        raise ValueError("skip_bad needs a BadRecords to count the skipped records in (bad=...)")
    reader = FormatReader(fmt)
    for where, record in iter_records(path):
        try:
            conv = reader.conversation(record, where)
        except DataError as err:
            if not skip_bad:
                raise
            bad.add(err)
            continue
        yield conv


def read_conversations(
    path: str | Path, fmt: str = "auto", *, skip_bad: bool = False
) -> tuple[list[Conversation], BadRecords]:
    bad = BadRecords()
    return list(iter_conversations(path, fmt, skip_bad=skip_bad, bad=bad)), bad


class FormatReader:
    """Records of one file -> conversations; with "auto" the format is detected once per file, from the first
    record whose keys name one. `detect` follows that rule for records that are not converted (a process
    that reads the whole file but converts only its share of it)."""

    def __init__(self, fmt: str = "auto"):
        if fmt != "auto" and fmt not in FORMATS:
            raise ValueError(f"unknown data format {fmt!r}; expected 'auto' or one of {FORMATS}")
        self.fmt = fmt

    def detect(self, record: Any) -> None:
        if self.fmt == "auto" and not isinstance(record, DataError):
            try:
                self.fmt = detect_format(record, "")
            except DataError:
                pass

    def conversation(self, record: Any, where: str) -> Conversation:
        """The record's conversation, or `DataError` (a record that was not JSON comes as its DataError)."""
        if isinstance(record, DataError):
            raise record
        if self.fmt == "auto":
            self.fmt = detect_format(record, where)
        conv = _ADAPTERS[self.fmt](record, where)
        _validate(conv, where)
        conv.source = where
        return conv


def effective_format(path: str | Path, fmt: str = "auto") -> str:
    """The format the file's records are converted with: `fmt` when named; with "auto", the format the first
    record names, which "auto" then converts every record with, as if named. A file whose first record names
    none stays "auto" (records before the detecting one are reported differently than under a named format).
    Reads only the first record: `.json` files are not checked as a whole here."""
    if fmt != "auto":
        return fmt
    path = Path(path)
    try:
        with path.open("rb") as handle:
            if path.suffix == ".json":
                first = _first_json_item(handle)
            else:
                raw = next((line for line in handle if line.strip()), None)
                first = None if raw is None else parse_record(raw, "")
            return detect_format(first, "") if first is not None else "auto"
    except (DataError, OSError, ValueError):  # reading the file reports it properly
        return "auto"


def _first_json_item(handle: BinaryIO) -> Any:
    """The first record of a JSON list (None for an empty list), decoded from as much of the file as it needs."""
    data, decoder = b"", json.JSONDecoder()
    while chunk := handle.read(1 << 16):
        data += chunk
        # Decoded anew each time: a character cut by the read is whole in the next round.
        head = data.decode("utf-8", errors="ignore").lstrip()
        if not head.startswith("["):
            return None
        body = head[1:].lstrip()
        if body.startswith("]"):
            return None
        try:
            return decoder.raw_decode(body)[0]
        except json.JSONDecodeError:
            continue  # the record goes on past this read
    return None


def iter_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for every record of the file, in order. A `.jsonl` line that is not JSON comes as
    (where, DataError), so that it is counted in its place; a `.json` file that is not a list of JSON values
    raises before the first record (no record of it can be trusted).

    A `.json` list is parsed whole by `json.loads` (its records are held in memory while they are read; LLaVA-size
    data is better kept as `.jsonl`, which is read line by line)."""
    path, handle = _open(path)
    with handle:
        if path.suffix == ".json":
            for index, record in enumerate(_json_list(path, handle)):
                yield f"{path}[{index}]", record
            return
        for where, raw in _lines(path, handle):
            try:
                yield where, parse_record(raw, where)
            except DataError as err:
                yield where, err


def parse_record(raw: bytes, where: str) -> Any:
    """One record's JSON text (a `.jsonl` line) -> its value, or `DataError` naming the record."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(where, f"not UTF-8: {e.reason} at byte {e.start}") from e
    except json.JSONDecodeError as e:
        raise DataError(where, f"malformed JSON line: {e.msg} (column {e.colno})") from e


def _open(path: str | Path) -> tuple[Path, BinaryIO]:
    path = Path(path)
    if path.suffix not in (".json", ".jsonl"):
        raise DataError(str(path), "expected a .json (list of records) or .jsonl (one record per line) file")
    try:
        return path, path.open("rb")
    except OSError as e:
        raise DataError(str(path), f"cannot read file: {e}") from e


def _lines(path: Path, handle: BinaryIO) -> Iterator[tuple[str, bytes]]:
    for lineno, raw in enumerate(handle, start=1):
        if raw.strip():
            yield f"{path}:{lineno}", raw


def _json_list(path: Path, handle: BinaryIO) -> list:
    try:
        text = handle.read().decode("utf-8")  # the bytes are freed before the records are built
    except UnicodeDecodeError as e:
        raise DataError(str(path), f"not UTF-8: {e.reason} at byte {e.start}") from e
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}", f"malformed JSON: {e.msg}") from e
    if not isinstance(records, list):
        raise DataError(str(path), f"a .json file must hold a list of records, got {type(records).__name__}")
    return records


# ---------------------------------------------------------------- helpers shared by the adapters


def _require(record: Any, key: str, where: str, context: str = "") -> Any:
    """record[key]; `context` ("turn 2: ") says which nested object of the record is meant."""
    if not isinstance(record, dict):
        raise DataError(where, f"{context}a record must be a JSON object, got {type(record).__name__}")
    if key not in record:
        raise DataError(where, f"{context}missing key {key!r}")
    return record[key]


def _text(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(where, f"{what} must be a string, got {type(value).__name__}")
    return value


def _images(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(x, str) and x for x in items):
        raise DataError(where, "image(s) must be a non-empty string or a list of non-empty strings")
    return list(items)


def _record_id(record: dict) -> str | None:
    value = record.get("id")
    return None if value is None else str(value)


def _opted_out(turn: dict, where: str, context: str) -> bool:
    """Per-turn opt-out of the loss: `"train": false`, `"loss": false` or `"weight": 0` (OpenAI's 0/1 weight).
    Other values are refused rather than read as "trained": `"train": "false"` would otherwise train."""
    for key in ("train", "loss"):
        if key in turn and not isinstance(turn[key], bool):
            raise DataError(where, f"{context}{key!r} must be true or false, got {turn[key]!r}")
    weight = turn.get("weight", 1)
    if isinstance(weight, bool) or weight not in (0, 1):
        raise DataError(
            where, f"{context}'weight' must be 0 or 1 (loss weights are not fractional), got {weight!r}"
        )
    return turn.get("train") is False or turn.get("loss") is False or weight == 0


def _record_images(record: dict, where: str) -> list[str]:
    """`image` or `images` (either spelling, one path or a list), never both: a key that is not read would
    silently turn an image record into a text-only one."""
    if "image" in record and "images" in record:
        raise DataError(where, "both 'image' and 'images' given; use one")
    return _images(record.get("image", record.get("images")), where)


def _optional_text(record: dict, key: str, where: str, what: str) -> str:
    """record[key] when present and not null, checked to be a string (0 or [] is an error, not "absent")."""
    value = record.get(key)
    return "" if value is None else _text(value, where, what)


# ---------------------------------------------------------------- adapters


def _from_llava(record: Any, where: str) -> Conversation:
    turns = _require(record, "conversations", where)
    if not isinstance(turns, list):
        raise DataError(where, "'conversations' must be a list")
    messages = []
    for i, turn in enumerate(turns):
        sender = _require(turn, "from", where, f"turn {i}: ")
        role = _LLAVA_ROLES.get(sender) if isinstance(sender, str) else None
        if role is None:
            raise DataError(
                where, f"turn {i}: unknown role {sender!r} (expected one of {sorted(_LLAVA_ROLES)})"
            )
        content = _text(_require(turn, "value", where, f"turn {i}: "), where, f"turn {i} 'value'")
        opted_out = _opted_out(turn, where, f"turn {i}: ")
        messages.append(Message(role, content, trainable=False if opted_out else None))
    images = _record_images(record, where)
    if len(images) == 1:
        for msg in messages:
            if msg.role == "user" and msg.content.count(IMAGE_TOKEN) == 1:
                msg.content = _image_first(msg.content)
    return Conversation(messages, images, id=_record_id(record))


def _image_first(content: str) -> str:
    """A one-image LLaVA turn as LLaVA-1.5 and XTuner train it: the marker moved to the front, then the stripped
    text ("What is this?\\n<image>" -> "<image>\\nWhat is this?"; about half of LLaVA-Instruct's records put the
    image last). Chat and eval prompts put the image first too, so training matches them."""
    return f"{IMAGE_TOKEN}\n{content.replace(IMAGE_TOKEN, '').strip()}".strip()


def _from_xtuner(record: Any, where: str) -> Conversation:
    items = _require(record, "conversation", where)
    if not isinstance(items, list):
        raise DataError(where, "'conversation' must be a list")
    messages = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(where, f"item {i}: must be an object with input and output")
        if system := _optional_text(item, "system", where, f"item {i} 'system'"):
            messages.append(Message("system", system))
        messages.append(
            Message("user", _text(_require(item, "input", where, f"item {i}: "), where, f"item {i} 'input'"))
        )
        output = _text(_require(item, "output", where, f"item {i}: "), where, f"item {i} 'output'")
        messages.append(Message("assistant", output))
    return Conversation(messages, _record_images(record, where), id=_record_id(record))


def _from_alpaca(record: Any, where: str) -> Conversation:
    instruction = _text(_require(record, "instruction", where), where, "'instruction'")
    output = _text(_require(record, "output", where), where, "'output'")
    extra = _optional_text(record, "input", where, "'input'")
    system = _optional_text(record, "system", where, "'system'")
    messages = [Message("system", system)] if system else []
    messages += _alpaca_history(record.get("history"), where)
    messages += [Message("user", instruction + ("\n" + extra if extra else "")), Message("assistant", output)]
    return Conversation(messages, _record_images(record, where), id=_record_id(record))


def _alpaca_history(history: Any, where: str) -> list[Message]:
    """LLaMA-Factory's `history`: earlier [instruction, response] pairs, before the record's own turn."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise DataError(where, "'history' must be a list of [instruction, response] pairs")
    messages = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise DataError(where, f"history {i}: must be an [instruction, response] pair")
        messages.append(Message("user", _text(pair[0], where, f"history {i} instruction")))
        messages.append(Message("assistant", _text(pair[1], where, f"history {i} response")))
    return messages


def _from_openai(record: Any, where: str) -> Conversation:
    raw = _require(record, "messages", where)
    if not isinstance(raw, list):
        raise DataError(where, "'messages' must be a list")
    messages, part_images = [], []
    for i, msg in enumerate(raw):
        role = _require(msg, "role", where, f"message {i}: ")
        if not isinstance(role, str) or role not in _OPENAI_ROLES:
            raise DataError(
                where, f"message {i}: unknown role {role!r} (expected one of {sorted(_OPENAI_ROLES)})"
            )
        content = _require(msg, "content", where, f"message {i}: ")
        if isinstance(content, list):
            content = _openai_parts(content, part_images, f"{where} message {i}")
        messages.append(
            Message(
                role,
                _text(content, where, f"message {i} 'content'"),
                trainable=False if _opted_out(msg, where, f"message {i}: ") else None,
            )
        )
    images = _record_images(record, where)
    if images and part_images:
        raise DataError(where, "images are given both in 'images' and inside content parts")
    return Conversation(messages, images or part_images, id=_record_id(record))


def _openai_parts(parts: list, images: list[str], where: str) -> str:
    """Text parts concatenated in order; an image part becomes `<image>\\n` (its path, if given, is collected): the
    string chat puts before a question and an hf-llava export's chat template renders for the same parts."""
    out = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            out.append(_text(part.get("text"), where, f"part {j} 'text'"))
        elif kind in ("image", "image_url"):
            out.append(f"{IMAGE_TOKEN}\n")
            ref = part.get(kind)
            ref = ref.get("url") if isinstance(ref, dict) else ref
            if isinstance(ref, str) and ref:
                images.append(ref)
        else:
            raise DataError(where, f"part {j}: expected an object with type text, image or image_url")
    return "".join(out)


def _from_text(record: Any, where: str) -> Conversation:
    text = _text(_require(record, "text", where), where, "'text'")
    if "image" in record or "images" in record:
        raise DataError(where, "plain-text records take no images (use the llava or openai format)")
    return Conversation([Message("assistant", text)], id=_record_id(record), kind="text")


_ADAPTERS: dict[str, Callable[[Any, str], Conversation]] = {
    "llava": _from_llava, "xtuner": _from_xtuner, "alpaca": _from_alpaca, "openai": _from_openai, "text": _from_text,
}  # fmt: skip


# ---------------------------------------------------------------- validation


def _validate(conv: Conversation, where: str) -> None:
    if not conv.messages:
        raise DataError(where, "empty conversation")
    if conv.kind == "text":
        if not conv.messages[0].content.strip():
            raise DataError(where, "empty text")
    else:
        _trim_leading_assistant(conv)
        _check_roles(conv.messages, where)
    markers = conv.num_image_markers()
    if conv.images and markers == 0:
        # No marker: the image goes before the first user turn, as LLaVA's inference prompts put it (LLaVA's
        # training would leave such an image unused).
        first_user = next(m for m in conv.messages if m.role == "user")
        first_user.content = IMAGE_TOKEN * len(conv.images) + "\n" + first_user.content
    elif markers != len(conv.images):
        raise DataError(where, f"{markers} {IMAGE_TOKEN} marker(s) but {len(conv.images)} image(s)")


def _trim_leading_assistant(conv: Conversation) -> None:
    """Leave out an assistant turn that opens the conversation (after an optional system message), as LLaVA-1.5's
    preprocessing does: some ShareGPT-style records start with the model's greeting, and the rest trains well. An
    image marker in that turn goes with it; `_validate` then puts the image before the first user turn."""
    start = 1 if conv.messages[0].role == "system" else 0
    if len(conv.messages) > start + 1 and conv.messages[start].role == "assistant":
        del conv.messages[start]
        conv.trimmed = True


def _check_roles(messages: list[Message], where: str) -> None:
    """After an optional leading system message: user, assistant, user, ..., ending with assistant."""
    start = 1 if messages[0].role == "system" else 0
    turns = messages[start:]
    if not turns:
        raise DataError(where, "conversation has no user/assistant turns")
    for i, msg in enumerate(turns, start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if msg.role != expected:
            raise DataError(
                where, f"message {i}: expected role {expected!r}, got {msg.role!r} (roles must alternate)"
            )
        if msg.role == "assistant" and not msg.content.strip():
            raise DataError(where, f"message {i}: empty assistant turn")
    if turns[-1].role != "assistant":
        raise DataError(where, "conversation must end with an assistant turn")
