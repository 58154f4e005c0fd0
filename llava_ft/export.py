"""Export a stage output as standard transformers folders, with every LoRA adapter merged.

- "hf-llava": a `LlavaForConditionalGeneration` folder with its `LlavaProcessor` (tokenizer with an `<image>`
  token, `LlavaImageProcessor`, chat template), loadable with no custom code.
- "merged-llm": the merged causal LM alone (+ tokenizer, chat template): AutoModelForCausalLM/AutoTokenizer.

QLoRA runs are merged into the base loaded unquantized (fp32), never into 4-bit weights. The folder is written
beside the destination and renamed into place only after it has been reloaded and checked: nothing missing or
unexpected in the weights, the same logits as llava_ft's model (fp32), the same token ids as llava_ft's tokenizer.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import jinja2
import torch
from transformers import AddedToken, GenerationConfig, PreTrainedTokenizerBase

from llava_ft.constants import IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava_ft.data.conversation import Conversation, Message
from llava_ft.files import atomic_dir, check_replaceable_dir
from llava_ft.stage import load_stage, read_stage_config

log = logging.getLogger("llava_ft")

Format = Literal["hf-llava", "merged-llm"]
FORMATS: tuple[str, ...] = ("hf-llava", "merged-llm")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")

# Official chat templates (the models' tokenizer_config.json; vicuna_v1 and plain are LLaVA's formats) of the
# named llava_ft templates. `chat_template_for` proves each renders exactly as the training template before use.
OFFICIAL_JINJA: dict[str, str] = {
    "internlm2_chat": (
        "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "qwen2_chat": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama2_chat": (
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
    ),
    "llama3_chat": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
        "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "vicuna_v1": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
        '{% set loop_messages = messages[1:] %}{% else %}{{ "A chat between a curious user and an artificial '
        "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's "
        'questions. " }}{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}'
        "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}{% else %}"
        "{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    "plain": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '<image>' * message['content'].count('<image>') }}{% else %}{{ message['content'] + '\\n' }}"
        "{% endif %}{% endfor %}"
    ),
}

# Content given as a list of parts (what processors' apply_chat_template receives) becomes the string the
# training templates saw: each image part is `<image>\n`, as llava_ft's inference puts it before the question.
_CONTENT_AS_TEXT = (
    "{% set _ns = namespace(messages=[]) %}{% for _m in messages %}{% if _m['content'] is string %}"
    "{% set _ns.messages = _ns.messages + [{'role': _m['role'], 'content': _m['content']}] %}{% else %}"
    "{% set _t = namespace(text='') %}{% for _c in _m['content'] %}{% if _c['type'] == 'image' %}"
    "{% set _t.text = _t.text + '<image>\\n' %}{% elif _c['type'] == 'text' %}{% set _t.text = _t.text + "
    "_c['text'] %}{% endif %}{% endfor %}{% set _ns.messages = _ns.messages + [{'role': _m['role'], "
    "'content': _t.text}] %}{% endif %}{% endfor %}{% set messages = _ns.messages %}"
)

# Strings whose token ids the export compares with llava_ft's tokenizer: whitespace runs, newlines,
# special tokens mid-text, non-Latin text, byte fallback.
PROBE_TEXTS: tuple[str, ...] = (
    "Hello world",
    " Hello  there\nfriend",
    "  leading and trailing  ",
    "def f():\n    return [1,  2,   3]\n\n",
    "数学问题 and émigré ümlaut",
    "emoji 😀 and tabs\t\tend",
    "<|im_start|>user\nHi<|im_end|>\n",
    "</s> after eos <s>",
)


@dataclass
class ExportResult:
    output: Path
    format: str
    merge_max_diff: float | None = None
    """Largest |logit| difference, llava_ft model with adapters applied vs merged (fp32)."""
    export_max_diff: float | None = None
    """Largest |logit| difference, llava_ft merged model vs the reloaded export (fp32 compute)."""
    image_token_index: int | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- loading


def load_merged(checkpoint: str | Path):
    """(cfg, tokenizer, template, LlavaModel with adapters applied but not merged), fp32, unquantized."""
    # QLoRA adapters merge into the base in full precision: a 4-bit base cannot hold the merged weights.
    stage = load_stage(checkpoint, dtype="float32")
    return stage.config, stage.tokenizer, stage.template, stage.model


def merge_adapters(model) -> list[str]:
    """Merge every peft adapter of a LlavaModel in place; returns what was merged."""
    from peft import PeftModel

    merged = []
    for attr in ("llm", "vision_tower"):
        module = getattr(model, attr)
        while isinstance(module, PeftModel):  # one wrapper per stage that trained an adapter
            if attr == "llm" and untie_adapted_embeddings(module.get_base_model()):
                log.info("LoRA targets the tied input/output embeddings: the export saves lm_head separately")
            module = module.merge_and_unload()
            merged.append(attr)
        setattr(model, attr, module)
    return merged


def untie_adapted_embeddings(llm) -> bool:
    """Give the output layer its own copy of the shared embedding matrix when a LoRA adapts either of them.

    Merging adds a LoRA's delta to its base weight; with tied embeddings that weight is also the other layer's,
    so an lm_head delta would change the input embeddings (and vice versa). Returns whether it untied."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    inp, out = llm.get_input_embeddings(), llm.get_output_embeddings()
    if out is None or inp is None or not (isinstance(inp, BaseTunerLayer) or isinstance(out, BaseTunerLayer)):
        return False
    head = out.get_base_layer() if isinstance(out, BaseTunerLayer) else out
    table = inp.get_base_layer() if isinstance(inp, BaseTunerLayer) else inp
    if head.weight.data_ptr() != table.weight.data_ptr():
        return False
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    # Saved and reloaded untied: with tie_word_embeddings transformers would tie them again on load.
    for config in {id(c): c for c in (llm.config, llm.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return True


# --------------------------------------------------------------------------------------------- tokenizer


def hf_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A copy of `tokenizer` that AutoTokenizer reloads without custom code and that tokenizes the same."""
    from llava_ft.data.sp_convert import sentencepiece_to_tokenizers
    from llava_ft.data.tokenizer import InternLM2Tokenizer

    if isinstance(tokenizer, InternLM2Tokenizer):
        return sentencepiece_to_tokenizers(tokenizer)
    return copy.deepcopy(tokenizer)


def add_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add `<image>` as a special token (once) and return its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def _probe_conversations(name: str) -> list[list[Message]]:
    if name == "plain":  # one image-caption pair, never a generation prompt
        return [[Message("user", "<image>\nignored"), Message("assistant", "A cat.")]]
    return [
        [Message("user", "Hi there!")],
        [Message("system", "Be brief."), Message("user", "Name a colour.")],
        [
            Message("user", "<image>\nWhat is shown?"),
            Message("assistant", "A cat."),
            Message("user", "Colour?"),
        ],
    ]


def chat_template_for(template, tokenizer) -> str:
    """Jinja that renders exactly as the training template (checked on probe conversations), accepting
    content given as parts ({"type": "image"} / {"type": "text"}) as well as strings."""
    candidates = [OFFICIAL_JINJA[template.name]] if template.name in OFFICIAL_JINJA else []
    if template.name == "tokenizer" and tokenizer.chat_template:
        candidates.append(tokenizer.chat_template)
    for jinja in candidates:
        jinja = _CONTENT_AS_TEXT + jinja
        if all(
            _renders_like(template, tokenizer, jinja, msgs) for msgs in _probe_conversations(template.name)
        ):
            return jinja
    raise ValueError(f"no chat template (Jinja) known to render like llava_ft's '{template.name}' template")


def processor_chat_template(jinja: str, tokenizer: PreTrainedTokenizerBase, template) -> str:
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
        Conversation(messages=m) for m in _probe_conversations(template.name) if IMAGE_TOKEN not in str(m)
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


def _renders_like(template, tokenizer, jinja: str, messages: list[Message]) -> bool:
    conv = Conversation(messages=messages, images=["x"] * sum(m.content.count(IMAGE_TOKEN) for m in messages))
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    expected = template.render(conv, bos=bos, eos=eos, add_generation_prompt=template.name != "plain")
    dicts = [{"role": m.role, "content": m.content} for m in messages]
    try:
        got = tokenizer.apply_chat_template(
            dicts, chat_template=jinja, tokenize=False, add_generation_prompt=template.name != "plain"
        )
    except jinja2.TemplateError:  # e.g. llama2_chat's Jinja on a tokenizer without a bos_token
        return False
    return got == expected


# --------------------------------------------------------------------------------------------- model parts


def _resize_for_token(llm, token_id: int) -> None:
    """Give the LLM an embedding row for `token_id`. Its input row is never read (image features replace
    it); its output row is zero and generation suppresses the token."""
    rows = llm.get_input_embeddings().weight.shape[0]
    if token_id < rows:
        return
    llm.resize_token_embeddings(token_id + 1, mean_resizing=False)
    with torch.no_grad():
        llm.get_input_embeddings().weight[rows:] = 0
        if llm.get_output_embeddings() is not None:
            llm.get_output_embeddings().weight[rows:] = 0


def _ties_embeddings(llm) -> bool:
    out = llm.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == llm.get_input_embeddings().weight.data_ptr()


def hf_vision_tower(tower):
    """(CLIPVisionConfig, state dict) of transformers' CLIPVisionModel for a llava_ft VisionTower."""
    from llava_ft.model.clip_convert import open_clip_to_hf_clip_vision
    from llava_ft.model.vision import HFClipVisionTower, OpenClipVisionTower

    if tower.cfg.pool != 1:
        raise ValueError(
            f"the vision tower average-pools its patch grid (pool={tower.cfg.pool}); transformers' Llava has no "
            "pooling, so hf-llava cannot express it (export --format merged-llm, or train with pool: 1)"
        )
    if isinstance(tower, OpenClipVisionTower):
        return open_clip_to_hf_clip_vision(tower.model, tower.open_clip_cfg)
    if isinstance(tower, HFClipVisionTower):
        return tower.model.config, dict(tower.model.state_dict())
    raise ValueError(f"no transformers CLIP equivalent for vision tower {type(tower).__name__}")


def hf_projector_state(projector) -> dict[str, torch.Tensor]:
    from llava_ft.model.projector import MLPProjector

    if not isinstance(projector, MLPProjector) or projector.depth != 2:
        depth = getattr(projector, "depth", "?")
        raise ValueError(
            f"transformers' Llava projector is Linear-GELU-Linear (mlp2x_gelu); this one has {depth} linear layer(s)"
        )
    return dict(projector.state_dict())


def build_hf_llava(model, image_token_index: int):
    """transformers' LlavaForConditionalGeneration holding llava_ft's merged weights (the LLM already resized)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.initialization import no_init_weights

    tower = model.vision_tower
    vision_config, vision_state = hf_vision_tower(tower)
    projector_state = hf_projector_state(model.projector)
    llm = model.llm
    tied = _ties_embeddings(llm)
    text_config = copy.deepcopy(llm.config)
    text_config.tie_word_embeddings = tied
    config = LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=image_token_index,
        image_seq_length=tower.num_tokens,
        projector_hidden_act="gelu",  # nn.GELU (erf), as llava_ft's projector
        vision_feature_layer=tower.cfg.feature_layer,
        vision_feature_select_strategy="default",  # the tower drops CLS, as LLaVA
        multimodal_projector_bias=True,
        tie_word_embeddings=tied,
    )
    # LlavaConfig forces tying whenever the text config ties; an untied LLM must stay untied.
    if config.tie_word_embeddings != tied:
        raise ValueError(
            f"LlavaConfig set tie_word_embeddings={config.tie_word_embeddings}, the LLM has {tied}"
        )
    with no_init_weights():
        llava = LlavaForConditionalGeneration(config)
    state = {f"model.vision_tower.{k}": v for k, v in vision_state.items()}
    state |= {f"model.multi_modal_projector.{k}": v for k, v in projector_state.items()}
    state |= {f"model.language_model.{k}": v for k, v in llm.base_model.state_dict().items()}
    state["lm_head.weight"] = llm.get_output_embeddings().weight
    llava.load_state_dict(state, strict=True)
    llava.generation_config = copy.deepcopy(llm.generation_config)
    return llava.eval()


# transformers' center_crop floors the margin; llava_ft (torchvision's CenterCrop) rounds it half to even, so
# for some image sizes every pixel would be one position off.
CROP_UNSUPPORTED = (
    "model.vision.image_aspect: crop cannot be exported as hf-llava: transformers' LlavaImageProcessor centre "
    "crops at other offsets than llava_ft (one pixel off for some image sizes). Export --format merged-llm, "
    "or train with image_aspect pad or resize"
)


def image_processor_for(tower):
    """LlavaImageProcessor reproducing llava_ft's ImageProcessor (use the PIL backend for exact pixels)."""
    from transformers import LlavaImageProcessor

    p = tower.processor
    if p.aspect == "crop":
        raise ValueError(CROP_UNSUPPORTED)
    size = p.image_size
    common = {"image_mean": list(p.mean), "image_std": list(p.std), "resample": 3, "do_convert_rgb": True}
    if p.aspect == "resize":
        return LlavaImageProcessor(
            do_pad=False, size={"height": size, "width": size}, do_center_crop=False, **common
        )
    return LlavaImageProcessor(
        do_pad=p.aspect == "pad",
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        **common,
    )


def _generation_config(llm, tokenizer, template, suppress: list[int]) -> GenerationConfig:
    from llava_ft.inference import split_stop_words

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


# --------------------------------------------------------------------------------------------- checks


_DUMMY_QUESTION = "Describe this in  detail.\nPlease!"


def _dummy_inputs(model, tokenizer, template, with_image: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """llava_ft prompt ids (with IMAGE_TOKEN_INDEX placeholders when with_image) and pixel values for the
    logit checks."""
    from llava_ft.data.tokenize import Encoder

    has_vision = with_image and model.vision_tower is not None
    question = (f"{IMAGE_TOKEN}\n" if has_vision else "") + _DUMMY_QUESTION
    conv = Conversation(messages=[Message("user", question)], images=["dummy"] if has_vision else [])
    encoder = Encoder(tokenizer, template, max_length=None, num_image_tokens=max(1, model.num_image_tokens))
    ids = torch.tensor([encoder.encode_prompt(conv)])
    pixels = None
    if has_vision:
        gen = torch.Generator().manual_seed(0)
        size = model.vision_tower.image_size
        pixels = torch.randn(1, 3, size, size, generator=gen)
    return ids, pixels


@torch.no_grad()
def llava_ft_logits(model, ids: torch.Tensor, pixels: torch.Tensor | None) -> torch.Tensor:
    embeds = model.embed(ids, pixels)
    return model.llm(
        inputs_embeds=embeds, attention_mask=torch.ones_like(ids), use_cache=False
    ).logits.float()


def _check_loading(info: dict, where: Path) -> None:
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise ValueError(f"{where}: reloading the export is not clean: {problems or info['error_msgs']}")


def check_token_ids(reference: PreTrainedTokenizerBase, exported: PreTrainedTokenizerBase, texts) -> None:
    for text in texts:
        want = reference(text, add_special_tokens=False)["input_ids"]
        got = exported(text, add_special_tokens=False)["input_ids"]
        if want != got:
            raise ValueError(f"exported tokenizer differs from llava_ft's on {text!r}: {got} vs {want}")


def _max_diff(a: torch.Tensor, b: torch.Tensor, what: str) -> float:
    if a.shape[-1] < b.shape[-1]:  # the export's extra <image> row
        b = b[..., : a.shape[-1]]
    diff = float((a - b).abs().max())
    tol = 1e-4 * max(1.0, float(a.abs().max()))
    if diff > tol:
        raise ValueError(f"{what}: logits differ by up to {diff:.3g} (tolerance {tol:.3g})")
    return diff


# --------------------------------------------------------------------------------------------- export


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    fmt: Format = "hf-llava",
    dtype: str = "float32",
    verify: bool = True,
    overwrite: bool = False,
) -> ExportResult:
    """Merge a stage output's adapters and write `fmt` to `output` (atomically; verified unless verify=False)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {list(FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {list(DTYPES)}")
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output}: already exists (pass --overwrite to replace it)")

    check_replaceable_dir(output)  # a file as --output fails now, not after the merge
    vision = read_stage_config(checkpoint).model.vision
    if fmt == "hf-llava" and vision is None:
        raise ValueError(
            f"{checkpoint}: a text-only checkpoint (no vision tower) exports as merged-llm, not hf-llava"
        )
    if fmt == "hf-llava" and vision.image_aspect == "crop":
        raise ValueError(f"{checkpoint}: {CROP_UNSUPPORTED}")
    _, tokenizer, template, model = load_merged(checkpoint)
    result = ExportResult(output=output, format=fmt)
    ids, pixels = _dummy_inputs(model, tokenizer, template, with_image=fmt == "hf-llava")
    before = llava_ft_logits(model, ids, pixels) if verify else None
    merged = merge_adapters(model)
    result.notes.append(f"merged adapters: {merged or 'none'}")
    if verify:
        result.merge_max_diff = _max_diff(before, llava_ft_logits(model, ids, pixels), "adapter merge")
    torch_dtype = getattr(torch, dtype)
    if torch_dtype != torch.float32:
        # The checks compare with the weights as saved: rounded to the export dtype, computed in fp32.
        # Parameters only: buffers such as RoPE's inv_freq are not saved and are rebuilt in fp32 on load.
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch_dtype))
    reference = llava_ft_logits(model, ids, pixels) if verify else None

    hf_tok = hf_tokenizer(tokenizer)
    # Training pads on the right (labels); batched generation with the export needs left padding. Only
    # init_kwargs are written to tokenizer_config.json.
    hf_tok.padding_side = hf_tok.init_kwargs["padding_side"] = "left"
    hf_tok.chat_template = chat_template_for(template, tokenizer)
    if fmt == "hf-llava":
        hf_tok.chat_template = processor_chat_template(hf_tok.chat_template, hf_tok, template)
    suppress: list[int] = []
    if fmt == "hf-llava":
        result.image_token_index = add_image_token(hf_tok)
        suppress = [result.image_token_index]
        _resize_for_token(model.llm, result.image_token_index)
    generation = _generation_config(model.llm, tokenizer, template, suppress)

    def write(folder: Path) -> None:
        if fmt == "hf-llava":
            _write_hf_llava(model, hf_tok, generation, folder, torch_dtype)
        else:
            _write_merged_llm(model.llm, hf_tok, generation, folder, torch_dtype)
        if verify:
            image_processor = model.vision_tower.processor if fmt == "hf-llava" else None
            result.export_max_diff = _verify(
                folder, fmt, reference, ids, pixels, tokenizer, result, image_processor
            )

    atomic_dir(output, write)
    log.info("exported %s (%s) to %s", checkpoint, fmt, output)
    return result


def _write_hf_llava(model, tokenizer, generation, folder: Path, dtype: torch.dtype) -> None:
    from transformers import LlavaProcessor

    llava = build_hf_llava(model, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).to(dtype)
    llava.generation_config = generation
    llava.save_pretrained(folder)
    tower = model.vision_tower
    processor = LlavaProcessor(
        image_processor=image_processor_for(tower),
        tokenizer=tokenizer,
        patch_size=llava.config.vision_config.patch_size,
        vision_feature_select_strategy=llava.config.vision_feature_select_strategy,
        chat_template=tokenizer.chat_template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLS: with 0 the processor expands <image> to one token too few
    )
    processor.save_pretrained(folder)


def _write_merged_llm(llm, tokenizer, generation, folder: Path, dtype: torch.dtype) -> None:
    llm = llm.to(dtype)
    llm.generation_config = generation
    llm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# Odd sizes, wide and tall: where resizing and centring arithmetic could differ by a pixel.
VERIFY_IMAGE_SIZES: tuple[tuple[int, int], ...] = ((37, 23), (23, 37), (61, 40), (33, 35), (50, 50))


def _verify(
    folder: Path,
    fmt: str,
    reference,
    ids,
    pixels,
    tokenizer,
    result: ExportResult,
    image_processor=None,
) -> float:
    """Reload `folder` the standard way and compare tokens, pixels and logits with llava_ft's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    exported_tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    check_token_ids(tokenizer, exported_tok, PROBE_TEXTS)
    messages = [{"role": "user", "content": _DUMMY_QUESTION}]
    rendered = exported_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    check_token_ids(tokenizer, exported_tok, [rendered])
    if fmt == "hf-llava":
        hf_ids = ids.masked_fill(ids == IMAGE_TOKEN_INDEX, result.image_token_index)
        _verify_processor(folder, hf_ids[0].tolist(), image_processor, result)
        hf, info = LlavaForConditionalGeneration.from_pretrained(
            folder, dtype=torch.float32, output_loading_info=True, local_files_only=True
        )
        inputs = {"input_ids": hf_ids, "pixel_values": pixels}
    else:
        # The text-only path: the tokenizer's chat template, tokenized, gives the prompt as trained.
        got = exported_tok.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"]
        if list(got) != ids[0].tolist():
            raise ValueError(
                f"{folder}: apply_chat_template(tokenize=True) gives {list(got)}, training {ids[0]}"
            )
        hf, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, output_loading_info=True, local_files_only=True
        )
        inputs = {"input_ids": ids}
    _check_loading(info, folder)
    with torch.no_grad():
        logits = hf(**inputs, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()
    return _max_diff(reference, logits, f"{folder} reloaded")


def _verify_processor(folder: Path, want: list[int], image_processor, result: ExportResult) -> None:
    """The reloaded LlavaProcessor, used both standard ways, gives training's prompt ids, and its image
    processor llava_ft's pixels (PIL backend, as open_clip's transform)."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, local_files_only=True, backend="pil")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in VERIFY_IMAGE_SIZES]
    content = [{"type": "image", "image": images[0]}, {"type": "text", "text": _DUMMY_QUESTION}]
    messages = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    paths = {
        "processor(text=apply_chat_template(...))": processor(images=images[0], text=text)["input_ids"][0],
        "apply_chat_template(tokenize=True)": processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"][0],
    }
    for how, got in paths.items():
        got = list(got)
        if got == want:
            continue
        image_id = result.image_token_index
        if got[:2] != want[:2] or got.count(image_id) != want.count(image_id):
            # BOS twice or missing, or image features that would not fit the placeholders: a broken export.
            raise ValueError(f"{folder}: the processor's {how} gives ids {got}, training {want}")
        # Elsewhere only tokenization at the <image> boundary can differ: llava_ft tokenizes the text on each
        # side apart, and sentencepiece-style tokenizers then add a "▁" piece there.
        note = f"the processor's {how} tokenizes around <image> unlike training: {got} vs {want}"
        log.warning(note)
        result.notes.append(note)
    for image in images:
        got = processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        diff = float((got - image_processor(image)).abs().max())
        if diff > 1e-5:
            raise ValueError(
                f"{folder}: the image processor's pixels for a {image.size[0]}x{image.size[1]} image differ "
                f"from llava_ft's by up to {diff:.3g}"
            )
