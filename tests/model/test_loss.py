"""The GPU loss path (chunked / fused cross-entropy from hidden states) against the reference: transformers'
own causal-LM loss (`LlamaForCausalLM(..., labels=...).loss`), values and gradients, on padded and packed
batches, fully-masked rows, gradient-accumulation normalisation, LoRA and 4-bit LLMs."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from llava_ft.constants import IGNORE_INDEX
from llava_ft.model.llava import LlavaModel
from llava_ft.model.loss import causal_lm_loss, is_plain_linear, resolve_loss_mode, shift_labels

VOCAB = 97


def tiny_llm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa").train()


def padded_batch() -> dict[str, torch.Tensor]:
    """Row 0: prompt masked; row 1: every label masked; row 2: right-padded (mask 0, labels -100)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 13), generator=g)
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX
    labels[1] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    labels[2, 9:] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def packed_batch() -> dict[str, torch.Tensor]:
    """One row of three samples (5, 7, 6 tokens), positions restarting, first label of each sample -100."""
    g = torch.Generator().manual_seed(2)
    lengths = (5, 7, 6)
    ids = torch.randint(0, VOCAB, (1, sum(lengths)), generator=g)
    labels = ids.clone()
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    labels[0, position_ids[0] == 0] = IGNORE_INDEX
    labels[0, 6:8] = IGNORE_INDEX  # a masked prompt inside the second sample
    return {"input_ids": ids, "position_ids": position_ids, "labels": labels}


def reference_loss(llm: nn.Module, batch: dict, **kwargs) -> torch.Tensor:
    return llm(**batch, use_cache=False, **kwargs).loss


def our_loss(llm: LlamaForCausalLM, batch: dict, **kwargs) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = llm.model(**inputs, use_cache=False).last_hidden_state
    return causal_lm_loss(hidden, llm.lm_head, batch["labels"], **kwargs)


def grads(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got: dict, want: dict, atol: float = 1e-6) -> None:
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=1e-5, msg=name)


def test_shift_matches_hf() -> None:
    labels = torch.tensor([[5, 6, 7], [-100, 8, 9]])
    assert shift_labels(labels).tolist() == [[6, 7, -100], [8, 9, -100]]
    assert labels.tolist() == [[5, 6, 7], [-100, 8, 9]]  # the batch keeps its unshifted labels


@pytest.mark.parametrize("batch_fn", [padded_batch, packed_batch], ids=["padded", "packed"])
@pytest.mark.parametrize("checkpoint_chunks", [True, False])
@pytest.mark.parametrize("num_items", [None, 37])
def test_chunked_equals_hf_loss_and_grads(batch_fn, checkpoint_chunks: bool, num_items) -> None:
    llm = tiny_llm()
    batch = batch_fn()
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    want = reference_loss(llm, batch, **extra)
    want_grads = grads(llm, want)
    got = our_loss(llm, batch, chunk_size=4, checkpoint_chunks=checkpoint_chunks, **extra)
    torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-6)
    assert_same_grads(grads(llm, got), want_grads)


def test_nothing_to_train_matches_hf() -> None:
    llm = tiny_llm()
    batch = padded_batch()
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    assert reference_loss(llm, batch).isnan() and our_loss(llm, batch).isnan()
    n = torch.tensor(10)
    want, got = reference_loss(llm, batch, num_items_in_batch=n), our_loss(llm, batch, num_items_in_batch=n)
    assert want.item() == got.item() == 0.0
    got.backward()  # the graph survives: every rank still reaches its gradient hooks
    assert all(p.grad is not None and not p.grad.any() for p in llm.lm_head.parameters())


def test_logits_only_for_targets_one_chunk_at_a_time() -> None:
    """The head sees only trained positions, never more than chunk_size at once; backward recomputes them."""
    llm = tiny_llm()
    batch = padded_batch()
    n_targets = int((shift_labels(batch["labels"]) != IGNORE_INDEX).sum())
    rows: list[int] = []
    handle = llm.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    our_loss(llm, batch, chunk_size=4).backward()
    handle.remove()
    assert max(rows) == 4
    assert sum(rows) == 2 * n_targets  # forward + recompute in backward, nothing for masked positions


def install_fake_liger(monkeypatch) -> None:
    """liger's LigerFusedLinearCrossEntropyLoss contract (forward(weight, input, target, bias), ignore_index
    -100, reduction), implemented naively: lets CPU tests check the wrapper around the GPU kernel."""

    class FakeFused(nn.Module):
        def __init__(self, ignore_index: int = -100, reduction: str = "mean"):
            super().__init__()
            self.ignore_index, self.reduction = ignore_index, reduction

        def forward(self, lin_weight, _input, target, bias=None):
            logits = F.linear(_input, lin_weight, bias).float()
            return F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction=self.reduction)

    names = [
        "liger_kernel",
        "liger_kernel.transformers",
        "liger_kernel.transformers.fused_linear_cross_entropy",
    ]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[names[-1]].LigerFusedLinearCrossEntropyLoss = FakeFused


@pytest.mark.parametrize("batch_fn", [padded_batch, packed_batch], ids=["padded", "packed"])
def test_fused_wrapper_equals_hf(monkeypatch, batch_fn) -> None:
    install_fake_liger(monkeypatch)
    llm = tiny_llm()
    batch = batch_fn()
    for extra in ({}, {"num_items_in_batch": torch.tensor(23)}):
        want = reference_loss(llm, batch, **extra)
        want_grads = grads(llm, want)
        got = our_loss(llm, batch, mode="fused", **extra)
        torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-6)
        assert_same_grads(grads(llm, got), want_grads)


def test_resolve_loss_mode(monkeypatch) -> None:
    head = nn.Linear(4, 8, bias=False)
    assert resolve_loss_mode("auto", on_gpu=False, head=head) == "plain"
    assert resolve_loss_mode("chunked", on_gpu=False) == "chunked"
    if "liger_kernel" not in sys.modules:
        assert resolve_loss_mode("auto", on_gpu=True, head=head) == "chunked"
        assert resolve_loss_mode("fused", on_gpu=True) == "chunked"  # same value; warned
    install_fake_liger(monkeypatch)
    assert resolve_loss_mode("auto", on_gpu=True, head=head) == "fused"
    assert resolve_loss_mode("fused", on_gpu=True, head=head) == "fused"
    assert resolve_loss_mode("fused", on_gpu=False, head=head) == "chunked"  # liger's kernels need a GPU
    lora_head = get_peft_model(nn.Sequential(head), LoraConfig(r=2, target_modules=["0"])).base_model.model[0]
    assert not is_plain_linear(lora_head)
    assert resolve_loss_mode("auto", on_gpu=True, head=lora_head) == "chunked"
    zero3_head = nn.Linear(4, 8)
    zero3_head.weight.ds_id = 0  # DeepSpeed ZeRO-3 partitions it: only a module call gathers the weight
    assert not is_plain_linear(zero3_head) and is_plain_linear(nn.Linear(4, 8))
    with pytest.raises(ValueError, match="dense nn.Linear"):
        causal_lm_loss(torch.zeros(1, 3, 4), lora_head, torch.ones(1, 3, dtype=torch.long), mode="fused")
    with pytest.raises(ValueError, match="not one of"):
        resolve_loss_mode("fast", on_gpu=True)


def _lora(llm: nn.Module) -> nn.Module:
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    return get_peft_model(llm, cfg)


def _loss_and_trainable_grads(model: LlavaModel, batch: dict, n_items) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = model(**batch, num_items_in_batch=n_items).loss
    loss.backward()
    named = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), named


def test_lora_llm_through_llava_model() -> None:
    """peft-wrapped LLM: LlavaModel's chunked loss equals its plain (HF) loss, LoRA gradients included."""
    llm = _lora(tiny_llm())
    batch = packed_batch()
    plain = LlavaModel(llm, loss="plain").train()
    chunked = LlavaModel(llm, loss="chunked", loss_chunk_size=3).train()
    want, want_grads = _loss_and_trainable_grads(plain, batch, torch.tensor(11))
    got, got_grads = _loss_and_trainable_grads(chunked, batch, torch.tensor(11))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert any("lora_A" in n for n in want_grads)
    assert_same_grads(got_grads, want_grads)
    # Without labels the forward is the plain one, with logits.
    assert chunked(input_ids=batch["input_ids"]).logits.shape == (1, 18, VOCAB)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    from llava_ft.testing.tiny_llm import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("llama"), hidden_size=32, num_layers=1, num_heads=2)


def test_4bit_lora_llm_through_llava_model(llama_dir: Path) -> None:
    """QLoRA: 4-bit NF4 base (bitsandbytes) + LoRA; chunked loss equals the HF loss on the same model."""
    from llava_ft.model.llm import load_llm

    llm = _lora(load_llm(llama_dir, load_in_4bit=True)).train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, llm.config.vocab_size, (2, 10), generator=g)
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    want, want_grads = _loss_and_trainable_grads(LlavaModel(llm, loss="plain").train(), batch, None)
    got, got_grads = _loss_and_trainable_grads(LlavaModel(llm, loss="chunked").train(), batch, None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert_same_grads(got_grads, want_grads, atol=1e-5)
