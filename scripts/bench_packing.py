"""Packed vs padded training throughput on a tiny Llama (CPU by default).

A length-skewed synthetic SFT mix (log-uniform lengths in [16, 1024], prompt third masked) is batched three
ways with the same per-step token budget (batch x max sample length):
  padded   random batches of `--batch` samples, right-padded to the longest  (Collator)
  grouped  the same, ordered by LengthGroupedSampler                         (Collator)
  packed   `--batch` rows of `--max-length` tokens, best-fit decreasing      (PackedCollator, no mask, no cache)
Each mode runs in a fresh subprocess (so peak RSS is its own) and times forward + backward + AdamW on the same
randomly chosen share of its epoch's batches. Pad share is given for the whole epoch and for the timed steps.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_packing.py [--steps 6] [--samples 2000]
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
from transformers import LlamaConfig, LlamaForCausalLM

from llava_ft.data.collate import Collator, PackedCollator
from llava_ft.data.conversation import IGNORE_INDEX
from llava_ft.data.packing import PackedDataset
from llava_ft.data.sampler import LengthGroupedSampler

MODES = ("padded", "grouped", "packed")
PAD = 0


def synthetic_mix(n: int, max_length: int, vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        length = int(math.exp(rng.uniform(math.log(16), math.log(max_length + 1))))
        ids = torch.tensor([rng.randrange(1, vocab) for _ in range(length)])
        labels = ids.clone()
        labels[: length // 3] = IGNORE_INDEX
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def epoch_batches(mode: str, samples: list[dict], args: argparse.Namespace) -> tuple[list[list], object]:
    """The epoch's batches (lists of dataset items) and the collator for them."""
    lengths = [len(s["input_ids"]) for s in samples]
    if mode == "packed":
        packed = PackedDataset(samples, lengths, args.max_length, seed=args.seed)
        rows = [packed[i] for i in range(len(packed))]
        collate = PackedCollator(pad_token_id=PAD, row_length=args.max_length)
        return [rows[k : k + args.batch] for k in range(0, len(rows), args.batch)], collate
    if mode == "grouped":
        order = list(LengthGroupedSampler(lengths, args.batch, seed=args.seed))
    else:
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(args.seed)).tolist()
    items = [samples[i] for i in order]
    return [items[k : k + args.batch] for k in range(0, len(items), args.batch)], Collator(pad_token_id=PAD)


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    samples = synthetic_mix(args.samples, args.max_length, args.vocab, args.seed)
    batches, collate = epoch_batches(mode, samples, args)
    epoch_real = sum(len(s["input_ids"]) for s in samples)
    epoch_slots = sum(collate(b)["input_ids"].numel() for b in batches)

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
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    # The same draw of batch positions for every mode, so none is timed on an unrepresentative stretch
    # (the grouped order puts its longest batches first).
    picks = random.Random(args.seed).sample(range(len(batches)), min(len(batches), args.warmup + args.steps))
    real = slots = 0
    elapsed = 0.0
    for k, index in enumerate(picks):
        batch = collate(batches[index])
        batch.pop("image_counts")  # for the LLaVA model; a plain causal LM takes no such argument
        start = time.perf_counter()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if k >= args.warmup:
            elapsed += time.perf_counter() - start
            real += sum(len(item["input_ids"]) for item in _flat(batches[index], mode))
            slots += batch["input_ids"].numel()
    return {
        "mode": mode,
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
    parser.add_argument("--mode", choices=MODES, help="run one mode in this process (used internally)")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument(
        "--batch", type=int, default=8, help="samples per padded batch = rows per packed batch"
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

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, tiny Llama hidden {args.hidden} x "
        f"{args.layers} layers, {args.samples} samples of 16..{args.max_length} tokens, batch/rows {args.batch}"
    )
    print(
        f"{'mode':8} {'steps/epoch':>11} {'pad epoch':>9} {'pad timed':>9} {'real tok/s':>10} "
        f"{'slot tok/s':>10} {'peak RSS MiB':>12}"
    )
    for r in results.values():
        print(
            f"{r['mode']:8} {r['steps_per_epoch']:>11} {r['epoch_pad_share']:>9.1%} {r['timed_pad_share']:>9.1%} "
            f"{r['real_tokens_per_s']:>10,.0f} {r['slot_tokens_per_s']:>10,.0f} {r['peak_rss_mib']:>12,.0f}"
        )
    base = results["padded"]["real_tokens_per_s"]
    for mode in ("grouped", "packed"):
        print(f"{mode}/padded real tokens/s: {results[mode]['real_tokens_per_s'] / base:.2f}x")
    if args.json_out:
        mix = f"text SFT 16..{args.max_length}"
        Path(args.json_out).write_text(json.dumps({"mix": mix, "results": results}))


if __name__ == "__main__":
    main()
