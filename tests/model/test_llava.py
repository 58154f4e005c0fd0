"""LlavaModel: image features land at the image-token positions (against a naive loop), the count check,
mixed image/text batches, several images per sample, the dummy-image path, and packed rows through the real
collators giving what padded batches give (loss, gradients, logits), for the plain and the chunked loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from llava_ft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_ft.data.collate import Collator, PackedCollator
from llava_ft.model import attention
from llava_ft.model.llava import LlavaModel
from llava_ft.model.projector import build_projector

VOCAB, HIDDEN, PAD = 89, 32, 0


class ToyTower(nn.Module):
    """A vision tower's contract (image_size, num_tokens, hidden_size, [n,3,H,W] -> [n,N,D]) at toy size."""

    image_size, num_tokens, hidden_size = 8, 4, 16

    def __init__(self):
        super().__init__()
        self.patches = nn.Conv2d(3, self.hidden_size, kernel_size=4, stride=4)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.patches(pixel_values).flatten(2).transpose(1, 2)


def tiny_llava(loss: str = "plain", attn: str = "sdpa") -> LlavaModel:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=PAD,
    )
    llm = LlamaForCausalLM._from_config(config, attn_implementation=attn)
    tower = ToyTower().requires_grad_(False)
    projector = build_projector("mlp2x_gelu", ToyTower.hidden_size, HIDDEN)
    return LlavaModel(llm, tower, projector, loss=loss, loss_chunk_size=5)


def sample(seed: int, spans: list[int | str]) -> dict:
    """ids from `spans`: an int n = n text tokens, "img" = one image (4 placeholder tokens). The first half
    of the text is a masked prompt, as a chat template would make it."""
    g = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    n_images = 0
    for span in spans:
        if span == "img":
            ids += [IMAGE_TOKEN_INDEX] * ToyTower.num_tokens
            n_images += 1
        else:
            ids += torch.randint(1, VOCAB, (span,), generator=g).tolist()
    labels = [IGNORE_INDEX if (t == IMAGE_TOKEN_INDEX or i < len(ids) // 2) else t for i, t in enumerate(ids)]
    pixels = torch.randn(n_images, 3, 8, 8, generator=g) if n_images else None
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


MIXED = [
    sample(1, [3, "img", 6]),
    sample(2, [9]),  # text-only
    sample(3, [2, "img", 3, "img", 5]),  # two images
]


def naive_embeds(model: LlavaModel, batch: dict) -> torch.Tensor:
    """Position by position: k-th image token of a row takes token k % N of that row's (k // N)-th image,
    images numbered in row order across the batch; every other position takes its token embedding."""
    features = model.encode_images(batch["pixel_values"])
    table = model.input_embeddings().weight
    ids = batch["input_ids"]
    out = torch.empty(*ids.shape, HIDDEN)
    first_image = 0
    for r in range(ids.shape[0]):
        k = 0
        for t in range(ids.shape[1]):
            if ids[r, t] == IMAGE_TOKEN_INDEX:
                out[r, t] = features[first_image + k // ToyTower.num_tokens, k % ToyTower.num_tokens]
                k += 1
            else:
                out[r, t] = table[ids[r, t]]
        assert k == ToyTower.num_tokens * int(batch["image_counts"][r])
        first_image += int(batch["image_counts"][r])
    return out


def test_features_land_at_image_positions() -> None:
    model = tiny_llava()
    batch = Collator(pad_token_id=PAD)(MIXED)
    assert batch["image_counts"].tolist() == [1, 0, 2]
    with torch.no_grad():
        got = model.embed(batch["input_ids"], batch["pixel_values"])
        want = naive_embeds(model, batch)
    assert torch.equal(got, want)
    # The two images of the last sample are different and each sits at its own span.
    with torch.no_grad():
        second, third = model.encode_images(batch["pixel_values"][1:])
    spans = (batch["input_ids"][2] == IMAGE_TOKEN_INDEX).nonzero().flatten()
    assert torch.equal(got[2, spans[:4]], second) and torch.equal(got[2, spans[4:]], third)
    assert not torch.equal(second, third)


def test_image_count_mismatch_raises() -> None:
    model = tiny_llava()
    batch = Collator(pad_token_id=PAD)(MIXED[:1])
    ids = batch["input_ids"].clone()
    ids[0, 3] = 5  # one image token fewer than the image has features
    with pytest.raises(ValueError, match=r"1 image\(s\) x 4 tokens = 4 features, but input_ids hold 3"):
        model.embed(ids, batch["pixel_values"])
    two = torch.cat([batch["pixel_values"]] * 2)
    with pytest.raises(ValueError, match="2 image"):
        model.embed(batch["input_ids"], two)
    with pytest.raises(ValueError, match="4 image positions but no pixel_values"):
        model.embed(batch["input_ids"], None)
    # Totals that match while rows do not: row 0 holds 1 image span and row 2 holds 2, counts say 2 and 1.
    batch = Collator(pad_token_id=PAD)(MIXED)
    swapped = torch.tensor([2, 0, 1])
    with pytest.raises(ValueError, match="batch row 0 holds 4 image positions but 2 image"):
        model(**{**batch, "image_counts": swapped})
    text_only = LlavaModel(model.llm)
    with pytest.raises(ValueError, match="no vision tower"):
        text_only.embed(batch["input_ids"], batch["pixel_values"])


def test_mixed_batch_rows_equal_single_rows() -> None:
    """A text-only row beside image rows gives its own logits, as if run alone (and the image rows too)."""
    model = tiny_llava().eval()
    collate = Collator(pad_token_id=PAD)
    batch = collate(MIXED)
    with torch.no_grad():
        together = model(**batch).logits
        for r, item in enumerate(MIXED):
            alone = model(**collate([item])).logits[0]
            n = len(item["input_ids"])
            torch.testing.assert_close(together[r, :n], alone, atol=1e-5, rtol=1e-5)
        text_row = torch.tensor([MIXED[1]["input_ids"]])
        torch.testing.assert_close(
            together[1, :9], model.llm(input_ids=text_row).logits[0], atol=1e-5, rtol=1e-5
        )


def test_dummy_image_keeps_graph_on_text_only_batches() -> None:
    model = tiny_llava().train()
    calls: list[int] = []
    model.vision_tower.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    batch = Collator(pad_token_id=PAD)([MIXED[1], sample(4, [7])])
    assert "pixel_values" not in batch
    model(**batch).loss.backward()
    assert calls == [1]
    grads = [p.grad for p in model.projector.parameters()]
    assert all(g is not None and not g.any() for g in grads)  # in the graph, and a mathematical no-op
    model.eval()
    with torch.no_grad():
        model(**batch)
    assert calls == [1]  # no dummy image outside training


def _loss_grads_logits(model: LlavaModel, batch: dict) -> tuple[torch.Tensor, dict, torch.Tensor]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return loss.detach(), grads, logits


@pytest.mark.parametrize(("loss", "attn"), [("plain", "sdpa"), ("chunked", "sdpa"), ("plain", "sdpa_packed")])
def test_packed_rows_equal_padded_batch(loss: str, attn: str, monkeypatch) -> None:
    """The same samples packed into rows (PackedCollator) or padded (Collator): same loss, gradients and
    per-sample logits. The reference is the padded batch with transformers' own sdpa and loss. Two rows, the
    second shorter (a padding tail); sdpa_packed must really take its per-sample path."""
    items = [*MIXED, sample(5, ["img", 4])]
    rows = [items[:3], items[3:]]
    padded = Collator(pad_token_id=PAD)(items)
    packed = PackedCollator(pad_token_id=PAD, row_length=64)(rows)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 2

    calls: list[tuple[int, int]] = []
    real_sdpa = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(
        attention.F,
        "scaled_dot_product_attention",
        lambda *a, **k: calls.append(tuple(a[0].shape[::2])) or real_sdpa(*a, **k),
    )
    want_loss, want_grads, want_logits = _loss_grads_logits(tiny_llava("plain").train(), padded)
    calls.clear()
    got_loss, got_grads, got_logits = _loss_grads_logits(tiny_llava(loss, attn).train(), packed)
    if attn == "sdpa_packed":  # the samples are attended in buckets of similar lengths, never as whole rows
        lengths = sorted(len(item["input_ids"]) for item in items)
        assert calls and all(length < packed["input_ids"].shape[1] for _, length in calls)
        per_forward = len(calls) // 4  # 2 layers, in training and in eval
        assert 1 <= per_forward < len(items) + 1 and len(calls) == 4 * per_forward
        attended = sum(n * length for n, length in calls[:per_forward])
        tail = packed["input_ids"].shape[1] - sum(len(item["input_ids"]) for item in rows[1])
        segments = [*lengths, tail]
        assert attended >= sum(segments)  # every sample and the padding tail, with bounded padding
        assert attended <= sum(max(attention.BUCKET_RATIO * n, n + attention.BUCKET_SLACK) for n in segments)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    assert want_grads.keys() == got_grads.keys() and any(n.startswith("projector.") for n in want_grads)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    r = 0
    for row, row_items in enumerate(rows):
        start = 0
        for item in row_items:
            n = len(item["input_ids"])
            torch.testing.assert_close(
                got_logits[row, start : start + n], want_logits[r, :n], atol=1e-5, rtol=1e-5
            )
            start, r = start + n, r + 1


def test_packed_sdpa_outside_packed_rows_is_sdpa() -> None:
    """Padded batches with a mask (left padding, as generation has) take transformers' sdpa path unchanged."""
    batch = Collator(pad_token_id=PAD)(MIXED)
    batch["attention_mask"] = batch["attention_mask"].flip(1)  # left padding
    for key in ("input_ids", "labels"):
        batch[key] = torch.stack(
            [row.roll(int(n), 0) for row, n in zip(batch[key], (batch["attention_mask"] == 0).sum(1))]
        )
    with torch.no_grad():
        want = tiny_llava().eval()(**batch).logits
        got = tiny_llava(attn="sdpa_packed").eval()(**batch).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(got[mask], want[mask])


def test_packed_sdpa_generates_like_sdpa() -> None:
    """A model trained with packing chats with sdpa_packed: greedy generation, with a KV cache and a left-padded
    batch, gives the same tokens as sdpa."""
    prompts = torch.tensor([[PAD, PAD, 5, 7, 9], [3, 4, 5, 6, 8]])
    mask = (prompts != PAD).long()
    out = {}
    for attn in ("sdpa", "sdpa_packed"):
        llm = tiny_llava(attn=attn).llm.eval()
        out[attn] = llm.generate(
            input_ids=prompts, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD
        )
        single = llm.generate(input_ids=prompts[1:], max_new_tokens=6, do_sample=False, pad_token_id=PAD)
        assert single.tolist() == out[attn][1:].tolist()
    assert out["sdpa_packed"].tolist() == out["sdpa"].tolist()


def test_packed_sdpa_reads_position_ids_without_spans() -> None:
    """Called as a plain causal LM (no LlavaModel to pass spans): packed rows still isolate their samples."""
    llm = tiny_llava(attn="sdpa_packed").llm.eval()
    ids = [torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 9, 3)]
    row = torch.cat(ids)[None]
    position_ids = torch.cat([torch.arange(len(x)) for x in ids])[None]
    with torch.no_grad():
        got = llm(input_ids=row, position_ids=position_ids, use_cache=False).logits[0]
        want = torch.cat([llm(input_ids=x[None]).logits[0] for x in ids])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_plan_packed_covers_every_token_once_in_few_buckets() -> None:
    """Against a naive reading of the plan: each bucket row is one sample's tokens in order, then copies of its
    last token; the real outputs, put back by `order`, are every position of every row exactly once."""
    rng = torch.Generator().manual_seed(0)
    length, spans = 300, []
    for _ in range(5):
        cuts = sorted(
            torch.randint(
                1, length, (int(torch.randint(0, 12, (1,), generator=rng)),), generator=rng
            ).tolist()
        )
        bounds = [0, *sorted(set(cuts)), length]
        spans.append(list(zip(bounds, bounds[1:])))
    plan = attention.plan_packed(spans, length)
    samples = {(r * length + s, e - s) for r, row in enumerate(spans) for s, e in row}
    assert plan.samples == len(samples) and len(plan.buckets) < len(samples)
    real = []
    for b in plan.buckets:
        rows = b.gather.view(b.n, b.length).tolist()
        keep = set(range(b.n * b.length)) if b.keep is None else set(b.keep.tolist())
        for k, row in enumerate(rows):
            n = sum(k * b.length + i in keep for i in range(b.length))
            assert (row[0], n) in samples and row[:n] == list(range(row[0], row[0] + n))
            assert row[n:] == [row[n - 1]] * (b.length - n)
            assert n * attention.BUCKET_RATIO >= b.length or b.length - n <= attention.BUCKET_SLACK
            real += row[:n]
    assert torch.tensor(real)[plan.order].tolist() == list(range(5 * length))


def test_packed_spans_from_position_ids() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert attention.packed_spans(pos) == [[(0, 3), (3, 5), (5, 6), (6, 8)], [(0, 8)]]


def test_trainer_counts_items_after_the_shift(tmp_path) -> None:
    """num_items_in_batch (gradient accumulation) counts labels[..., 1:], the targets the loss actually has."""
    batch = Collator(pad_token_id=PAD)([sample(6, [8]), sample(7, [6])])
    batch["labels"][:, 0] = batch["input_ids"][:, 0]  # a first label that is not -100 is never a target
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = Trainer(model=tiny_llava(), args=args)
    n = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    assert int(n) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
