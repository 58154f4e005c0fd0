"""The "hf-llava" format: transformers' LlavaForConditionalGeneration and LlavaProcessor holding llava_ft's
merged weights, tokenizer and image preprocessing, loadable with no custom code."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaProcessor,
    PreTrainedTokenizerBase,
)
from transformers.initialization import no_init_weights

from llava_ft.constants import IMAGE_TOKEN
from llava_ft.export_formats import CROP_UNSUPPORTED
from llava_ft.model.clip_convert import open_clip_to_hf_clip_vision
from llava_ft.model.projector import MLPProjector
from llava_ft.model.siglip_convert import open_clip_to_hf_siglip_vision
from llava_ft.model.vision import HFVisionTower, OpenClipTimmVisionTower, OpenClipVisionTower


def resize_for_token(llm, token_id: int) -> None:
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
    """(config, state dict) of transformers' CLIPVisionModel or SiglipVisionModel for a llava_ft VisionTower."""
    if tower.cfg.pool != 1:
        raise ValueError(
            f"the vision tower average-pools its patch grid (pool={tower.cfg.pool}); transformers' Llava has no "
            "pooling, so hf-llava cannot express it (export --format merged-llm, or train with pool: 1)"
        )
    if isinstance(tower, OpenClipVisionTower):
        return open_clip_to_hf_clip_vision(tower.model, tower.open_clip_cfg)
    if isinstance(tower, OpenClipTimmVisionTower):
        return open_clip_to_hf_siglip_vision(tower.model)
    if isinstance(tower, HFVisionTower):
        return tower.model.config, dict(tower.model.state_dict())
    raise ValueError(f"no transformers equivalent for vision tower {type(tower).__name__}")


def hf_projector_state(projector) -> dict[str, torch.Tensor]:
    if not isinstance(projector, MLPProjector) or projector.depth != 2:
        depth = getattr(projector, "depth", "?")
        raise ValueError(
            f"transformers' Llava projector is Linear-GELU-Linear (mlp2x_gelu); this one has {depth} linear layer(s)"
        )
    return dict(projector.state_dict())


def build_hf_llava(model, image_token_index: int) -> LlavaForConditionalGeneration:
    """transformers' LlavaForConditionalGeneration holding llava_ft's merged weights (the LLM already resized)."""
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
        # "default" drops CLIP's CLS as LLaVA does; "full" keeps every token of a tower without CLS (SigLIP).
        vision_feature_select_strategy=tower.select_strategy,
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


def image_processor_for(tower) -> LlavaImageProcessor:
    """LlavaImageProcessor reproducing llava_ft's ImageProcessor (use the PIL backend for exact pixels)."""
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


def write_hf_llava(
    model,
    tokenizer: PreTrainedTokenizerBase,
    generation: GenerationConfig,
    folder: Path,
    dtype: torch.dtype,
) -> None:
    """Save the Llava model and its processor (tokenizer with `<image>`, image processor, chat template)."""
    llava = build_hf_llava(model, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).to(dtype)
    llava.generation_config = generation
    llava.save_pretrained(folder)
    processor = LlavaProcessor(
        image_processor=image_processor_for(model.vision_tower),
        tokenizer=tokenizer,
        patch_size=llava.config.vision_config.patch_size,
        vision_feature_select_strategy=llava.config.vision_feature_select_strategy,
        chat_template=tokenizer.chat_template,
        image_token=IMAGE_TOKEN,
        # CLS: a "default" tower's patches + 1, less the 1 the strategy drops (with 0 one token too few).
        num_additional_image_tokens=1 if llava.config.vision_feature_select_strategy == "default" else 0,
    )
    processor.save_pretrained(folder)
