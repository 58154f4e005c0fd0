"""Load a causal LM from a local folder: any transformers causal LM, and InternLM2 without its remote code
(converted to LlamaForCausalLM in memory). Optional 4-bit NF4 through bitsandbytes.

Nothing here downloads or executes code from the folder: weights come from safetensors or
`torch.load(weights_only=True)`, and `trust_remote_code` is never set.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    GenerationConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from llava_ft.data.tokenizer import is_internlm2, read_json
from llava_ft.errors import InputError, remote_code_refusal
from llava_ft.model.internlm2 import internlm2_config_to_llama, internlm2_state_dict_to_llama, read_checkpoint

logger = logging.getLogger("llava_ft")


def nf4_config(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """QLoRA's 4-bit setting: NF4, double quantization, matmuls in `compute_dtype`."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )


def _check_loading_info(info: dict[str, Any], folder: Path) -> None:
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise ValueError(
            f"{folder}: checkpoint does not fit the model: missing {sorted(info['missing_keys'])[:8]}, "
            f"mismatched {sorted(info.get('mismatched_keys') or [])[:8]}"
        )
    if info.get("unexpected_keys"):
        logger.warning(
            "%s: %d checkpoint tensors not used by the model: %s",
            folder,
            len(info["unexpected_keys"]),
            sorted(info["unexpected_keys"])[:8],
        )


def load_llm(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    load_in_4bit: bool = False,
    attn_implementation: str | None = None,
    device_map: Any = None,
) -> PreTrainedModel:
    """Causal LM from a local folder. InternLM2 folders become an equivalent LlamaForCausalLM; anything else
    goes through AutoModelForCausalLM without remote code. Returned in eval mode, as from_pretrained does."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json, not a model folder")
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": device_map, "output_loading_info": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        kwargs["quantization_config"] = nf4_config(dtype)
    try:
        model, info, source = _load(folder, kwargs)
    except pickle.UnpicklingError:
        raise InputError(
            f"{folder}: its pickled weight file (*.bin) holds more than tensors and is refused, since unpickling "
            "it can run code; convert it once where you trust it: load the model and "
            "save_pretrained(folder, safe_serialization=True)"
        ) from None
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        # transformers' own message advises trust_remote_code, an option llava-ft does not offer.
        raise remote_code_refusal(folder, "config.json") from None
    _check_loading_info(info, folder)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "loaded LLM %s from %s: dtype=%s, 4-bit=%s, attn=%s, %.2fM parameters%s",
        source,
        folder,
        dtype,
        load_in_4bit,
        model.config._attn_implementation,
        n_params / 1e6,
        " (4-bit weights count packed)" if load_in_4bit else "",
    )
    return model


def _load(folder: Path, kwargs: dict[str, Any]) -> tuple[PreTrainedModel, dict[str, Any], str]:
    if is_internlm2(folder):
        raw = read_json(folder / "config.json")
        config = internlm2_config_to_llama(raw)
        state_dict = internlm2_state_dict_to_llama(read_checkpoint(folder), raw)
        # from_pretrained with an in-memory state dict takes the same route as a folder, bitsandbytes included.
        model, info = LlamaForCausalLM.from_pretrained(None, config=config, state_dict=state_dict, **kwargs)
        del state_dict
        model.config.name_or_path = str(folder)
        if (folder / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
        source = "InternLM2 -> LlamaForCausalLM"
    else:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False, **kwargs
        )
        source = type(model).__name__
    return model, info, source
