"""Open an export folder (`llava-ft export`'s hf-llava or merged-llm) as llava_ft's own model, so chat, serve and
evaluation answer with it exactly as with the stage output it came from.

hf-llava is taken apart into llava_ft's LlavaModel: transformers' CLIP tower becomes the hf vision tower, the
projector's linear_1/linear_2 an mlp2x_gelu projector, the language model the causal LM. merged-llm is a
text-only LlavaModel. The chat template is the one llava_ft trained with: named in the export's EXPORT_INFO file,
or else found by rendering probe conversations with the folder's Jinja template.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import jinja2
import torch
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    PreTrainedTokenizerBase,
    SiglipVisionModel,
)

from llava_ft.config import VisionSection
from llava_ft.constants import IMAGE_TOKEN
from llava_ft.data.conversation import Conversation, Message
from llava_ft.data.images import ImageProcessor
from llava_ft.data.templates import TEMPLATES, ChatTemplate, get_template
from llava_ft.data.tokenizer import load_tokenizer
from llava_ft.folders import (  # noqa: F401  (exported's names for its users)
    CONFIG_NAME,
    EXPORT_FORMATS,
    EXPORT_INFO,
    folder_has_vision,
    folder_kind,
    read_export_info,
    read_json,
    read_stage_config,
)
from llava_ft.model.build import resolve_attn_implementation, resolve_dtype
from llava_ft.model.llava import LlavaModel
from llava_ft.model.llm import load_llm, nf4_config
from llava_ft.model.projector import MLPProjector
from llava_ft.model.vision import HFClipVisionTower, HFSiglipVisionTower

log = logging.getLogger("llava_ft")

_BICUBIC = 3  # PIL's resample code: llava_ft's ImageProcessor resizes bicubic


@dataclass
class LoadedExport:
    """An export folder built into llava_ft's model (the fields Assistant takes from a LoadedStage)."""

    kind: str
    tokenizer: PreTrainedTokenizerBase
    template: ChatTemplate
    model: LlavaModel
    stop_words: list[str]


def export_info(fmt: str, template: ChatTemplate, llm_vocab_size: int) -> dict:
    """The EXPORT_INFO content `llava-ft export` writes."""
    info = {
        "format": fmt,
        "template": template.name,
        "stop_words": list(template.stop_words),
        "llm_vocab_size": llm_vocab_size,
    }
    if template.name == "tokenizer":
        info["chat_template"] = template.tokenizer.chat_template  # the export's own Jinja is rewritten
    return info


# -- chat template -----------------------------------------------------------------------------------------
def probe_conversations(name: str) -> list[list[Message]]:
    """Conversations on which two renderings of a chat template must agree."""
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


def renders_like(
    template: ChatTemplate,
    tokenizer: PreTrainedTokenizerBase,
    jinja: str,
    messages: list[Message],
    *,
    bos_dropped: bool = False,
) -> bool:
    """Whether `jinja` renders `messages` as llava_ft's `template` (less the leading BOS when `bos_dropped`:
    an hf-llava processor's template leaves that BOS to the tokenizer)."""
    conv = Conversation(messages=messages, images=["x"] * sum(m.content.count(IMAGE_TOKEN) for m in messages))
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    generation_prompt = template.name != "plain"
    expected = template.render(conv, bos=bos, eos=eos, add_generation_prompt=generation_prompt)
    dicts = [{"role": m.role, "content": m.content} for m in messages]
    try:
        got = tokenizer.apply_chat_template(
            dicts, chat_template=jinja, tokenize=False, add_generation_prompt=generation_prompt
        )
    except jinja2.TemplateError:  # e.g. llama2_chat's Jinja on a tokenizer without a bos_token
        return False
    return got == expected or (bos_dropped and bool(bos) and bos + got == expected)


def _template(
    folder: Path, tokenizer: PreTrainedTokenizerBase, info: dict | None
) -> tuple[ChatTemplate, list]:
    """(llava_ft's chat template, stop words) of an export: as its EXPORT_INFO names them, else the named
    template that renders like the folder's Jinja on every probe conversation."""
    if info is not None:
        if info["template"] == "tokenizer":
            tokenizer.chat_template = info.get("chat_template") or tokenizer.chat_template
        template = get_template(info["template"], tokenizer)
        return template, list(info.get("stop_words", template.stop_words))
    jinja = tokenizer.chat_template
    if not jinja:
        raise ValueError(
            f"{folder}: no {EXPORT_INFO} and no chat template: which chat format the model was trained with "
            "is unknown"
        )
    for template in TEMPLATES.values():
        if all(
            renders_like(template, tokenizer, jinja, msgs, bos_dropped=True)
            for msgs in probe_conversations(template.name)
        ):
            log.info("%s: its chat template renders as llava_ft's %r", folder, template.name)
            return template, list(template.stop_words)
    raise ValueError(
        f"{folder}: no {EXPORT_INFO} and its chat template renders like none of llava_ft's templates "
        f"{list(TEMPLATES)}"
    )


# -- models ------------------------------------------------------------------------------------------------
def load_export(path: str | Path, *, load_in_4bit: bool = False) -> LoadedExport:
    """Build an hf-llava or merged-llm export folder into llava_ft's LlavaModel, in eval mode."""
    folder = Path(path)
    kind = folder_kind(folder)
    if kind not in EXPORT_FORMATS:
        raise ValueError(f"{folder}: a {kind} folder, not an export")
    info = read_export_info(folder) if (folder / EXPORT_INFO).is_file() else None
    tokenizer = load_tokenizer(folder)
    template, stop_words = _template(folder, tokenizer, info)
    dtype = resolve_dtype("auto")
    if kind == "merged-llm":
        attn = resolve_attn_implementation(None)
        llm = load_llm(folder, dtype=dtype, load_in_4bit=load_in_4bit, attn_implementation=attn)
        model = LlavaModel(llm)
    else:
        model = _hf_llava_model(folder, dtype, load_in_4bit, info)
    return LoadedExport(kind, tokenizer, template, model.eval(), stop_words)


def _hf_llava_model(folder: Path, dtype: torch.dtype, load_in_4bit: bool, info: dict | None) -> LlavaModel:
    kwargs = {"dtype": dtype, "local_files_only": True, "output_loading_info": True}
    if load_in_4bit:
        quant = nf4_config(dtype)
        quant.llm_int8_skip_modules = ["vision_tower", "multi_modal_projector", "lm_head"]
        kwargs["quantization_config"] = quant
    hf, loading = LlavaForConditionalGeneration.from_pretrained(folder, **kwargs)
    if loading["missing_keys"] or loading["mismatched_keys"]:
        raise ValueError(
            f"{folder}: the weights do not fit its config: missing {sorted(loading['missing_keys'])[:8]}, "
            f"mismatched {sorted(loading['mismatched_keys'])[:8]}"
        )
    config = hf.config
    # CLIP with its CLS dropped ("default"), or SigLIP with every token ("full"), as llava_ft's towers give them.
    tower_class = (
        HFSiglipVisionTower if isinstance(hf.model.vision_tower, SiglipVisionModel) else HFClipVisionTower
    )
    strategy = tower_class.select_strategy
    unsupported = {
        "vision_feature_select_strategy": (config.vision_feature_select_strategy, strategy),
        "projector_hidden_act": (config.projector_hidden_act, "gelu"),
        "multimodal_projector_bias": (config.multimodal_projector_bias, True),
        "vision tower": (
            type(hf.model.vision_tower).__name__,
            SiglipVisionModel.__name__ if strategy == "full" else CLIPVisionModel.__name__,
        ),
    }
    for name, (got, want) in unsupported.items():
        if got != want:
            raise ValueError(f"{folder}: {name} {got!r}; llava_ft's model takes only {want!r}")
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(f"{folder}: vision_feature_layer {config.vision_feature_layer}: one layer only")

    clip = hf.model.vision_tower
    processor = _image_processor(folder, clip.config.image_size)
    vision_cfg = VisionSection(
        backend="hf",
        model=str(folder),
        feature_layer=config.vision_feature_layer,
        image_aspect=processor.aspect,
    )
    tower = tower_class(vision_cfg, clip, processor)
    # The projector keeps fp32 weights, as build_model gives it.
    hf_projector = hf.model.multi_modal_projector
    projector = MLPProjector(hf_projector.linear_1.in_features, hf_projector.linear_1.out_features, depth=2)
    projector.load_state_dict({k: v.float() for k, v in hf_projector.state_dict().items()})

    # The causal LM around Llava's language model and head: built on the meta device, so no weights are
    # allocated twice, then given the loaded modules.
    language_model = hf.model.language_model
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(language_model.config, trust_remote_code=False)
    setattr(llm, llm.base_model_prefix, language_model)
    llm.set_output_embeddings(hf.lm_head)
    llm.config = language_model.config
    llm.generation_config = hf.generation_config
    if meta := [n for n, t in [*llm.named_parameters(), *llm.named_buffers()] if t.is_meta]:
        raise ValueError(f"{folder}: the language model has no weights for {meta[:5]}")
    _drop_image_row(llm, config.image_token_index, info)
    return LlavaModel(llm, tower, projector)


def _drop_image_row(llm, image_token_index: int, info: dict | None) -> None:
    """Remove the embedding row export added for `<image>`: llava_ft never reads it, and its logit (0) would
    take part in every softmax, so option log-probabilities would differ from the stage output's."""
    rows = llm.get_input_embeddings().weight.shape[0]
    if info is not None and "llm_vocab_size" in info:
        vocab = int(info["llm_vocab_size"])
    else:  # an export without EXPORT_INFO: the added row is the last one, all zeros
        head = llm.get_output_embeddings()
        added = image_token_index == rows - 1 and head is not None and not head.weight[-1].any()
        vocab = rows - 1 if added else rows
    if vocab < rows:
        llm.resize_token_embeddings(vocab, mean_resizing=False)


def _image_processor(folder: Path, image_size: int) -> ImageProcessor:
    """llava_ft's ImageProcessor doing what the folder's LlavaImageProcessor does (as export writes it:
    pad to square + resize, squash to a square, or resize + centre crop; bicubic, mean/std)."""
    hf = LlavaImageProcessor.from_pretrained(folder, local_files_only=True)
    size, crop = hf.size or {}, hf.crop_size or {}
    square = {"height": image_size, "width": image_size}
    if size == {"shortest_edge": image_size} and hf.do_center_crop and crop == square:
        aspect = "pad" if hf.do_pad else "crop"
    elif size == square and not hf.do_center_crop and not hf.do_pad:
        aspect = "resize"
    else:
        aspect = None
    plain = hf.do_resize and hf.do_rescale and abs(hf.rescale_factor - 1 / 255) < 1e-12 and hf.do_normalize
    if aspect is None or not plain or hf.resample != _BICUBIC:
        raise ValueError(
            f"{folder}: image processor settings (size {size}, crop {crop}, do_pad {hf.do_pad}, resample "
            f"{hf.resample}) are none of llava_ft's {image_size}px pad / resize / crop preprocessings"
        )
    if aspect == "crop":  # llava-ft export refuses it; another tool's folder may hold it
        log.warning(
            "%s: centre crop: llava_ft crops some image sizes one pixel off from LlavaImageProcessor", folder
        )
    return ImageProcessor(image_size, tuple(hf.image_mean), tuple(hf.image_std), aspect)
