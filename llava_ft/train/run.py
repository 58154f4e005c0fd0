"""One training stage, read top to bottom: tokenizer, data (every record and image checked), parts, trainability, fit, save."""

from __future__ import annotations

import json
import logging
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler
from transformers import TrainingArguments, set_seed
from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

from llava_ft.config import ConfigError, RunConfig, global_batch_line, world_size
from llava_ft.data.anyres import ImageTokens
from llava_ft.data.collate import Collator, PackedCollator
from llava_ft.data.dataset import build_dataset
from llava_ft.data.packing import PackedDataset
from llava_ft.data.prepare import default_cache_dir
from llava_ft.data.sampler import LengthGroupedSampler
from llava_ft.data.templates import differs_from_tokenizer, get_template
from llava_ft.data.tokenizer import load_tokenizer
from llava_ft.files import atomic_write_text
from llava_ft.model.build import build_model, check_names
from llava_ft.model.trainability import apply_trainability, log_trainability
from llava_ft.model.vision import image_token_rule
from llava_ft.report import compact_log_history, write_report
from llava_ft.stage import apply_stage_weights, save_stage_output, trained_llm
from llava_ft.train.checkpoint import gathered_trainable
from llava_ft.train.evaluation import EpochBenchmark, eval_dataset
from llava_ft.train.trainer import (
    LlavaTrainer,
    RunTotals,
    checkpoint_folders,
    finished_checkpoint,
    last_checkpoint,
    planned_steps,
    restore_finished,
)
from llava_ft.train.writable import check_writable

log = logging.getLogger("llava_ft")


@dataclass
class StageResult:
    output_dir: Path
    model: torch.nn.Module
    summary: dict
    trainer: LlavaTrainer | None = None


def train(
    cfg: RunConfig,
    *,
    resume: bool | str = False,
    overwrite: bool = False,
    callbacks: list | None = None,
    order: Callable[[Dataset], Sampler] | None = None,
) -> StageResult:
    """One stage. resume: continue from the newest checkpoint-N in the output folder (True) or from the one
    given. overwrite: a fresh run into a folder holding an earlier run's checkpoints removes them; without it
    such a run is refused (their steps would be mixed with this run's by rotation and --resume). order: the
    sampler of the train dataset (samples, or packed rows) instead of the configured one (preflight's
    longest-first)."""
    check_names(cfg)  # scripts that call train() directly fail here too, before anything loads
    started = time.time()
    set_seed(cfg.train.seed)
    out = Path(cfg.train.output_dir)
    # Before the model loads: an unwritable folder would otherwise be found at the first save, or the last.
    check_writable(out, "train.output_dir")
    if cfg.data.cache:
        check_writable(cfg.data.cache_dir or default_cache_dir(), "data.cache_dir")
    folders = checkpoint_folders(out)
    newest = last_checkpoint(out) if folders else None  # warns of each damaged one it passes over
    found = ", ".join(f.name for f in folders)
    if resume is True and newest is None:
        why = f": {found}, none complete (a save cut short); --overwrite without --resume starts again"
        raise FileNotFoundError(f"--resume: no complete checkpoint-N folder in {out}{why if found else ''}")
    resume_from = resume if isinstance(resume, str) else newest if resume else None
    earlier = [] if resume else folders
    if earlier and not overwrite:
        advice = "--resume continues it" if newest else "none complete (a save cut short), nothing to resume"
        raise ConfigError(
            f"{out} holds {found} from an earlier run: {advice}; --overwrite starts again and removes them"
        )

    # 1. Tokenizer + chat template, then the data: records -> conversations -> token ids + labels, every image
    # checked. A bad record or image stops the run here, before the model loads. With the cache on, one
    # process per machine prepares it while the other ranks wait, then load it from the cache.
    if cfg.train.init_from and (llm := trained_llm(cfg.train.init_from)) is not None:
        if Path(cfg.model.llm).resolve() != llm.resolve():
            log.warning(
                "model.llm %s replaced by %s: init_from trained the whole LLM there", cfg.model.llm, llm
            )
            cfg.model.llm = str(llm)
    tokenizer = load_tokenizer(cfg.model.llm)
    template = get_template(cfg.data.template, tokenizer)
    if problem := differs_from_tokenizer(template, tokenizer):
        log.warning("%s", problem)
    # What an image costs in tokens: a fixed count, or with model.vision.anyres the geometry (by image size).
    image_tokens = 0 if cfg.model.vision is None else image_token_rule(cfg.model.vision)
    args = training_arguments(cfg)
    if earlier and args.should_save:
        log.warning("--overwrite: removing the earlier run's %s", ", ".join(f.name for f in earlier))
        for folder in earlier:
            shutil.rmtree(folder)
    first = args.main_process_first(local=True, desc="data preparation") if cfg.data.cache else nullcontext()
    with first:
        dataset, stats = build_dataset(cfg.data, tokenizer, template, image_tokens=image_tokens)
        if len(cfg.data.train) > 1:  # one file's counts were just logged by build_dataset
            log.info("data, all %d files: %s", len(cfg.data.train), stats.summary())
        dataset, held_out, eval_stats = eval_dataset(cfg, dataset, tokenizer, template, image_tokens)

    # 2. Parts: vision tower, projector, LLM (4-bit when asked), loaded whole under ZeRO-3 too (the Trainer
    # partitions the model). Seeded here: the initial weights do not depend on what preparation drew.
    set_seed(cfg.train.seed)
    with unpartitioned_load(args):
        _, model = build_model(cfg, tokenizer=tokenizer)
        # 3. Trainability per component, then the previous stage's trained weights (init_from).
        apply_trainability(model, cfg.trainable, cfg.lora)
        if cfg.train.init_from:
            apply_stage_weights(model, cfg.train.init_from, adapters="init")
    if (model_rule := model_image_tokens(model)) != image_tokens:
        raise RuntimeError(
            f"the vision tower's image tokens are {model_rule}, its config's {image_tokens}: the data was "
            "prepared for the latter"
        )
    dataset.image_processor = model.vision_tower.processor if model.vision_tower is not None else None
    if held_out is not None:
        held_out.image_processor = dataset.image_processor
    train_dataset, collator, sampler = batching(cfg, dataset, tokenizer, order)

    # 4. Fit.
    trainer = LlavaTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=held_out,
        data_collator=collator,
        # Eval batches are padded, also when training packs: each sample's loss as a padded batch gives it.
        eval_collator=Collator(pad_token_id=pad_id(tokenizer)) if cfg.data.packing else None,
        projector_lr=cfg.train.projector_lr,
        vision_lr=cfg.train.vision_lr,
        train_sampler=sampler,
        pad_token_id=pad_id(tokenizer),
        callbacks=callbacks,
    )
    if cfg.train.eval_benchmark is not None:
        trainer.add_callback(EpochBenchmark(trainer, cfg.train.eval_benchmark, tokenizer, template))
    if resume_from is not None:
        log.info("resuming from %s", resume_from)
    if resume_from is not None and finished_checkpoint(resume_from, planned_steps(trainer)):
        # Killed after its last checkpoint: the Trainer would take one step past max_steps before checking it.
        log.info("%s is the last step: writing the stage output from it without training", resume_from)
        result = restore_finished(trainer, resume_from)
    else:
        result = trainer.train(resume_from_checkpoint=resume_from)

    # 5. Save only what trained, with the resolved config and the template.
    summary = {}
    totals = trainer.run_totals(result.metrics.get("train_runtime", 0.0))
    with gathered_trainable(model):
        if trainer.args.should_save:
            save_stage_output(model, cfg, tokenizer, template, out)
            summary = write_summary(
                out, cfg, trainer, result, stats, model, totals, time.time() - started, eval_stats, held_out
            )
            write_report(out, trainer.state.log_history, summary)
    return StageResult(out, model, summary, trainer)


def model_image_tokens(model) -> ImageTokens:
    """The model's image-token rule (a fixed count for a model without `image_tokens`)."""
    return getattr(model, "image_tokens", model.num_image_tokens)


@contextmanager
def unpartitioned_load(args: TrainingArguments) -> Iterator[None]:
    """Parameters created whole although `args` enabled ZeRO-3 (which makes transformers load partitioned):
    trainability, adapters and init_from weights are set on whole parameters, as when the arguments come after
    the model."""
    ds_config = getattr(args, "hf_deepspeed_config", None)
    if ds_config is None:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(ds_config)


def batching(cfg: RunConfig, dataset, tokenizer, order: Callable[[Dataset], Sampler] | None = None):
    """(train dataset, collator, sampler or None) for padded, length-grouped or packed batches; `order` gives
    the sampler of the train dataset when set."""
    pad = pad_id(tokenizer)
    if cfg.data.packing:
        row = cfg.data.pack_length or cfg.data.max_length
        packed = PackedDataset(dataset, dataset.lengths, row, seed=cfg.train.seed)
        log.info("packing into rows of %d tokens: %s", row, packed.stats())
        return packed, PackedCollator(pad_token_id=pad, row_length=row), order(packed) if order else None
    if order is not None:
        return dataset, Collator(pad_token_id=pad), order(dataset)
    sampler = None
    if cfg.data.group_by_length:
        sampler = LengthGroupedSampler(
            dataset.lengths, cfg.train.batch_size * cfg.train.grad_accum, seed=cfg.train.seed
        )
    return dataset, Collator(pad_token_id=pad), sampler


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def training_arguments(cfg: RunConfig) -> TrainingArguments:
    t = cfg.train
    on_gpu = torch.cuda.is_available()
    grad_ckpt = t.gradient_checkpointing
    if grad_ckpt is None:
        grad_ckpt = cfg.trainable.llm == "qlora"
    log.info(global_batch_line(t, world_size()))
    strategy = eval_strategy(cfg)
    return TrainingArguments(
        output_dir=t.output_dir,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        activation_checkpointing=grad_ckpt,
        activation_checkpointing_kwargs={"use_reentrant": False} if grad_ckpt else None,
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=t.save_steps if t.save_steps > 0 else 500,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        bf16=on_gpu and cfg.model.dtype in ("auto", "bfloat16"),
        use_cpu=not on_gpu,
        report_to=[] if t.report_to == "none" else [t.report_to],
        remove_unused_columns=False,
        dataloader_num_workers=t.dataloader_workers,
        deepspeed=t.deepspeed,
        disable_tqdm=False,
        eval_strategy=strategy,
        eval_steps=t.eval_steps if strategy == "steps" else None,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        prediction_loss_only=True,  # the loss alone: no logits gathered over the vocabulary
    )


def eval_strategy(cfg: RunConfig) -> str:
    """The Trainer's eval_strategy for train.eval_strategy: auto evaluates when there is an eval set, every
    eval_steps steps when that is set, else at each epoch end."""
    t = cfg.train
    if t.eval_strategy != "auto":
        return t.eval_strategy
    if not cfg.data.eval and cfg.data.val_size is None:
        return "no"
    return "steps" if t.eval_steps > 0 else "epoch"


def write_summary(
    out: Path,
    cfg: RunConfig,
    trainer,
    result,
    stats,
    model,
    totals: RunTotals,
    wall_s: float,
    eval_stats=None,
    held_out=None,
) -> dict:
    """summary.json; totals: the whole run's, all processes together and sessions before a --resume included."""
    history = [h for h in trainer.state.log_history if "loss" in h]
    counts, runtime = totals.counts, totals.runtime_s
    summary = {
        "name": cfg.name,
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "samples": counts["samples"],
        "tokens": counts["real"],
        "tokens_trained": counts["trained"],
        "pad_share": 1 - counts["real"] / counts["slots"] if counts["slots"] else 0.0,
        "tokens_per_s": counts["real"] / runtime if runtime else None,
        "samples_per_s": counts["samples"] / runtime if runtime else None,
        "train_runtime_s": round(runtime, 1),
        "wall_s": round(wall_s, 1),
        # Samples trained in place of one whose image failed to load mid-run (data.skip_bad), the first named.
        "image_faults": {"count": totals.image_faults, "replaced": totals.named_faults},
        "peak_memory_mb": peak_memory_mb(),
        "params": log_trainability(model, cfg.trainable),
        "data": stats.as_dict() if hasattr(stats, "as_dict") else str(stats.summary()),
        "loss_history": [{"step": h["step"], "loss": h["loss"]} for h in history],
        # What report.png draws, so that `python -m llava_ft.report` redraws it without a checkpoint-N.
        "log_history": compact_log_history(trainer.state.log_history),
    }
    if held_out is not None or cfg.train.eval_benchmark is not None:
        summary["eval"] = eval_summary(cfg, trainer.state.log_history, eval_stats, held_out)
    atomic_write_text(out / "summary.json", summary_json(summary))
    log.info(
        "summary: steps %d, %s, %.0f tokens/s, %.0fs",
        summary["steps"],
        loss_line(summary, cfg.train.logging_steps),
        summary["tokens_per_s"] or 0,
        wall_s,
    )
    return summary


def eval_summary(cfg: RunConfig, log_history: list[dict], eval_stats, held_out) -> dict:
    """summary.json's "eval": the eval set (its counts as data.train's), the last eval loss and every eval
    step's loss, and the benchmark's metrics per epoch end."""
    losses = [{"step": h["step"], "loss": h["eval_loss"]} for h in log_history if "eval_loss" in h]
    out: dict = {"loss": losses[-1]["loss"] if losses else None, "steps": losses}
    if cfg.data.eval:
        out["data"] = {"samples": len(held_out), **eval_stats.as_dict()}
    elif held_out is not None:
        out["data"] = {"samples": len(held_out), "val_size": cfg.data.val_size, "seed": cfg.train.seed}
    bench = cfg.train.eval_benchmark
    if bench is not None:
        key = f"eval_{bench.kind}_accuracy"
        rows = [
            {"step": h["step"], **{k: v for k, v in h.items() if k.startswith(f"eval_{bench.kind}_")}}
            for h in log_history
            if key in h
        ]
        out["benchmark"] = {
            "kind": bench.kind,
            "data": bench.data,
            "limit": bench.limit,
            "accuracy": rows[-1][key] if rows else None,
            "epochs": rows,
        }
    return out


def loss_line(summary: dict, logging_steps: int) -> str:
    """'loss A -> B', or why there is none: the Trainer logs a loss only every logging_steps steps."""
    if summary["first_loss"] is not None:
        return f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}"
    if logging_steps > summary["steps"]:
        return f"no loss logged (logging_steps {logging_steps} > {summary['steps']} steps)"
    return "no loss logged"


def summary_json(summary: dict) -> str:
    """summary.json, indented, with each history row on one line (a long run logs thousands of rows)."""
    fields = []
    for key, value in summary.items():
        if key.endswith("_history") and value:
            text = "[\n" + ",\n".join(f"    {json.dumps(row)}" for row in value) + "\n  ]"
        else:
            text = json.dumps(value, indent=2).replace("\n", "\n  ")
        fields.append(f"  {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(fields) + "\n}\n"


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
