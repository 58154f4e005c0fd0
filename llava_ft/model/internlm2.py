"""InternLM2 -> Llama conversion, so InternLM2 checkpoints load without their remote code.

InternLM2 is Llama with different key names and one fused, *grouped* qkv projection: `wqkv` rows are laid out
as (num_key_value_heads, q_per_kv + 2, head_dim), i.e. each kv head's query heads, then its key, then its value.
Query head `h * q_per_kv + g` belongs to kv head `h`, which is also Llama's GQA order (repeat_kv), so splitting
the groups is all it takes. The upstream config class defaults are mirrored for keys a config.json leaves out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig

# Upstream InternLM2Config.__init__ defaults (configuration_internlm2.py).
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 103168,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "bias": True,
    "rope_theta": 10000.0,
}

# InternLM2 name -> Llama name, for everything except the fused wqkv.
_RENAMES: list[tuple[str, str]] = [
    (r"^model\.tok_embeddings\.weight$", "model.embed_tokens.weight"),
    (r"^model\.norm\.weight$", "model.norm.weight"),
    (r"^output\.weight$", "lm_head.weight"),
    (r"^model\.layers\.(\d+)\.attention\.wo\.(weight|bias)$", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"^model\.layers\.(\d+)\.feed_forward\.w1\.weight$", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"^model\.layers\.(\d+)\.feed_forward\.w3\.weight$", r"model.layers.\1.mlp.up_proj.weight"),
    (r"^model\.layers\.(\d+)\.feed_forward\.w2\.weight$", r"model.layers.\1.mlp.down_proj.weight"),
    (r"^model\.layers\.(\d+)\.attention_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^model\.layers\.(\d+)\.ffn_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
]
_WQKV = re.compile(r"^model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)$")


def _get(cfg: dict[str, Any], key: str) -> Any:
    return cfg.get(key, _DEFAULTS.get(key))


def _rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    theta = float(_get(cfg, "rope_theta"))
    scaling = cfg.get("rope_scaling")
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind not in ("linear", "dynamic"):
        # Upstream accepts only these two; anything else would silently mean different positions.
        raise ValueError(f"InternLM2 rope_scaling type must be 'linear' or 'dynamic', got {scaling!r}")
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or factor < 1.0:
        raise ValueError(f"InternLM2 rope_scaling factor must be a number >= 1, got {scaling!r}")
    # transformers' "linear" divides positions by factor and "dynamic" rescales the base exactly like
    # InternLM2's Linear/DynamicNTKScalingRotaryEmbedding (same formula, seq_len = max position + 1).
    return {"rope_type": kind, "factor": float(factor), "rope_theta": theta}


def internlm2_config_to_llama(cfg: dict[str, Any]) -> LlamaConfig:
    """The LlamaConfig that computes what InternLM2 config.json `cfg` describes."""
    if cfg.get("model_type") != "internlm2":
        raise ValueError(f"not an InternLM2 config: model_type={cfg.get('model_type')!r}")
    if _get(cfg, "hidden_act") != "silu":
        raise ValueError(f"InternLM2 hidden_act {_get(cfg, 'hidden_act')!r} is not supported (only 'silu')")
    heads = _get(cfg, "num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    return LlamaConfig(
        vocab_size=_get(cfg, "vocab_size"),
        hidden_size=_get(cfg, "hidden_size"),
        intermediate_size=_get(cfg, "intermediate_size"),
        num_hidden_layers=_get(cfg, "num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_act="silu",
        max_position_embeddings=_get(cfg, "max_position_embeddings"),
        initializer_range=_get(cfg, "initializer_range"),
        rms_norm_eps=_get(cfg, "rms_norm_eps"),
        pad_token_id=_get(cfg, "pad_token_id"),
        bos_token_id=_get(cfg, "bos_token_id"),
        eos_token_id=_get(cfg, "eos_token_id"),
        tie_word_embeddings=_get(cfg, "tie_word_embeddings"),
        rope_parameters=_rope_parameters(cfg),
        # InternLM2's `bias` puts biases on wqkv and wo only (its MLP never has one): exactly Llama's
        # attention_bias (q/k/v/o), with mlp_bias off.
        attention_bias=bool(_get(cfg, "bias")),
        mlp_bias=False,
        architectures=["LlamaForCausalLM"],
    )


def _split_wqkv(t: torch.Tensor, heads: int, kv_heads: int, where: str) -> tuple[torch.Tensor, ...]:
    """Grouped wqkv weight (rows, hidden) or bias (rows,) -> q, k, v in Llama's layout."""
    q_per_kv = heads // kv_heads
    rows = t.shape[0]
    if rows % (kv_heads * (q_per_kv + 2)):
        raise ValueError(f"{where}: {rows} rows do not split into {kv_heads} groups of {q_per_kv}+2 heads")
    head_dim = rows // (kv_heads * (q_per_kv + 2))
    grouped = t.reshape(kv_heads, q_per_kv + 2, head_dim, *t.shape[1:])
    q = grouped[:, :q_per_kv].reshape(heads * head_dim, *t.shape[1:])
    k = grouped[:, q_per_kv].reshape(kv_heads * head_dim, *t.shape[1:])
    v = grouped[:, q_per_kv + 1].reshape(kv_heads * head_dim, *t.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


def internlm2_state_dict_to_llama(
    sd: dict[str, torch.Tensor], cfg: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """Rename InternLM2 keys to Llama's and split the grouped wqkv. Unknown keys raise (nothing is dropped)."""
    heads = _get(cfg, "num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        if m := _WQKV.match(key):
            layer, kind = m.groups()
            q, k, v = _split_wqkv(tensor, heads, kv_heads, key)
            for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"model.layers.{layer}.self_attn.{name}.{kind}"] = part
            continue
        for pattern, repl in _RENAMES:
            if re.match(pattern, key):
                out[re.sub(pattern, repl, key)] = tensor
                break
        else:
            raise ValueError(f"InternLM2 checkpoint key {key!r} has no Llama equivalent")
    return out


def _checkpoint_files(folder: Path) -> tuple[list[Path], set[str] | None]:
    """Weight files to read, and the keys a shard index promises (None without an index)."""
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            for name in sorted(set(weight_map.values())):
                if not (folder / name).is_file():
                    raise FileNotFoundError(f"{folder / index}: lists shard {name}, which is missing")
            return [folder / name for name in sorted(set(weight_map.values()))], set(weight_map)
        if (folder / single).is_file():
            return [folder / single], None
    raise FileNotFoundError(f"{folder}: no model.safetensors, pytorch_model.bin or shard index found")


def read_checkpoint(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a local checkpoint: model.safetensors, sharded safetensors (index), pytorch_model.bin
    or sharded .bin (index). .bin files are read with weights_only=True (no pickled code runs)."""
    files, promised = _checkpoint_files(Path(folder))
    sd: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            part = load_file(path)
        else:
            part = torch.load(path, map_location="cpu", weights_only=True)
        if dup := sd.keys() & part.keys():
            raise ValueError(f"{path}: keys also present in another shard: {sorted(dup)[:5]}")
        sd.update(part)
    if promised is not None and promised != sd.keys():
        raise ValueError(
            f"{folder}: shard index and shards disagree; only in the index: {sorted(promised - sd.keys())[:5]}, "
            f"only in the shards: {sorted(sd.keys() - promised)[:5]}"
        )
    return sd
