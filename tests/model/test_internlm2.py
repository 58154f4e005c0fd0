"""InternLM2 loaded without remote code must compute what the published InternLM2 architecture computes.

The reference below is written from the architecture (modeling_internlm2.py upstream), not from the converter:
it reads the raw InternLM2 state dict, unpacks the grouped wqkv by index arithmetic, and runs RMSNorm,
rotate_half RoPE (plain / linear / dynamic NTK), GQA attention and SwiGLU in float64.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from llava_ft.model.internlm2 import internlm2_config_to_llama, internlm2_state_dict_to_llama
from llava_ft.model.llm import load_llm
from llava_ft.testing.tiny_llm import write_tiny_internlm2

SEQ = 40
# Largest |logit difference| per variant, printed at the end of the run (pytest -s) for the report.
MAX_DIFFS: dict[str, float] = {}


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _cos_sin(cfg: dict, head_dim: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    base = float(cfg["rope_theta"])
    pos = torch.arange(seq, dtype=torch.float64)
    scaling = cfg.get("rope_scaling")
    if scaling and scaling["type"] == "linear":
        pos = pos / scaling["factor"]
    if scaling and scaling["type"] == "dynamic" and seq > cfg["max_position_embeddings"]:
        f = scaling["factor"]
        base *= (f * seq / cfg["max_position_embeddings"] - (f - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(pos, inv_freq)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def reference_logits(sd: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor, grouped: bool = True):
    """InternLM2 forward for one sequence `ids` (T,). grouped=False unpacks wqkv as plain [q; k; v] (wrong)."""
    sd = {k: v.double() for k, v in sd.items()}
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg["hidden_size"] // heads
    per_kv = heads // kv_heads
    eps = cfg["rms_norm_eps"]
    seq = ids.shape[0]
    cos, sin = _cos_sin(cfg, head_dim, seq)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()

    def rows(start_head: int) -> slice:
        return slice(start_head * head_dim, (start_head + 1) * head_dim)

    x = sd["model.tok_embeddings.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms_norm(x, sd[p + "attention_norm.weight"], eps)
        qkv = h @ sd[p + "attention.wqkv.weight"].T
        if cfg["bias"]:
            qkv = qkv + sd[p + "attention.wqkv.bias"]
        outs = []
        for head in range(heads):
            j, g = divmod(head, per_kv)  # query head `head` is the g-th query of kv group j
            if grouped:
                q = qkv[:, rows(j * (per_kv + 2) + g)]
                k = qkv[:, rows(j * (per_kv + 2) + per_kv)]
                v = qkv[:, rows(j * (per_kv + 2) + per_kv + 1)]
            else:
                q, k, v = qkv[:, rows(head)], qkv[:, rows(heads + j)], qkv[:, rows(heads + kv_heads + j)]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            scores = (q @ k.T) / math.sqrt(head_dim)
            scores = scores.masked_fill(~causal, float("-inf"))
            outs.append(torch.softmax(scores, dim=-1) @ v)
        attn = torch.cat(outs, dim=-1) @ sd[p + "attention.wo.weight"].T
        if cfg["bias"]:
            attn = attn + sd[p + "attention.wo.bias"]
        x = x + attn
        h = _rms_norm(x, sd[p + "ffn_norm.weight"], eps)
        w1, w2, w3 = (sd[p + f"feed_forward.w{n}.weight"] for n in (1, 2, 3))
        x = x + (F.silu(h @ w1.T) * (h @ w3.T)) @ w2.T
    x = _rms_norm(x, sd["model.norm.weight"], eps)
    return x @ sd["output.weight"].T


def _raw_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor in the folder's weight files, read directly (independent of the loader's reader)."""
    sd: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        sd.update(load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True))
    return sd


def _compare(folder: Path, name: str, **load_kwargs):
    """(model, its logits, reference logits) on a random sequence of SEQ tokens."""
    cfg = json.loads((folder / "config.json").read_text())
    ids = torch.randint(0, cfg["vocab_size"], (SEQ,), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(_raw_state_dict(folder), cfg, ids)
    model = load_llm(folder, **load_kwargs)
    with torch.no_grad():
        got = model(ids[None], use_cache=False).logits[0].double()
    MAX_DIFFS[name] = (got - ref).abs().max().item()
    return model, got, ref


VARIANTS = {
    "gqa": {},
    "mha": {"num_kv_heads": 4},
    "mqa": {"num_kv_heads": 1},
    "bias": {"bias": True},
    "rope_linear": {"rope_scaling": {"type": "linear", "factor": 4.0}},
    # max_position_embeddings < SEQ so the base really is rescaled
    "rope_dynamic": {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 16},
    "sharded_safetensors": {"shards": 3, "bias": True},
    "bin": {"fmt": "bin"},
    "sharded_bin": {"fmt": "bin", "shards": 2},
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_reference(tmp_path: Path, name: str) -> None:
    folder = write_tiny_internlm2(tmp_path / name, rope_theta=10000.0, **VARIANTS[name])
    _, got, ref = _compare(folder, name)
    assert ref.abs().max() > 1.0  # logits on a scale where a 1e-4 tolerance means something
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_eager_attention_matches_reference(tmp_path: Path) -> None:
    folder = write_tiny_internlm2(tmp_path / "m", bias=True)
    _, got, ref = _compare(folder, "gqa_bias_eager", attn_implementation="eager")
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_reference_is_sensitive_to_what_the_loader_must_get_right(tmp_path: Path) -> None:
    """The cases above could not pass by accident: the wqkv grouping and the RoPE scaling change the logits."""
    dynamic = {"type": "dynamic", "factor": 2.0}
    folder = write_tiny_internlm2(
        tmp_path / "m", rope_theta=10000.0, rope_scaling=dynamic, max_position_embeddings=16
    )
    cfg = json.loads((folder / "config.json").read_text())
    sd = _raw_state_dict(folder)
    ids = torch.arange(SEQ) * 7
    ref = reference_logits(sd, cfg, ids)
    unscaled = reference_logits(sd, {**cfg, "rope_scaling": None}, ids)
    linear = reference_logits(sd, {**cfg, "rope_scaling": {"type": "linear", "factor": 4.0}}, ids)
    assert (reference_logits(sd, cfg, ids, grouped=False) - ref).abs().max() > 0.5
    assert (unscaled - ref).abs().max() > 0.5
    assert (linear - unscaled).abs().max() > 0.5


def test_config_mapping() -> None:
    cfg = {
        "model_type": "internlm2",
        "vocab_size": 92544,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "bias": False,
        "rope_theta": 1000000,
        "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5,
    }
    llama = internlm2_config_to_llama(cfg)
    assert (llama.num_key_value_heads, llama.head_dim, llama.attention_bias, llama.mlp_bias) == (
        8,
        128,
        False,
        False,
    )
    assert llama.rope_parameters == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0}
    assert llama.tie_word_embeddings is False
    # Upstream's config class defaults `bias` to True and rope_theta to 10000 when config.json omits them.
    minimal = internlm2_config_to_llama(
        {k: v for k, v in cfg.items() if k not in ("bias", "rope_theta", "rope_scaling")}
    )
    assert minimal.attention_bias is True
    assert minimal.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling type"),
        ({"rope_scaling": {"type": "linear", "factor": 0.5}}, "factor"),
        ({"num_key_value_heads": 3}, "multiple"),
        ({"model_type": "llama"}, "not an InternLM2 config"),
    ],
)
def test_bad_config_is_rejected(change: dict, message: str) -> None:
    cfg = {"model_type": "internlm2", "num_attention_heads": 4, "num_key_value_heads": 2, **change}
    with pytest.raises(ValueError, match=message):
        internlm2_config_to_llama(cfg)


def test_unknown_key_is_an_error_not_dropped() -> None:
    cfg = {"model_type": "internlm2", "num_attention_heads": 4, "num_key_value_heads": 2}
    with pytest.raises(ValueError, match="model.layers.0.attention.rotary_emb.inv_freq"):
        internlm2_state_dict_to_llama({"model.layers.0.attention.rotary_emb.inv_freq": torch.zeros(4)}, cfg)


def test_shard_index_naming_a_missing_file_is_an_error(tmp_path: Path) -> None:
    folder = write_tiny_internlm2(tmp_path / "m", shards=2)
    next(folder.glob("model-00002-of-00002.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_llm(folder)


def test_4bit_nf4_on_cpu(tmp_path: Path) -> None:
    import bitsandbytes as bnb

    folder = write_tiny_internlm2(tmp_path / "m", bias=True)
    model, got, ref = _compare(folder, "nf4_4bit", load_in_4bit=True)
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers; lm_head stays dense
    assert model.model.layers[0].self_attn.q_proj.weight.quant_state.quant_type == "nf4"
    corr = torch.corrcoef(torch.stack([got.flatten(), ref.flatten()]))[0, 1].item()
    MAX_DIFFS["nf4_4bit corr"] = corr
    assert corr > 0.9


def teardown_module() -> None:
    for name, value in MAX_DIFFS.items():
        print(f"\n[internlm2] {name}: {value:.3g}", end="")
