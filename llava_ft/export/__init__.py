"""Export a stage output as standard transformers folders, with every LoRA adapter merged.

- "hf-llava" (hf_llava.py): a `LlavaForConditionalGeneration` folder with its `LlavaProcessor`, loadable with
  no custom code. "hf-llava-next" / "hf-llava-onevision" (hf_llava_next.py): an any-resolution model as
  `LlavaNextForConditionalGeneration` / `LlavaOnevisionForConditionalGeneration` with its processor.
  "merged-llm" (merged_llm.py): the merged causal LM alone, for AutoModelForCausalLM.
- merge.py loads and merges (QLoRA runs into the base loaded unquantized); tokenizer.py gives the tokenizer,
  chat template and generation config; verify.py (verify_anyres.py for the any-resolution formats) reloads the
  folder and compares it with llava_ft's model.
The folder is written beside the destination and renamed into place only after it has passed the checks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from llava_ft.export.hf_llava import hf_vision_tower, resize_for_token, write_hf_llava
from llava_ft.export.hf_llava_next import write_llava_next
from llava_ft.export.merge import load_merged, merge_adapters
from llava_ft.export.merged_llm import write_merged_llm
from llava_ft.export.tokenizer import (
    CONTENT_AS_TEXT,
    add_image_token,
    chat_template_for,
    generation_config,
    hf_tokenizer,
    processor_chat_template,
)
from llava_ft.export.verify import dummy_inputs, llava_ft_logits, max_diff, verify_export
from llava_ft.export.verify_anyres import anyres_probe, verify_anyres_export
from llava_ft.export_formats import ANYRES_FORMATS, IMAGE_FORMATS, check_export_format
from llava_ft.exported import EXPORT_INFO, export_info
from llava_ft.files import atomic_dir, check_replaceable_dir, sweep_leftovers
from llava_ft.folders import EXPORT_DTYPES, EXPORT_FORMATS
from llava_ft.stage import read_stage_config

__all__ = [
    "CONTENT_AS_TEXT",
    "DTYPES",
    "FORMATS",
    "ExportResult",
    "chat_template_for",
    "export_checkpoint",
    "generation_config",
    "hf_tokenizer",
    "hf_vision_tower",
    "load_merged",
    "merge_adapters",
]

log = logging.getLogger("llava_ft")

Format = Literal["hf-llava", "hf-llava-next", "hf-llava-onevision", "merged-llm"]
FORMATS: tuple[str, ...] = EXPORT_FORMATS
DTYPES: tuple[str, ...] = EXPORT_DTYPES
# The name tests/data/test_sources.py imports.
_CONTENT_AS_TEXT = CONTENT_AS_TEXT


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


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    fmt: Format = "hf-llava",
    dtype: str = "float32",
    verify: bool = True,
    overwrite: bool = False,
    overrides: dict[str, str | None] | None = None,
) -> ExportResult:
    """Merge a stage output's adapters and write `fmt` to `output` (atomically; verified unless verify=False).
    `overrides`: base model folders at other paths ("model.llm", "model.vision.model"), as `load_stage` takes."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {list(FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {list(DTYPES)}")
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output}: already exists (pass --overwrite to replace it)")

    check_replaceable_dir(output)  # a file as --output fails here, before the merge
    sweep_leftovers(output.parent)  # a killed export's copies, before this one needs the space
    check_export_format(checkpoint, read_stage_config(checkpoint).model, fmt)
    _, tokenizer, template, model = load_merged(checkpoint, overrides=overrides)
    result = ExportResult(output=output, format=fmt)
    if fmt in ANYRES_FORMATS:
        # An image tiled to several tiles, its token count from its size.
        probe = anyres_probe(model, tokenizer, template)
        logits = probe.logits
    else:
        ids, pixels = dummy_inputs(model, tokenizer, template, with_image=fmt == "hf-llava")

        def logits(m):
            return llava_ft_logits(m, ids, pixels)

    before = logits(model) if verify else None
    merged = merge_adapters(model)
    result.notes.append(f"merged adapters: {merged or 'none'}")
    if verify:
        result.merge_max_diff = max_diff(before, logits(model), "adapter merge")
    torch_dtype = getattr(torch, dtype)
    if torch_dtype != torch.float32:
        # The checks compare with the weights as saved: rounded to the export dtype, computed in fp32.
        # Parameters only: buffers such as RoPE's inv_freq are not saved and are rebuilt in fp32 on load.
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch_dtype))
    reference = logits(model) if verify else None

    hf_tok = hf_tokenizer(tokenizer)
    # Training pads on the right (labels); batched generation with the export needs left padding. Only
    # init_kwargs are written to tokenizer_config.json.
    hf_tok.padding_side = hf_tok.init_kwargs["padding_side"] = "left"
    hf_tok.chat_template = chat_template_for(template, tokenizer)
    if fmt in IMAGE_FORMATS:
        hf_tok.chat_template = processor_chat_template(hf_tok.chat_template, hf_tok, template)
    suppress: list[int] = []
    info = export_info(fmt, template, model.llm.get_input_embeddings().weight.shape[0])
    if fmt in IMAGE_FORMATS:
        result.image_token_index = add_image_token(hf_tok)
        suppress = [result.image_token_index]
        resize_for_token(model.llm, result.image_token_index)
    generation = generation_config(model.llm, tokenizer, template, suppress)

    def write(folder: Path) -> None:
        if fmt == "hf-llava":
            write_hf_llava(model, hf_tok, generation, folder, torch_dtype)
        elif fmt in ANYRES_FORMATS:
            result.notes.extend(write_llava_next(model, hf_tok, generation, folder, torch_dtype, fmt))
        else:
            write_merged_llm(model.llm, hf_tok, generation, folder, torch_dtype)
        # What llava_ft needs to open the export as it trained: template, stop words, vocabulary.
        (folder / EXPORT_INFO).write_text(json.dumps(info, indent=2))
        if verify and fmt in ANYRES_FORMATS:
            result.export_max_diff, notes = verify_anyres_export(
                folder,
                fmt,
                reference,
                probe,
                tokenizer,
                result.image_token_index,
                model.vision_tower.processor,
            )
            result.notes.extend(notes)
        elif verify:
            image_processor = model.vision_tower.processor if fmt == "hf-llava" else None
            result.export_max_diff, notes = verify_export(
                folder, fmt, reference, ids, pixels, tokenizer, result.image_token_index, image_processor
            )
            result.notes.extend(notes)

    atomic_dir(output, write)
    log.info("exported %s (%s) to %s", checkpoint, fmt, output)
    return result
