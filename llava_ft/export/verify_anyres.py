"""Checks an hf-llava-next or hf-llava-onevision export against llava_ft on an image tiled to several tiles:
reloaded the standard way, its processor gives training's token ids (each image's token count from its size),
llava_ft's pixels for every view, and the model llava_ft's logits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, PreTrainedTokenizerBase

from llava_ft.constants import IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava_ft.data.anyres import AnyresGeometry
from llava_ft.data.conversation import Conversation, Message
from llava_ft.data.templates import ChatTemplate
from llava_ft.data.tokenize import Encoder
from llava_ft.export.hf_llava_next import MODEL_CLASSES, NEXT, ONEVISION, anyres_geometry
from llava_ft.export.verify import (
    PROBE_TEXTS,
    VERIFY_IMAGE_SIZES,
    _check_loading,
    check_token_ids,
    max_diff,
    processor_id_notes,
)

_QUESTION = "Describe this in  detail.\nPlease!"


@dataclass
class AnyresProbe:
    """One prompt with one image, as llava_ft's model takes it."""

    image: Image.Image
    ids: torch.Tensor
    """[1, length] with each image's placeholders (IMAGE_TOKEN_INDEX) expanded to its token count."""
    pixels: torch.Tensor
    """[views, 3, tile, tile]: the base view, then the tiles row by row."""
    image_sizes: torch.Tensor
    """[1, 2]: the image's (height, width)."""

    @torch.no_grad()
    def logits(self, model) -> torch.Tensor:
        """llava_ft's logits for the prompt (fp32)."""
        embeds = model.embed(self.ids, self.pixels, image_sizes=self.image_sizes)
        return model.llm(
            inputs_embeds=embeds, attention_mask=torch.ones_like(self.ids), use_cache=False
        ).logits.float()


def probe_size(geometry: AnyresGeometry, most_tiles: int = 4) -> tuple[int, int]:
    """(height, width) of an image tiled to several tiles (the most up to `most_tiles`: a check on a real model
    runs on CPU), preferring one whose features unpadding trims (an aspect ratio other than its canvas's)."""
    candidates = []
    for height, width in geometry.pinpoints:
        for size in ((height - height // 5, width), (height, width - width // 5), (height, width)):
            rows, cols = geometry.grid_shape(*size)
            full = (rows * geometry.patch_grid, cols * geometry.patch_grid)
            trims = geometry.unpadded_shape(*size) != full
            candidates.append((min(rows * cols, most_tiles), trims, -rows * cols, size))
    return max(candidates)[-1]


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def anyres_probe(model, tokenizer: PreTrainedTokenizerBase, template: ChatTemplate) -> AnyresProbe:
    """The probe prompt: one image of `probe_size`, then a question, as training tokenizes it."""
    geometry = anyres_geometry(model)
    height, width = probe_size(geometry)
    image = random_image(height, width)
    conv = Conversation(messages=[Message("user", f"{IMAGE_TOKEN}\n{_QUESTION}")], images=["probe"])
    ids = Encoder(tokenizer, template, max_length=None, image_tokens=geometry).encode_prompt(
        conv, [(height, width)]
    )
    return AnyresProbe(
        image=image,
        ids=torch.tensor([ids]),
        pixels=model.vision_tower.processor(image),
        image_sizes=torch.tensor([[height, width]]),
    )


def verify_anyres_export(
    folder: Path,
    fmt: str,
    reference: torch.Tensor,
    probe: AnyresProbe,
    tokenizer: PreTrainedTokenizerBase,
    image_token_index: int,
    image_processor,
) -> tuple[float, list[str]]:
    """Reload `folder` the standard way and compare tokens, pixels and logits with llava_ft's on the probe.
    Returns the largest logit difference and notes on tolerated differences."""
    if fmt not in (NEXT, ONEVISION):
        raise ValueError(f"not an any-resolution export format: {fmt!r}")
    exported_tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    check_token_ids(tokenizer, exported_tok, PROBE_TEXTS)
    rendered = exported_tok.apply_chat_template(
        [{"role": "user", "content": _QUESTION}], tokenize=False, add_generation_prompt=True
    )
    check_token_ids(tokenizer, exported_tok, [rendered])
    hf_ids = probe.ids.masked_fill(probe.ids == IMAGE_TOKEN_INDEX, image_token_index)
    notes = verify_anyres_processor(
        folder, fmt, probe, hf_ids[0].tolist(), image_processor, image_token_index
    )
    hf, info = MODEL_CLASSES[fmt].from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True, local_files_only=True
    )
    _check_loading(info, folder)
    with torch.no_grad():
        logits = hf(
            input_ids=hf_ids,
            pixel_values=probe.pixels,
            image_sizes=probe.image_sizes,
            attention_mask=torch.ones_like(hf_ids),
            use_cache=False,
        ).logits.float()
    return max_diff(reference, logits, f"{folder} reloaded"), notes


def load_processor(folder: Path, fmt: str):
    """The export's processor with the PIL image backend, whose resizing is llava_ft's (torchvision's bicubic
    differs by about one grey level). OneVision's processor also holds a video processor, which has no PIL
    backend: its image processor is swapped for the PIL one."""
    if fmt == NEXT:
        return AutoProcessor.from_pretrained(folder, local_files_only=True, backend="pil")
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    processor.image_processor = AutoImageProcessor.from_pretrained(
        folder, local_files_only=True, backend="pil"
    )
    return processor


def verify_anyres_processor(
    folder: Path, fmt: str, probe: AnyresProbe, want: list[int], image_processor, image_id: int
) -> list[str]:
    """The reloaded processor, used both standard ways on the probe, gives training's ids; on images of other
    sizes it gives llava_ft's views and token counts. Returns notes on tolerated differences."""
    processor = load_processor(folder, fmt)
    content = [{"type": "image", "image": probe.image}, {"type": "text", "text": _QUESTION}]
    messages = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    paths = {
        "processor(text=apply_chat_template(...))": processor(images=probe.image, text=text)["input_ids"][0],
        "apply_chat_template(tokenize=True)": processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"][0],
    }
    notes = processor_id_notes(folder, paths, want, image_id)
    geometry: AnyresGeometry = image_processor.geometry
    sizes = [(h, w) for w, h in VERIFY_IMAGE_SIZES] + [probe_size(geometry)]
    tile = geometry.tile
    sizes += [(tile * 3 + 7, tile - 5), (tile - 3, tile * 2 + 11), (tile * 2 + 1, tile * 2 - 1)]
    for seed, (height, width) in enumerate(sizes):
        image = random_image(height, width, seed)
        out = processor(images=image, text=IMAGE_TOKEN, return_tensors="pt")
        count = int((out["input_ids"][0] == image_id).sum())
        if count != geometry.num_tokens(height, width):
            raise ValueError(
                f"{folder}: the processor gives a {width}x{height} image {count} tokens, llava_ft "
                f"{geometry.num_tokens(height, width)}"
            )
        if out["image_sizes"][0].tolist() != [height, width]:
            raise ValueError(
                f"{folder}: image_sizes {out['image_sizes'][0].tolist()} for a {width}x{height} image"
            )
        want_pixels = image_processor(image)
        got_pixels = out["pixel_values"][0]
        if got_pixels.shape != want_pixels.shape:
            raise ValueError(
                f"{folder}: the image processor cuts a {width}x{height} image into {got_pixels.shape[0]} views, "
                f"llava_ft {want_pixels.shape[0]}"
            )
        diff = float((got_pixels - want_pixels).abs().max())
        if diff > 1e-5:
            raise ValueError(
                f"{folder}: the image processor's pixels for a {width}x{height} image differ from llava_ft's by "
                f"up to {diff:.3g}"
            )
    return notes
