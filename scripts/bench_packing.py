"""Packed vs padded vs length-grouped training throughput on a tiny model, through the real training forward.

Two synthetic mixes (labels: the prompt third of each sample's text masked, image positions never trained):
  text   text SFT, log-uniform lengths in [16, max_length]
  llava  a LLaVA finetune mix: 80% image samples (576 image tokens from a tiny CLIP tower, 96 px / patch 4,
         plus log-uniform [24, 1024] text tokens) and 20% text-only samples of [16, max_length] tokens
batched three ways with the same per-step budget (`--batch` samples, or `--batch` rows of `--max-length`):
  padded   random batches, right-padded to the longest           (Collator, sdpa with the padding mask)
  grouped  the same, ordered by LengthGroupedSampler              (Collator, sdpa)
  packed   rows of `--pack-length` tokens (default max-length), best-fit decreasing, batch x max-length / pack-length
           rows per step (PackedCollator, the attention `build_model` picks for packed rows: sdpa_packed on CPU,
           attention within each sample)
Every mode runs `LlavaModel` (tiny Llama LLM; frozen tower + trainable projector for llava) in a fresh
subprocess (so peak RSS is its own) and times forward + backward + AdamW on the same randomly chosen share of
its epoch's batches. Every sample of the epoch is checked to be in exactly one packed row.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_packing.py [--mix text|llava] [--steps 6] [--samples 2000]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from llava_ft.config import VisionSection
from llava_ft.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_ft.data.collate import Collator, PackedCollator
from llava_ft.data.images import ImageProcessor
from llava_ft.data.packing import PackedDataset
from llava_ft.data.sampler import LengthGroupedSampler
from llava_ft.model.build import resolve_attn_implementation
from llava_ft.model.llava import LlavaModel
from llava_ft.model.projector import build_projector
from llava_ft.model.vision import HFClipVisionTower

MODES = ("padded", "grouped", "packed")
MIXES = {
    "text": "text SFT 16..{max_length}",
    "llava": "LLaVA finetune (80% 576 image + 24..1024 text tokens, 20% text 16..{max_length})",
}
PAD = 0
IMAGE_SIZE, PATCH = 96, 4  # a 24 x 24 grid: 576 image tokens, as CLIP ViT-L/14 at 336 px


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    return int(math.exp(rng.uniform(math.log(low), math.log(high + 1))))


def synthetic_mix(mix: str, n: int, max_length: int, vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    image = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
    n_image = (IMAGE_SIZE // PATCH) ** 2
    samples = []
    for _ in range(n):
        with_image = mix == "llava" and rng.random() < 0.8
        length = _log_uniform(rng, 24, 1024) if with_image else _log_uniform(rng, 16, max_length)
        ids = torch.tensor([rng.randrange(1, vocab) for _ in range(length)])
        labels = ids.clone()
        labels[: length // 3] = IGNORE_INDEX
        if with_image:
            ids = torch.cat([torch.full((n_image,), IMAGE_TOKEN_INDEX), ids])[:max_length]
            labels = torch.cat([torch.full((n_image,), IGNORE_INDEX), labels])[:max_length]
        samples.append({"input_ids": ids, "labels": labels, "pixel_values": image if with_image else None})
    return samples


def epoch_batches(mode: str, samples: list[dict], args: argparse.Namespace) -> tuple[list[list], object]:
    """The epoch's batches (lists of dataset items) and the collator for them."""
    lengths = [len(s["input_ids"]) for s in samples]
    if mode == "packed":
        row_length = args.pack_length or args.max_length
        packed = PackedDataset(samples, lengths, row_length, seed=args.seed)
        placed = sorted(j for row in packed.rows for j in row)
        if placed != list(range(len(samples))):
            raise SystemExit(f"packing lost or repeated samples: {len(placed)} placements of {len(samples)}")
        rows = [packed[i] for i in range(len(packed))]
        collate = PackedCollator(pad_token_id=PAD, row_length=row_length)
        per_step = max(1, args.batch * args.max_length // row_length)  # the same token budget per step
        return [rows[k : k + per_step] for k in range(0, len(rows), per_step)], collate
    if mode == "grouped":
        order = list(LengthGroupedSampler(lengths, args.batch, seed=args.seed))
    else:
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(args.seed)).tolist()
    items = [samples[i] for i in order]
    return [items[k : k + args.batch] for k in range(0, len(items), args.batch)], Collator(pad_token_id=PAD)


def build(mix: str, mode: str, args: argparse.Namespace) -> LlavaModel:
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.max_length,
        pad_token_id=PAD,
    )
    attn = resolve_attn_implementation(None, packing=mode == "packed", on_gpu=False)
    llm = LlamaForCausalLM._from_config(config, attn_implementation=attn)
    if mix == "text":
        return LlavaModel(llm).train()
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            image_size=IMAGE_SIZE,
            patch_size=PATCH,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
        )
    )
    tower = HFClipVisionTower(
        VisionSection(backend="hf", model="in-memory"), clip, ImageProcessor(IMAGE_SIZE)
    )
    projector = build_projector("mlp2x_gelu", tower.hidden_size, args.hidden)
    return LlavaModel(llm, tower.requires_grad_(False), projector).train()


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    samples = synthetic_mix(args.mix, args.samples, args.max_length, args.vocab, args.seed)
    batches, collate = epoch_batches(mode, samples, args)
    epoch_real = sum(len(s["input_ids"]) for s in samples)
    epoch_slots = sum(collate(b)["input_ids"].numel() for b in batches)
    model = build(args.mix, mode, args)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    # The same draw of batch positions for every mode, so none is timed on an unrepresentative stretch
    # (the grouped order puts its longest batches first).
    picks = random.Random(args.seed).sample(range(len(batches)), min(len(batches), args.warmup + args.steps))
    real = slots = 0
    elapsed = 0.0
    for k, index in enumerate(picks):
        batch = collate(batches[index])
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if k >= args.warmup:
            elapsed += time.perf_counter() - start
            real += sum(len(item["input_ids"]) for item in _flat(batches[index], mode))
            slots += batch["input_ids"].numel()
    return {
        "mode": mode,
        "attention": model.llm.config._attn_implementation,
        "steps_per_epoch": len(batches),
        "epoch_pad_share": 1 - epoch_real / epoch_slots,
        "timed_pad_share": 1 - real / slots,
        "real_tokens_per_s": real / elapsed,
        "slot_tokens_per_s": slots / elapsed,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _flat(batch: list, mode: str) -> list[dict]:
    return [item for row in batch for item in row] if mode == "packed" else batch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mix", choices=MIXES, default="text")
    parser.add_argument("--mode", choices=MODES, help="run one mode in this process (used internally)")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument(
        "--batch", type=int, default=8, help="samples per padded batch = rows per packed batch"
    )
    parser.add_argument(
        "--pack-length",
        type=int,
        default=None,
        help="packed row length (data.pack_length); default max-length",
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", default=None, help="results for scripts/bench_prepare.py's table")
    args = parser.parse_args()

    if args.mode:
        print(json.dumps(run_mode(args.mode, args)))
        return

    results = {}
    for mode in MODES:
        out = subprocess.run(
            [sys.executable, __file__, "--mode", mode, *sys.argv[1:]],
            check=True,
            capture_output=True,
            text=True,
        )
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])

    mix = MIXES[args.mix].format(max_length=args.max_length)
    if args.pack_length:
        mix += f", packed rows of {args.pack_length}"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, tiny Llama hidden {args.hidden} x "
        f"{args.layers} layers, {args.samples} samples, {mix}, batch/rows {args.batch}"
    )
    print(
        f"{'mode':8} {'attention':11} {'steps/epoch':>11} {'pad epoch':>9} {'pad timed':>9} {'real tok/s':>10} "
        f"{'slot tok/s':>10} {'peak RSS MiB':>12}"
    )
    for r in results.values():
        print(
            f"{r['mode']:8} {r['attention']:11} {r['steps_per_epoch']:>11} {r['epoch_pad_share']:>9.1%} "
            f"{r['timed_pad_share']:>9.1%} {r['real_tokens_per_s']:>10,.0f} {r['slot_tokens_per_s']:>10,.0f} "
            f"{r['peak_rss_mib']:>12,.0f}"
        )
    base = results["padded"]["real_tokens_per_s"]
    for mode in ("grouped", "packed"):
        print(f"{mode}/padded real tokens/s: {results[mode]['real_tokens_per_s'] / base:.2f}x")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"mix": mix, "results": results}))


if __name__ == "__main__":
    main()
