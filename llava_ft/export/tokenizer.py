"""The export's tokenizer, chat template and generation config: what another tool needs to prompt the model
as it was trained and to stop where llava_ft stops."""

from __future__ import annotations

import copy
import logging

from transformers import AddedToken, GenerationConfig, PreTrainedTokenizerBase

from llava_ft.constants import IMAGE_TOKEN
from llava_ft.data.conversation import Conversation, Message
from llava_ft.data.sp_convert import sentencepiece_to_tokenizers
from llava_ft.data.templates import ChatTemplate
from llava_ft.data.tokenizer import InternLM2Tokenizer
from llava_ft.exported import probe_conversations, renders_like
from llava_ft.inference import split_stop_words

log = logging.getLogger("llava_ft")

# Content given as a list of parts (what processors' apply_chat_template receives) becomes the string the
# training templates saw: each image part is `<image>\n`, as llava_ft's inference puts it before the question.
CONTENT_AS_TEXT = (
    "{% set _ns = namespace(messages=[]) %}{% for _m in messages %}{% if _m['content'] is string %}"
    "{% set _ns.messages = _ns.messages + [{'role': _m['role'], 'content': _m['content']}] %}{% else %}"
    "{% set _t = namespace(text='') %}{% for _c in _m['content'] %}{% if _c['type'] == 'image' %}"
    "{% set _t.text = _t.text + '<image>\\n' %}{% elif _c['type'] == 'text' %}{% set _t.text = _t.text + "
    "_c['text'] %}{% endif %}{% endfor %}{% set _ns.messages = _ns.messages + [{'role': _m['role'], "
    "'content': _t.text}] %}{% endif %}{% endfor %}{% set messages = _ns.messages %}"
)


def hf_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A copy of `tokenizer` that AutoTokenizer reloads without custom code and that tokenizes the same."""
    if isinstance(tokenizer, InternLM2Tokenizer):
        return sentencepiece_to_tokenizers(tokenizer)
    return copy.deepcopy(tokenizer)


def add_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add `<image>` as a special token (once) and return its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def chat_template_for(template: ChatTemplate, tokenizer: PreTrainedTokenizerBase) -> str:
    """Jinja that renders exactly as the training template (checked on probe conversations), accepting
    content given as parts ({"type": "image"} / {"type": "text"}) as well as strings."""
    candidates = [template.jinja] if template.jinja else []
    if template.name == "tokenizer" and tokenizer.chat_template:
        candidates.append(tokenizer.chat_template)
    for jinja in candidates:
        jinja = CONTENT_AS_TEXT + jinja
        if all(renders_like(template, tokenizer, jinja, msgs) for msgs in probe_conversations(template.name)):
            return jinja
    raise ValueError(f"no chat template (Jinja) known to render like llava_ft's '{template.name}' template")


def processor_chat_template(jinja: str, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate) -> str:
    """The processor's chat template, so that both processor paths give training's ids:
    `processor(text=apply_chat_template(...))` (special tokens added by the tokenizer) and
    `apply_chat_template(..., tokenize=True)` (which adds them only when the prompt does not start with BOS).

    `jinja` writes BOS as training did. When the tokenizer adds BOS itself, the template drops its leading one,
    as llava-hf's processors do, provided the text then tokenizes the same; otherwise (sentencepiece-style
    tokenizers tokenize "A" after `<s>` unlike at the start) the template keeps BOS and the tokenizer stops
    adding it (`tokenizer` is changed in place)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    auto = tokenizer("a")["input_ids"]
    if auto == plain:
        return jinja  # nothing added: the template's own BOS stays
    bos = tokenizer.bos_token
    convs = [
        Conversation(messages=m) for m in probe_conversations(template.name) if IMAGE_TOKEN not in str(m)
    ]
    convs = convs or [Conversation(messages=[Message("user", "Hi")])]
    texts = [
        template.render(c, bos=bos or "", eos=tokenizer.eos_token or "", add_generation_prompt=True)
        for c in convs
    ]
    if bos is not None and auto == [tokenizer.bos_token_id, *plain] and all(t.startswith(bos) for t in texts):
        if all(
            tokenizer(t[len(bos) :])["input_ids"] == tokenizer(t, add_special_tokens=False)["input_ids"]
            for t in texts
        ):
            # Render with BOS (the checked template), then drop the leading one: later BOS tokens (llama2_chat's
            # per turn) stay.
            return (
                "{% set _rendered %}" + jinja + "{% endset %}{{ _rendered[bos_token|length:] "
                "if bos_token and _rendered.startswith(bos_token) else _rendered }}"
            )
    tokenizer.add_bos_token = False
    tokenizer.add_eos_token = False
    if tokenizer("a")["input_ids"] != plain:
        added = tokenizer.convert_ids_to_tokens([t for t in auto if t not in plain])
        raise ValueError(
            f"the tokenizer adds {added} to every text and cannot be told not to: a LlavaProcessor would "
            f"tokenize prompts unlike llava_ft's '{template.name}' template (export --format merged-llm instead)"
        )
    return jinja


def generation_config(
    llm, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate, suppress: list[int]
) -> GenerationConfig:
    """The LLM's generation config with the template's stop words as eos ids and `suppress`ed token ids."""
    gen = copy.deepcopy(llm.generation_config)
    # What another tool sees is eos_token_id only: it stops when the model emits eos or a single-token stop
    # word as that very token, not when the word is merged into a larger token (byte-level BPE's ".\n" for the
    # `plain` template's "\n") or spans several tokens; llava_ft's Assistant also matches them on decoded text.
    # No stop_strings: transformers' generate refuses to run without `tokenizer=` when the saved config has
    # them, and runtimes that read only eos ids ignore them.
    gen.eos_token_id, text_words = split_stop_words(tokenizer, template.stop_words)
    gen.stop_strings = None
    if text_words:
        log.info(
            "stop words %s are matched on decoded text by llava_ft only; the export stops on token ids %s",
            text_words,
            gen.eos_token_id,
        )
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen.suppress_tokens = suppress or None
    return gen
