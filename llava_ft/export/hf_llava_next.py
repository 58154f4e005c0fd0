"""The "hf-llava-next" and "hf-llava-onevision" formats: an any-resolution llava_ft model as transformers'
LlavaNextForConditionalGeneration or LlavaOnevisionForConditionalGeneration with its processor, loadable with no
custom code.

Both classes hold the same parts (tower, projector, `image_newline`, LLM) and tile as LLaVA-NeXT does, as
llava_ft's any-res model. OneVision adds one step: it shrinks an image's tile features when they exceed
`anyres_max_N` tiles; N is set to the most tiles of any canvas, so it never acts. What stays different: OneVision
encodes the images of a prompt given as a nested list ([[a, b]], as `apply_chat_template(tokenize=True)` passes
them) at base resolution only, where llava_ft tiles each; a flat list (`processor(images=[a, b], text=...)`)
tiles each image there too.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerBase,
)
from transformers.initialization import no_init_weights

from llava_ft.constants import IMAGE_TOKEN
from llava_ft.data.anyres import AnyresGeometry
from llava_ft.export.hf_llava import _ties_embeddings, hf_projector_state, hf_vision_tower

NEXT, ONEVISION = "hf-llava-next", "hf-llava-onevision"
MODEL_CLASSES = {NEXT: LlavaNextForConditionalGeneration, ONEVISION: LlavaOnevisionForConditionalGeneration}
_IMAGE_PROCESSORS = {NEXT: LlavaNextImageProcessor, ONEVISION: LlavaOnevisionImageProcessor}


def anyres_geometry(model) -> AnyresGeometry:
    """The any-resolution geometry of a llava_ft model; a fixed-resolution model is a ValueError."""
    rule = getattr(model, "image_tokens", None)
    if not isinstance(rule, AnyresGeometry):
        raise ValueError(
            "the model sees one fixed-size view per image (no model.vision.anyres): export it as hf-llava"
        )
    return rule


def max_tiles(geometry: AnyresGeometry) -> int:
    """Most tiles of any canvas: OneVision's `anyres_max_N` at this N never shrinks an image's features."""
    return max(geometry.tiles_of(p) for p in geometry.pinpoints)


def build_llava_next(model, image_token_index: int, fmt: str):
    """transformers' LlavaNext (or LlavaOnevision) model holding llava_ft's merged weights (the LLM already
    resized for `image_token_index`)."""
    geometry = anyres_geometry(model)
    tower = model.vision_tower
    vision_config, vision_state = hf_vision_tower(tower)
    projector_state = hf_projector_state(model.projector)
    if "image_newline" not in projector_state:
        raise ValueError("the projector has no image_newline: the model does not tile images as LLaVA-NeXT")
    newline = projector_state.pop("image_newline")
    llm = model.llm
    tied = _ties_embeddings(llm)
    text_config = copy.deepcopy(llm.config)
    text_config.tie_word_embeddings = tied
    common = {
        "text_config": text_config,
        "vision_config": vision_config,
        "image_token_index": image_token_index,
        "projector_hidden_act": "gelu",  # nn.GELU (erf), as llava_ft's projector
        "vision_feature_layer": tower.cfg.feature_layer,
        # "default" drops CLIP's CLS as llava_ft's tower does; "full" keeps every token of SigLIP's.
        "vision_feature_select_strategy": tower.select_strategy,
        "multimodal_projector_bias": True,
        "tie_word_embeddings": tied,
        "image_grid_pinpoints": [list(p) for p in geometry.pinpoints],
    }
    if fmt == NEXT:
        config = LlavaNextConfig(**common, image_seq_length=geometry.patch_grid**2)
    elif fmt == ONEVISION:
        config = LlavaOnevisionConfig(**common, vision_aspect_ratio=f"anyres_max_{max_tiles(geometry)}")
    else:
        raise ValueError(f"not an any-resolution export format: {fmt!r}")
    # The configs tie whenever the text config ties; an untied LLM must stay untied.
    if config.tie_word_embeddings != tied:
        raise ValueError(
            f"{type(config).__name__} set tie_word_embeddings={config.tie_word_embeddings}, the LLM has {tied}"
        )
    with no_init_weights():
        hf = MODEL_CLASSES[fmt](config)
    state = {f"model.vision_tower.{k}": v for k, v in vision_state.items()}
    state |= {f"model.multi_modal_projector.{k}": v for k, v in projector_state.items()}
    state |= {f"model.language_model.{k}": v for k, v in llm.base_model.state_dict().items()}
    state["model.image_newline"] = newline
    state["lm_head.weight"] = llm.get_output_embeddings().weight
    hf.load_state_dict(state, strict=True)
    hf.generation_config = copy.deepcopy(llm.generation_config)
    return hf.eval()


def image_processor_for(processor, fmt: str):
    """LlavaNext's (or LlavaOnevision's) image processor reproducing llava_ft's any-res processor: the base view
    squashed to the tile size, then the image resized into its canvas, padded black and cut into tiles (use the
    PIL backend for exact pixels)."""
    if not processor.matches_llava_next:
        raise ValueError(
            f"the base view is made with image_aspect {processor.base_aspect}; {fmt}'s processor squashes the image "
            "(image_aspect resize)"
        )
    geometry: AnyresGeometry = processor.geometry
    tile = geometry.tile
    return _IMAGE_PROCESSORS[fmt](
        size={"height": tile, "width": tile},
        # The tile side: LlavaNext's processor cuts tiles of crop_size when one is set (its default is 224).
        crop_size={"height": tile, "width": tile},
        do_center_crop=False,
        image_grid_pinpoints=[list(p) for p in geometry.pinpoints],
        image_mean=list(processor.mean),
        image_std=list(processor.std),
        resample=3,  # bicubic
        do_convert_rgb=True,
        do_pad=True,
    )


def processor_for(model, hf_config, tokenizer: PreTrainedTokenizerBase, fmt: str):
    """The export's processor: tokenizer with `<image>`, image processor and chat template, expanding each
    `<image>` to as many tokens as llava_ft gives that image."""
    image_processor = image_processor_for(model.vision_tower.processor, fmt)
    strategy = hf_config.vision_feature_select_strategy
    # The processors count the tower's extra tokens (CLS) in the base view, then drop one per "default".
    extra = 1 if strategy == "default" else 0
    if fmt == NEXT:
        return LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=hf_config.vision_config.patch_size,
            vision_feature_select_strategy=strategy,
            chat_template=tokenizer.chat_template,
            image_token=IMAGE_TOKEN,
            num_additional_image_tokens=extra,
        )
    # OneVision's processor requires a video processor; llava_ft never trains on video, so it only matches the
    # images' size and normalisation.
    video_processor = LlavaOnevisionVideoProcessor(
        size=dict(image_processor.size),
        image_mean=list(image_processor.image_mean),
        image_std=list(image_processor.image_std),
    )
    return LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=anyres_geometry(model).patch_grid ** 2 + extra,
        vision_feature_select_strategy=strategy,
        chat_template=tokenizer.chat_template,
        image_token=IMAGE_TOKEN,
        vision_aspect_ratio=hf_config.vision_aspect_ratio,
    )


def write_llava_next(
    model,
    tokenizer: PreTrainedTokenizerBase,
    generation: GenerationConfig,
    folder: Path,
    dtype: torch.dtype,
    fmt: str,
) -> list[str]:
    """Save the LlavaNext / LlavaOnevision model and its processor; returns notes on using them."""
    hf = build_llava_next(model, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), fmt).to(dtype)
    hf.generation_config = generation
    hf.save_pretrained(folder)
    processor_for(model, hf.config, tokenizer, fmt).save_pretrained(folder)
    if fmt == NEXT:
        return ['llava_ft\'s pixels: AutoProcessor.from_pretrained(folder, backend="pil")']
    return [
        'llava_ft\'s pixels: processor.image_processor = AutoImageProcessor.from_pretrained(folder, backend="pil")'
        " (the video processor has no PIL backend)",
        "several images in one prompt: pass them as a flat list, processor(images=[a, b], text=...), to tile "
        "each as llava_ft does; a nested list or apply_chat_template(tokenize=True) uses OneVision's "
        "multi-image mode (base view only)",
    ]
