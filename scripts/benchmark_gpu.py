"""GPU memory and throughput of LLaVA finetuning: llava_ft's QLoRA path beside the plain peft + bitsandbytes recipe.

Writes (once, under --root) a random InternLM2-1.8B-shaped checkpoint in the real InternLM2 on-disk layout
(grouped wqkv, upstream key names, sentencepiece tokenizer; hidden 2048, 24 layers, 16 heads / 8 KV heads,
inter 8192, vocab 92544) and a LLaVA JSON of synthetic image + answer samples (576 image tokens + ~1450 text
tokens each); the vision tower is open_clip's ViT-L/14-336 with random weights (nothing is downloaded).
Each configuration runs in its own subprocess (its own peak memory, no kernel patches leaking between runs)
and goes through llava_ft's real path: InternLM2 loader, trainability, dataset, collator, Trainer.

  plain_*     the usual recipe: NF4 LLM, peft's prepare_model_for_kbit_training (fp32 upcast of embeddings,
              lm_head, norms), LoRA r64 all-linear, gradient checkpointing, HF loss, sdpa, transformers Trainer
  llava_ft_*  llava_ft's defaults for trainable.llm qlora: NF4 LLM with the rest kept bf16, LoRA r64 all-linear,
              gradient checkpointing, loss/attention/liger chosen automatically (see the table's columns)

Prints one table (peak allocated / reserved GiB, tokens/s over the timed steps, image tokens included) and
writes it as JSON with --json-out. Compare only rows of one run: absolute figures move between machines.

    pip install -e .[gpu]          # liger-kernel + bitsandbytes; flash-attn optional
    HF_HUB_OFFLINE=1 python scripts/benchmark_gpu.py [--root /tmp/llava_ft_gpu_bench] [--steps 6 --warmup 2]
    HF_HUB_OFFLINE=1 python scripts/benchmark_gpu.py --tiny       # CPU smoke run of the whole script
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llava_ft.config import DataSource, LoraSection, ModelSection, RunConfig, TrainableSection, VisionSection


@dataclass(frozen=True)
class Variant:
    name: str
    recipe: str  # "plain" or "llava_ft"
    batch_size: int = 1
    optim: str = "adamw_torch"
    packing: bool = False
    needs_gpu: bool = False


VARIANTS = {
    v.name: v
    for v in (
        Variant("plain_b1", "plain"),
        Variant("llava_ft_b1", "llava_ft"),
        Variant("llava_ft_paged8bit_b1", "llava_ft", optim="paged_adamw_8bit", needs_gpu=True),
        Variant("plain_b8", "plain", batch_size=8),
        Variant("llava_ft_b8", "llava_ft", batch_size=8),
        Variant("llava_ft_packed_8192", "llava_ft", packing=True),
    )
}
WORDS = (
    "the a red blue green small large circle square image shows near far left right top bottom of with and "
    "picture object scene light dark bright colour shape above below beside inside outside many few one two"
).split()


@dataclass(frozen=True)
class Shapes:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    inter: int
    vocab: int | None  # None: the tokenizer's size
    vision: str  # open_clip model name, or "tiny"
    sample_tokens: int  # target sample length, image tokens included
    row_tokens: int  # packed row length


FULL = Shapes(2048, 24, 16, 8, 8192, 92544, "ViT-L-14-336-quickgelu", 2048, 8192)
TINY = Shapes(64, 2, 4, 2, 128, None, "tiny", 96, 384)


def prepare(root: Path, shapes: Shapes, n_samples: int) -> tuple[Path, str, Path, int]:
    """(LLM folder, vision model name, data file, image tokens per sample), written once under root."""
    from PIL import Image

    from llava_ft.data.tokenizer import load_tokenizer
    from llava_ft.model.vision import build_vision_tower
    from llava_ft.testing.tiny_llm import write_tiny_internlm2
    from llava_ft.testing.tiny_vision import write_tiny_open_clip

    llm_dir = root / f"internlm2_h{shapes.hidden}_l{shapes.layers}"
    if not (llm_dir / "config.json").exists():
        print(f"writing random InternLM2 checkpoint to {llm_dir} ...", file=sys.stderr)
        write_tiny_internlm2(
            llm_dir,
            vocab_size=shapes.vocab,
            hidden_size=shapes.hidden,
            intermediate_size=shapes.inter,
            num_layers=shapes.layers,
            num_heads=shapes.heads,
            num_kv_heads=shapes.kv_heads,
            max_position_embeddings=32768,
            shards=1 if shapes.vocab is None else 4,
        )
    vision = shapes.vision
    if vision == "tiny":
        clip = root / "tiny_open_clip"
        if not (clip / "open_clip_config.json").exists():
            write_tiny_open_clip(clip, image_size=32, patch_size=8, width=32, layers=2, heads=2)
        vision = f"local-dir:{clip}"
    tower = build_vision_tower(VisionSection(backend="open_clip", model=vision))
    n_image_tokens, image_size = tower.num_tokens, tower.image_size
    del tower

    data = root / f"data_{shapes.sample_tokens}.json"
    if not data.exists():
        images = root / "images"
        images.mkdir(parents=True, exist_ok=True)
        rng = random.Random(0)
        for i in range(4):
            pixels = bytes(rng.randrange(256) for _ in range(image_size * image_size * 3))
            Image.frombytes("RGB", (image_size, image_size), pixels).save(images / f"{i}.png")
        # A multiset of space-separated words tokenizes to the same length in any order: equal-length samples.
        tokenizer = load_tokenizer(llm_dir)
        budget = shapes.sample_tokens - n_image_tokens - 40  # room for the template and the question
        words = [rng.choice(WORDS) for _ in range(budget)]
        while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) > budget:
            words = words[: int(len(words) * 0.97)]
        records = []
        for i in range(n_samples):
            rng.shuffle(words)
            question = "<image>\nDescribe the picture in detail."
            conv = [{"from": "human", "value": question}, {"from": "gpt", "value": " ".join(words)}]
            records.append({"id": str(i), "image": f"images/{i % 4}.png", "conversations": conv})
        data.write_text(json.dumps(records))
    return llm_dir, vision, data, n_image_tokens


def run_config(variant: Variant, llm_dir: Path, vision: str, data: Path, shapes: Shapes, args) -> RunConfig:
    cfg = RunConfig(
        model=ModelSection(llm=str(llm_dir), vision=VisionSection(model=vision)),
        trainable=TrainableSection(llm="qlora", projector="full"),
        lora=LoraSection(r=64, alpha=16, dropout=0.05),
        name=variant.name,
    )
    cfg.data.train = [DataSource(path=str(data), format="llava")]
    cfg.data.max_length = shapes.row_tokens if variant.packing else shapes.sample_tokens
    cfg.data.packing = variant.packing
    cfg.data.group_by_length = False
    cfg.data.cache_dir = str(args.root / "prepared")
    cfg.train.output_dir = str(args.root / "runs" / variant.name)
    cfg.train.batch_size = variant.batch_size
    cfg.train.max_steps = args.warmup + args.steps
    cfg.train.optim = variant.optim
    cfg.train.lr = 2e-4
    cfg.train.logging_steps = 1
    cfg.train.report_to = "none"
    cfg.train.gradient_checkpointing = True
    if variant.recipe == "plain":
        cfg.model.loss, cfg.model.liger, cfg.model.attn_implementation = "plain", False, "sdpa"
    return cfg


class CountingCollator:
    """Counts the real (non-padding) tokens of each batch, in the order the steps consume them."""

    def __init__(self, collator):
        self.collator = collator
        self.tokens: list[int] = []

    def __call__(self, items):
        batch = self.collator(items)
        if "attention_mask" in batch:
            self.tokens.append(int(batch["attention_mask"].sum()))
        else:  # packed rows: the samples' own tokens, not the padding segment that ends a short row
            self.tokens.append(sum(len(s["input_ids"]) for row in items for s in row))
        return batch


def measure(variant: Variant, args) -> dict:
    """Build, train warmup + steps, and time the last `steps` (this process only runs this variant)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainerCallback, set_seed

    from llava_ft.data.templates import get_template
    from llava_ft.model.build import build_model
    from llava_ft.model.kernels import resolve_liger
    from llava_ft.model.trainability import apply_trainability
    from llava_ft.train.run import batching, training_arguments
    from llava_ft.train.trainer import LlavaTrainer

    shapes = TINY if args.tiny else FULL
    llm_dir, vision, data, _ = prepare(args.root, shapes, args.samples)
    cfg = run_config(variant, llm_dir, vision, data, shapes, args)
    on_gpu = torch.cuda.is_available()
    set_seed(0)
    tokenizer, model = build_model(cfg)
    if variant.recipe == "plain":
        # The peft + bitsandbytes recipe as its documentation gives it, on the same LLaVA model.
        model.llm = prepare_model_for_kbit_training(model.llm, use_gradient_checkpointing=True)
        lora = LoraConfig(
            r=64, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"
        )
        model.llm = get_peft_model(model.llm, lora)
        for p in model.projector.parameters():
            p.requires_grad_(True)
    else:
        apply_trainability(model, cfg.trainable, cfg.lora)

    from llava_ft.data.dataset import build_dataset

    template = get_template(cfg.data.template, tokenizer)
    dataset, _ = build_dataset(
        cfg.data,
        tokenizer,
        template,
        image_tokens=getattr(model, "image_tokens", model.num_image_tokens),
        image_processor=model.vision_tower.processor,
    )
    train_dataset, collator, sampler = batching(cfg, dataset, tokenizer)
    counting = CountingCollator(collator)

    times: list[tuple[float, float]] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if on_gpu:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if on_gpu:
                torch.cuda.synchronize()
            times.append((self.t0, time.perf_counter()))

    trainer_cls = Trainer if variant.recipe == "plain" else LlavaTrainer
    trainer = trainer_cls(
        model=model,
        args=training_arguments(cfg),
        train_dataset=train_dataset,
        data_collator=counting,
        callbacks=[Timer()],
    )
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = times[args.warmup :]
    seconds = sum(end - start for start, end in timed)
    tokens = sum(counting.tokens[args.warmup : args.warmup + len(timed)])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    gib = 2**30
    return {
        "variant": variant.name,
        "recipe": variant.recipe,
        "batch": f"{variant.batch_size} x {cfg.data.max_length}" + (" packed" if variant.packing else ""),
        "optim": variant.optim,
        "attention": model.llm.config._attn_implementation,
        "loss": model.loss,
        "liger": variant.recipe != "plain" and resolve_liger(cfg.model.liger, on_gpu=on_gpu),
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / gib if on_gpu else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / gib if on_gpu else None,
        "tokens_per_s": tokens / seconds if seconds else None,
        "timed_steps": len(timed),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
    }


def table(rows: list[dict]) -> str:
    head = "| variant | batch | optim | attention | loss | liger | peak alloc GiB | peak reserved GiB | tokens/s | loss 1st/last |"
    lines = [head, "|" + "---|" * 10]

    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} |")
            continue
        lines.append(
            f"| {r['variant']} | {r['batch']} | {r['optim']} | {r['attention']} | {r['loss']} | "
            f"{'on' if r['liger'] else 'off'} | {num(r['peak_allocated_gib'], '.2f')} | "
            f"{num(r['peak_reserved_gib'], '.2f')} | {num(r['tokens_per_s'], ',.0f')} | "
            f"{num(r['first_loss'], '.3f')} / {num(r['last_loss'], '.3f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=Path("/tmp/llava_ft_gpu_bench"))
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--steps", type=int, default=6, help="timed optimiser steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps (allocator, kernels, autotune)")
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a CPU smoke run of the whole script")
    p.add_argument("--json-out", type=Path)
    p.add_argument("--run-one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    if args.run_one:
        print("RESULT " + json.dumps(measure(VARIANTS[args.run_one], args)))
        return 0

    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    if not torch.cuda.is_available():
        skipped = [n for n in names if VARIANTS[n].needs_gpu]
        names = [n for n in names if n not in skipped]
        print(f"no CUDA GPU: figures are CPU smoke values; skipping {skipped}", file=sys.stderr)
    prepare(args.root, TINY if args.tiny else FULL, args.samples)  # once, before the subprocesses

    rows = []
    for name in names:
        cmd = [
            sys.executable,
            __file__,
            "--run-one",
            name,
            "--root",
            str(args.root),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--samples",
            str(args.samples),
        ] + (["--tiny"] if args.tiny else [])
        print(f"== {name}", file=sys.stderr)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not result:
            rows.append({"variant": name, "error": f"exit code {proc.returncode} (see stderr above)"})
        else:
            rows.append(json.loads(result[-1].removeprefix("RESULT ")))
    meta = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "variants": {n: asdict(VARIANTS[n]) for n in names},
    }
    print(table(rows))
    if args.json_out:
        args.json_out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
