"""Checks an export folder against llava_ft: reloaded the standard way, it has no missing or unexpected
weights, tokenizes as llava_ft's tokenizer, preprocesses images to the same pixels and gives the same logits."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
)

from llava_ft.constants import IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava_ft.data.conversation import Conversation, Message
from llava_ft.data.images import ImageProcessor
from llava_ft.data.templates import ChatTemplate
from llava_ft.data.tokenize import Encoder

log = logging.getLogger("llava_ft")

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
# Odd sizes, wide and tall: where resizing and centring arithmetic could differ by a pixel.
VERIFY_IMAGE_SIZES: tuple[tuple[int, int], ...] = ((37, 23), (23, 37), (61, 40), (33, 35), (50, 50))
_DUMMY_QUESTION = "Describe this in  detail.\nPlease!"


def dummy_inputs(
    model, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate, with_image: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """llava_ft prompt ids (with IMAGE_TOKEN_INDEX placeholders when with_image) and pixel values for the
    logit checks."""
    has_vision = with_image and model.vision_tower is not None
    question = (f"{IMAGE_TOKEN}\n" if has_vision else "") + _DUMMY_QUESTION
    conv = Conversation(messages=[Message("user", question)], images=["dummy"] if has_vision else [])
    rule = getattr(model, "image_tokens", model.num_image_tokens)
    encoder = Encoder(
        tokenizer, template, max_length=None, image_tokens=max(1, rule) if isinstance(rule, int) else rule
    )
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


def max_diff(a: torch.Tensor, b: torch.Tensor, what: str) -> float:
    """Largest |a - b|, raising when above a tolerance relative to a's scale."""
    if a.shape[-1] < b.shape[-1]:  # the export's extra <image> row
        b = b[..., : a.shape[-1]]
    diff = float((a - b).abs().max())
    tol = 1e-4 * max(1.0, float(a.abs().max()))
    if diff > tol:
        raise ValueError(f"{what}: logits differ by up to {diff:.3g} (tolerance {tol:.3g})")
    return diff


def check_token_ids(reference: PreTrainedTokenizerBase, exported: PreTrainedTokenizerBase, texts) -> None:
    for text in texts:
        want = reference(text, add_special_tokens=False)["input_ids"]
        got = exported(text, add_special_tokens=False)["input_ids"]
        if want != got:
            raise ValueError(f"exported tokenizer differs from llava_ft's on {text!r}: {got} vs {want}")


def _check_loading(info: dict, where: Path) -> None:
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise ValueError(f"{where}: reloading the export is not clean: {problems or info['error_msgs']}")


def verify_export(
    folder: Path,
    fmt: str,
    reference: torch.Tensor,
    ids: torch.Tensor,
    pixels: torch.Tensor | None,
    tokenizer: PreTrainedTokenizerBase,
    image_token_index: int | None = None,
    image_processor: ImageProcessor | None = None,
) -> tuple[float, list[str]]:
    """Reload `folder` the standard way and compare tokens, pixels and logits with llava_ft's.
    Returns the largest logit difference and notes on tolerated differences."""
    exported_tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    check_token_ids(tokenizer, exported_tok, PROBE_TEXTS)
    messages = [{"role": "user", "content": _DUMMY_QUESTION}]
    rendered = exported_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    check_token_ids(tokenizer, exported_tok, [rendered])
    notes: list[str] = []
    if fmt == "hf-llava":
        hf_ids = ids.masked_fill(ids == IMAGE_TOKEN_INDEX, image_token_index)
        notes = verify_processor(folder, hf_ids[0].tolist(), image_processor, image_token_index)
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
    return max_diff(reference, logits, f"{folder} reloaded"), notes


def processor_id_notes(
    folder: Path, paths: dict[str, Sequence[int]], want: list[int], image_id: int
) -> list[str]:
    """Each way of using the reloaded processor (`paths`: name -> its input ids) against training's ids `want`:
    a broken export raises; a tolerated difference is logged and returned as a note."""
    notes = []
    for how, got in paths.items():
        got = list(got)
        if got == want:
            continue
        if got[:2] != want[:2] or got.count(image_id) != want.count(image_id):
            # BOS twice or missing, or image features that would not fit the placeholders: a broken export.
            raise ValueError(f"{folder}: the processor's {how} gives ids {got}, training {want}")
        # Elsewhere only tokenization at the <image> boundary can differ: llava_ft tokenizes the text on each
        # side apart, and sentencepiece-style tokenizers then add a "▁" piece there.
        note = f"the processor's {how} tokenizes around <image> unlike training: {got} vs {want}"
        log.warning(note)
        notes.append(note)
    return notes


def verify_processor(
    folder: Path, want: list[int], image_processor: ImageProcessor, image_id: int
) -> list[str]:
    """The reloaded LlavaProcessor, used both standard ways, gives training's prompt ids, and its image
    processor llava_ft's pixels (PIL backend, as open_clip's transform). Returns notes on tolerated
    differences."""
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
    notes = processor_id_notes(folder, paths, want, image_id)
    for image in images:
        got = processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        diff = float((got - image_processor(image)).abs().max())
        if diff > 1e-5:
            raise ValueError(
                f"{folder}: the image processor's pixels for a {image.size[0]}x{image.size[1]} image differ "
                f"from llava_ft's by up to {diff:.3g}"
            )
    return notes
