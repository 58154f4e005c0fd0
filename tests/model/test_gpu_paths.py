"""The GPU-side choices, checked on CPU: attention and kernel selection, 4-bit loading that keeps the
unquantised parts in the compute dtype, gradient checkpointing that acts in train mode, memory options in
config, and a CPU path that needs none of the GPU packages."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llava_ft.config import ConfigError, load_config
from llava_ft.model import build as build_mod
from llava_ft.model.build import build_model, resolve_attn_implementation
from llava_ft.model.kernels import resolve_liger
from llava_ft.model.llava import LlavaModel
from llava_ft.model.trainability import apply_trainability
from llava_ft.testing.tiny_llava import tiny_config
from llava_ft.train.run import training_arguments

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


def test_attention_choice(monkeypatch) -> None:
    monkeypatch.setattr(build_mod, "flash_attn_available", lambda: False)
    assert resolve_attn_implementation(None, packing=True, on_gpu=False) == "sdpa_packed"
    assert resolve_attn_implementation(None, packing=False, on_gpu=True) == "sdpa"
    assert resolve_attn_implementation(None, packing=True, on_gpu=True) == "flex_attention"
    assert resolve_attn_implementation("eager", packing=True, on_gpu=True) == "eager"
    monkeypatch.setattr(build_mod, "flash_attn_available", lambda: True)
    assert resolve_attn_implementation(None, packing=True, on_gpu=True) == "flash_attention_2"
    assert resolve_attn_implementation(None, packing=False, on_gpu=True) == "flash_attention_2"
    assert resolve_attn_implementation(None, packing=True, on_gpu=False) == "sdpa_packed"


def test_liger_choice(monkeypatch, caplog) -> None:
    from llava_ft.model import kernels

    monkeypatch.setattr(kernels, "liger_installed", lambda: False)
    assert resolve_liger(None, on_gpu=True) is False
    assert resolve_liger(False, on_gpu=True) is False
    with caplog.at_level(logging.WARNING, logger="llava_ft"):
        assert resolve_liger(True, on_gpu=True) is False
    assert "pip install -e .[gpu]" in caplog.text
    monkeypatch.setattr(kernels, "liger_installed", lambda: True)
    assert resolve_liger(None, on_gpu=True) is True
    assert resolve_liger(True, on_gpu=True) is True
    assert resolve_liger(False, on_gpu=True) is False
    assert resolve_liger(None, on_gpu=False) is False
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llava_ft"):
        assert resolve_liger(True, on_gpu=False) is False
    assert "no CUDA GPU" in caplog.text


def test_build_logs_choices_and_uses_plain_path_on_cpu(tiny_root: Path, caplog) -> None:
    cfg = tiny_config(tiny_root, llm_mode="lora", vision_backend=None, llm_kind="llama")
    cfg.data.packing = True
    with caplog.at_level(logging.INFO, logger="llava_ft"):
        _, model = build_model(cfg)
    # Packed rows on CPU: one SDPA call per sample (model/attention.py), else the plain transformers path.
    assert model.loss == "plain" and model.llm.config._attn_implementation == "sdpa_packed"
    assert "attention sdpa_packed, loss plain, liger kernels off" in caplog.text


def test_4bit_keeps_unquantised_parts_in_compute_dtype(tiny_root: Path) -> None:
    """NF4 LLM in bf16: embeddings, lm_head and norms stay bf16 (no fp32 upcast as peft's
    prepare_model_for_kbit_training would do); quantised weights are packed uint8 with bf16 compute;
    after QLoRA trainability, only the LoRA adapters (peft keeps them fp32) and the projector are fp32."""
    import bitsandbytes as bnb

    cfg = tiny_config(tiny_root, llm_mode="qlora", llm_kind="llama")
    cfg.model.dtype = "bfloat16"
    _, model = build_model(cfg)
    llm = model.llm
    assert llm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert llm.get_output_embeddings().weight.dtype == torch.bfloat16
    norms = [m for m in llm.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and all(m.weight.dtype == torch.bfloat16 for m in norms)
    quantised = [m for m in llm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantised) == 2 * 7
    assert all(m.weight.dtype == torch.uint8 and m.compute_dtype == torch.bfloat16 for m in quantised)

    apply_trainability(model, cfg.trainable, cfg.lora)
    fp32 = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    assert fp32 and all(".lora_" in n or n.startswith("projector.") for n in fp32), sorted(fp32)[:5]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == fp32


def _count_layer_calls(model: LlavaModel) -> list[int]:
    calls: list[int] = []
    # Inside the layer (transformers checkpoints `forward`, so the layer's own hooks run once either way), and a
    # pre-hook on its first module: the recompute stops early, once backward has what it needs.
    model.causal_lm().model.layers[1].input_layernorm.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("train_mode", [True, False])
def test_gradient_checkpointing_acts_in_train_mode(train_mode: bool) -> None:
    """Checkpointed layers run again in backward (activations were not kept) in train mode only, as the
    Trainer sets it; from_pretrained's eval mode silently keeps every activation."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    model = LlavaModel(LlamaForCausalLM(config))
    model.requires_grad_(False)
    model.llm.model.layers[1].mlp.down_proj.weight.requires_grad_(True)  # frozen embeddings, as with LoRA
    model.activation_checkpointing_enable({"use_reentrant": False})
    model.train(train_mode)
    calls = _count_layer_calls(model)
    ids = torch.randint(0, 64, (1, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == (2 if train_mode else 1)


def test_memory_options_in_config(tiny_root: Path, tmp_path: Path) -> None:
    qlora = tiny_config(tiny_root, llm_mode="qlora", vision_backend=None, llm_kind="llama")
    qlora.train.output_dir = str(tmp_path)
    args = training_arguments(qlora)
    assert args.activation_checkpointing and args.optim == "adamw_torch" and not args.bf16
    lora = tiny_config(tiny_root, llm_mode="lora", vision_backend=None, llm_kind="llama")
    lora.train.output_dir = str(tmp_path)
    assert not training_arguments(lora).activation_checkpointing
    lora.train.gradient_checkpointing = True
    assert training_arguments(lora).activation_checkpointing

    cfg = load_config(
        None,
        {
            "model.loss": "chunked",
            "model.loss_chunk_size": 256,
            "model.liger": False,
            "train.optim": "paged_adamw_8bit",
        },
    )
    assert (cfg.model.loss, cfg.model.loss_chunk_size, cfg.model.liger) == ("chunked", 256, False)
    assert cfg.train.optim == "paged_adamw_8bit"
    with pytest.raises(ConfigError, match="model.loss"):
        load_config(None, {"model.loss": "fast"})
    with pytest.raises(ConfigError, match="loss_chunk_size"):
        load_config(None, {"model.loss_chunk_size": 0})


BLOCKER = """
import importlib.abc, importlib.util, sys
BLOCKED = ("bitsandbytes", "liger_kernel", "flash_attn", "deepspeed")
def blocked(name):
    return name.split(".")[0] in BLOCKED
class Block(importlib.abc.MetaPathFinder):  # `import x` fails as for a package that is not installed
    def find_spec(self, name, path, target=None):
        if blocked(name):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
_find_spec = importlib.util.find_spec  # availability probes (transformers' is_*_available) see nothing
importlib.util.find_spec = lambda name, package=None: None if blocked(name) else _find_spec(name, package)
"""

NO_GPU_PACKAGES = (
    BLOCKER
    + """
import torch
from llava_ft.model.build import build_model
from llava_ft.testing.tiny_llava import tiny_config
cfg = tiny_config(sys.argv[1], llm_mode="lora", vision_backend=None, llm_kind="llama")
for loss in ("auto", "chunked"):
    cfg.model.loss = loss
    _, model = build_model(cfg)
    ids = torch.randint(0, 100, (2, 8))
    model.train()(input_ids=ids, labels=ids).loss.backward()
print("OK", model.loss, sorted(m for m in sys.modules if blocked(m)))
"""
)


def test_cpu_path_needs_no_gpu_package(tiny_root: Path) -> None:
    tiny_config(tiny_root, llm_mode="lora", vision_backend=None, llm_kind="llama")  # writes the folder
    out = subprocess.run(
        [sys.executable, "-c", NO_GPU_PACKAGES, str(tiny_root)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK chunked []")
