"""Chat templates: Conversation -> segments [(text, trainable)].

One masking strategy for every template: a segment is trained or not, and the tokenizer turns segments
into ids + labels. Trained = assistant content and its end-of-turn marker; never trained = BOS, system and
user turns, role headers and separators (e.g. the "\\n" after `<|im_end|>`, which the next turn's prompt
supplies at inference). Each named chat template carries its model's official Jinja (`jinja`), which exports
write as the tokenizer's chat template, and renders byte-identical to it; `tokenizer` uses the tokenizer's own.
"""

from __future__ import annotations

from dataclasses import dataclass

from jinja2 import TemplateError

from llava_ft.constants import IMAGE_TOKEN
from llava_ft.data.conversation import Conversation, DataError, Message

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
QWEN2_SYSTEM = "You are a helpful assistant."
# End-of-turn markers the `tokenizer` template looks for in a tokenizer's Jinja (plus its eos).
_KNOWN_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool


class _Builder:
    """Collects segments, merging neighbours with the same flag and skipping empty text."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []

    def add(self, text: str, trainable: bool) -> None:
        if not text:
            return
        if self.segments and self.segments[-1].trainable == trainable:
            self.segments[-1] = Segment(self.segments[-1].text + text, trainable)
        else:
            self.segments.append(Segment(text, trainable))


class ChatTemplate:
    """Base: handles kind="text", role checks and the trained-turn rule; subclasses lay out chat turns."""

    name: str = ""
    stop_words: list[str] = []
    special_tokens: tuple[str, ...] = ()
    """Markers the template writes that the tokenizer must map to single special ids."""
    jinja: str | None = None
    """The model's official chat template (its tokenizer_config.json), which this template renders exactly."""

    def segments(
        self,
        conv: Conversation,
        *,
        bos: str,
        eos: str,
        add_generation_prompt: bool = False,
        last_turn_only: bool = False,
    ) -> list[Segment]:
        out = _Builder()
        where = conv.where
        if conv.kind == "text":
            if len(conv.messages) != 1:
                raise DataError(where, f"a text record has exactly one message, got {len(conv.messages)}")
            # Incremental pretraining: every text token is trained, and so is eos (the model learns to stop). BOS is
            # prepended as an id by the Encoder: as text before the document it would change how a sentencepiece
            # tokenizer starts the first word ("The", not tokenizer(text)'s "▁The").
            out.add(conv.messages[0].content, True)
            out.add(eos, True)
        else:
            _check_roles(conv.messages, where)
            trained = _trained_turns(conv.messages, last_turn_only)
            self._chat(conv, trained, out, bos=bos, eos=eos, generation_prompt=add_generation_prompt)
        return out.segments

    def render(
        self,
        conv: Conversation,
        *,
        bos: str,
        eos: str,
        add_generation_prompt: bool = False,
        last_turn_only: bool = False,
    ) -> str:
        segs = self.segments(
            conv, bos=bos, eos=eos, add_generation_prompt=add_generation_prompt, last_turn_only=last_turn_only
        )
        return "".join(s.text for s in segs)

    def _chat(
        self,
        conv: Conversation,
        trained: list[bool],
        out: _Builder,
        *,
        bos: str,
        eos: str,
        generation_prompt: bool,
    ) -> None:
        raise NotImplementedError


def _check_roles(messages: list[Message], where: str) -> None:
    """Optional leading system, then user/assistant alternating from user; may end on either (inference)."""
    if not messages:
        raise DataError(where, "empty conversation")
    start = 1 if messages[0].role == "system" else 0
    for i, msg in enumerate(messages[start:], start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if msg.role != expected:
            raise DataError(where, f"message {i}: expected role {expected!r}, got {msg.role!r}")


def _trained_turns(messages: list[Message], last_turn_only: bool) -> list[bool]:
    trained = [m.role == "assistant" and m.trainable is not False for m in messages]
    if last_turn_only:
        last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
        trained = [t and i == last for i, t in enumerate(trained)]
    return trained


class ChatMLTemplate(ChatTemplate):
    """`<|im_start|>role\\ncontent<|im_end|>\\n` (InternLM2 with bos, Qwen2 with a default system prompt)."""

    special_tokens = ("<|im_start|>", "<|im_end|>")

    def __init__(
        self, name: str, *, use_bos: bool, default_system: str | None, stop_words: list[str], jinja: str
    ):
        self.name, self.use_bos, self.default_system = name, use_bos, default_system
        self.stop_words, self.jinja = stop_words, jinja

    def _chat(self, conv, trained, out, *, bos, eos, generation_prompt):
        if self.use_bos:
            out.add(bos, False)
        if self.default_system is not None and conv.messages[0].role != "system":
            out.add(f"<|im_start|>system\n{self.default_system}<|im_end|>\n", False)
        for msg, train in zip(conv.messages, trained):
            out.add(f"<|im_start|>{msg.role}\n", False)
            out.add(msg.content + "<|im_end|>", train)
            out.add("\n", False)
        if generation_prompt:
            out.add("<|im_start|>assistant\n", False)


class Llama2Template(ChatTemplate):
    """`<s>[INST] <<SYS>>..<</SYS>> user [/INST] answer </s>`; the official Jinja strips every content and
    has no generation prompt (a conversation ending on "[/INST]" already is one)."""

    name = "llama2_chat"
    stop_words = ["</s>"]
    # meta-llama/Llama-2-7b-chat-hf
    jinja = (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
    )

    def _chat(self, conv, trained, out, *, bos, eos, generation_prompt):
        msgs = conv.messages
        system = msgs[0].content if msgs[0].role == "system" else None
        offset = 0 if system is None else 1
        for j, msg in enumerate(msgs[offset:]):
            if msg.role == "user":
                content = msg.content
                if j == 0 and system is not None:
                    content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
                out.add(f"{bos}[INST] {content.strip()} [/INST]", False)
            else:
                out.add(f" {msg.content.strip()} {eos}", trained[j + offset])


class Llama3Template(ChatTemplate):
    """Header per message, content trimmed, `<|eot_id|>` ends a turn; bos before the first message."""

    name = "llama3_chat"
    stop_words = ["<|eot_id|>"]
    special_tokens = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    # meta-llama/Meta-Llama-3-8B-Instruct
    jinja = (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
        "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    )

    def _chat(self, conv, trained, out, *, bos, eos, generation_prompt):
        for j, (msg, train) in enumerate(zip(conv.messages, trained)):
            out.add((bos if j == 0 else "") + f"<|start_header_id|>{msg.role}<|end_header_id|>\n\n", False)
            out.add(msg.content.strip() + "<|eot_id|>", train)
        if generation_prompt:
            out.add("<|start_header_id|>assistant<|end_header_id|>\n\n", False)


class VicunaTemplate(ChatTemplate):
    """LLaVA-1.5 conv_vicuna_v1: `SYSTEM USER: q ASSISTANT: a</s>`. The generation prompt is "ASSISTANT:",
    so the space after it belongs to the trained answer."""

    name = "vicuna_v1"
    stop_words = ["</s>"]
    # LLaVA defines conv_vicuna_v1 in Python only; this is that format stated as Jinja.
    jinja = (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
        '{% set loop_messages = messages[1:] %}{% else %}{{ "A chat between a curious user and an artificial '
        "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's "
        'questions. " }}{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}'
        "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}{% else %}"
        "{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )

    def _chat(self, conv, trained, out, *, bos, eos, generation_prompt):
        msgs = conv.messages
        has_system = msgs[0].role == "system"
        out.add(bos + (msgs[0].content if has_system else VICUNA_SYSTEM) + " ", False)
        for msg, train in list(zip(msgs, trained))[int(has_system) :]:
            if msg.role == "user":
                out.add(f"USER: {msg.content} ", False)
            else:
                out.add("ASSISTANT:", False)
                out.add(f" {msg.content}{eos}", train)
        if generation_prompt:
            out.add("ASSISTANT:", False)


class PlainTemplate(ChatTemplate):
    """LLaVA's `plain` pretraining format: the user turn's image markers only (its text is dropped), then the
    caption + "\\n", trained. As in LLaVA, no eos: the pretrained projector is never used to generate."""

    name = "plain"
    stop_words = ["\n"]
    # LLaVA's preprocess_plain stated as Jinja (no upstream Jinja).
    jinja = (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '<image>' * message['content'].count('<image>') }}{% else %}{{ message['content'] + '\\n' }}"
        "{% endif %}{% endfor %}"
    )

    def _chat(self, conv, trained, out, *, bos, eos, generation_prompt):
        roles = [m.role for m in conv.messages]
        if roles not in (["user"], ["user", "assistant"]):
            raise DataError(
                conv.where,
                f"plain template takes one user + one assistant turn, got {roles}",
            )
        out.add(bos + IMAGE_TOKEN * conv.messages[0].content.count(IMAGE_TOKEN), False)
        if len(roles) == 2:
            out.add(conv.messages[1].content + "\n", trained[1])


class TokenizerTemplate(ChatTemplate):
    """The tokenizer's own Jinja. Each assistant span is found by rendering prefixes: the conversation up to
    the turn with a generation prompt, then with the turn; the span is trained up to and including its first
    end-of-turn marker (the eos or a known marker the Jinja writes). Templates that re-render earlier turns
    (not prefix-stable) are rejected rather than mislabelled."""

    name = "tokenizer"

    def __init__(self, tokenizer):
        jinja = getattr(tokenizer, "chat_template", None)
        if not isinstance(jinja, str) or not jinja:
            raise ValueError(
                f"template 'tokenizer': {type(tokenizer).__name__} has no chat_template; pick a named template "
                f"({', '.join(TEMPLATES)})"
            )
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token
        markers = [m for m in _KNOWN_END_MARKERS if m in jinja]
        self.stop_words = ([eos] if eos and eos not in markers else []) + markers

    def _render(self, messages: list[Message], generation_prompt: bool, where: str) -> str:
        dicts = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return self.tokenizer.apply_chat_template(
                dicts, tokenize=False, add_generation_prompt=generation_prompt
            )
        except TemplateError as e:
            raise DataError(where, f"tokenizer chat template failed: {e}") from e

    def _chat(self, conv, trained, out, *, bos, eos, generation_prompt):
        where = conv.where
        full = self._render(conv.messages, generation_prompt, where)
        pos = 0
        for i, train in enumerate(trained):
            if not train:
                continue
            prompt = self._render(conv.messages[:i], True, where)
            turn = self._render(conv.messages[: i + 1], False, where)
            if not (turn.startswith(prompt) and full.startswith(turn) and len(prompt) >= pos):
                raise DataError(
                    where,
                    f"tokenizer chat template is not prefix-stable at message {i}; use a named template",
                )
            span = turn[len(prompt) :]
            end = self._turn_end(span, conv.messages[i].content)
            out.add(full[pos : len(prompt)], False)
            out.add(span[:end], True)
            pos = len(prompt) + end
        out.add(full[pos:], False)

    def _turn_end(self, span: str, content: str) -> int:
        """End of the turn inside `span`: just past the first stop word after the content (else the span)."""
        stripped = content.strip()
        found = span.find(stripped) if stripped else -1
        after = found + len(stripped) if found >= 0 else 0
        hits = [i + len(w) for w in self.stop_words if (i := span.find(w, after)) >= 0]
        return min(hits) if hits else len(span)


TEMPLATES: dict[str, ChatTemplate] = {
    "internlm2_chat": ChatMLTemplate(
        "internlm2_chat",
        use_bos=True,
        default_system=None,
        stop_words=["<|im_end|>"],
        # internlm/internlm2-chat-1_8b
        jinja=(
            "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
            "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
            "{{ '<|im_start|>assistant\\n' }}{% endif %}"
        ),
    ),
    "qwen2_chat": ChatMLTemplate(
        "qwen2_chat",
        use_bos=False,
        default_system=QWEN2_SYSTEM,
        stop_words=["<|im_end|>", "<|endoftext|>"],
        # Qwen/Qwen2-7B-Instruct
        jinja=(
            "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
        ),
    ),
    "llama2_chat": Llama2Template(),
    "llama3_chat": Llama3Template(),
    "vicuna_v1": VicunaTemplate(),
    "plain": PlainTemplate(),
}
TEMPLATE_NAMES = (*TEMPLATES, "tokenizer")


def differs_from_tokenizer(template: ChatTemplate, tokenizer) -> str | None:
    """How a named chat template renders a probe conversation where the tokenizer's own chat_template renders
    it otherwise (the model's chat format is not the one chosen), else None. `plain` is LLaVA's pretraining
    format, never a chat template; a tokenizer without one, or whose Jinja fails, has nothing to compare."""
    if template.name in ("plain", "tokenizer") or not getattr(tokenizer, "chat_template", None):
        return None
    messages = [Message("user", "Hi"), Message("assistant", "Hello")]
    try:
        theirs = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages], tokenize=False
        )
    except Exception:  # noqa: BLE001 - any Jinja failure: nothing to compare with
        return None
    segments = template.segments(
        Conversation(messages), bos=tokenizer.bos_token or "", eos=tokenizer.eos_token or ""
    )
    ours = "".join(seg.text for seg in segments)
    if ours == theirs:
        return None
    return (
        f"data.template {template.name!r} renders {ours!r}, the tokenizer's own chat_template {theirs!r}: the "
        "model would be trained in a format it was not made for (data.template: tokenizer uses its own)"
    )


def get_template(name: str, tokenizer=None) -> ChatTemplate:
    """A named template, or "tokenizer" for the tokenizer's own chat_template."""
    if name == "tokenizer":
        if tokenizer is None:
            raise ValueError("template 'tokenizer' needs the tokenizer whose chat_template it uses")
        return TokenizerTemplate(tokenizer)
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; expected one of {list(TEMPLATE_NAMES)}")
    return TEMPLATES[name]
