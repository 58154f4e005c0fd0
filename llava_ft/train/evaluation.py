"""Validation during training: the eval set (data.eval files, or data.val_size split off data.train) whose loss
the Trainer's own eval loop computes, and the benchmark scored at each epoch end by llava_ft.eval's code on the
model in training."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
from accelerate.utils import broadcast_object_list
from transformers import TrainerCallback

from llava_ft.config import ConfigError, EvalBenchmarkSection, RunConfig
from llava_ft.data.anyres import ImageTokens
from llava_ft.data.dataset import SFTDataset, build_dataset
from llava_ft.data.tokenize import EncodeStats
from llava_ft.eval import mmbench, pope, vqa
from llava_ft.eval.runner import Predictor
from llava_ft.inference import Assistant

log = logging.getLogger("llava_ft")

BENCHMARK_FOLDER = "eval_benchmark"
"""Under the output folder: one folder per scored step (step-N) with the eval scripts' predictions and results."""


def eval_dataset(
    cfg: RunConfig, train: SFTDataset, tokenizer, template, image_tokens: ImageTokens
) -> tuple[SFTDataset, SFTDataset | None, EncodeStats | None]:
    """(train dataset, eval dataset or None, the eval files' counts or None). data.eval files are prepared
    through the same cache as data.train; data.val_size takes its samples out of `train`."""
    if cfg.data.eval:
        data = dataclasses.replace(cfg.data, train=cfg.data.eval)
        dataset, stats = build_dataset(data, tokenizer, template, image_tokens=image_tokens)
        log.info("eval data, %d file(s): %s", len(cfg.data.eval), stats.summary())
        return train, dataset, stats
    if cfg.data.val_size is not None:
        rest, held = split_off(train, cfg.data.val_size, cfg.train.seed)
        log.info(
            "data.val_size: %d of %d training samples held out for evaluation (seed %d)",
            len(held),
            len(train),
            cfg.train.seed,
        )
        return rest, held, None
    return train, None, None


def split_off(dataset: SFTDataset, size: int | float, seed: int) -> tuple[SFTDataset, SFTDataset]:
    """(the rest, `size` samples drawn by `seed`): a count, or a fraction of the samples (at least one). Both keep
    the original order."""
    n = len(dataset)
    k = max(1, round(size * n)) if isinstance(size, float) else size
    if k >= n:
        raise ConfigError(f"data.val_size {size} leaves no training samples ({n} in data.train)")
    order = np.random.default_rng(seed).permutation(n)
    return _subset(dataset, np.sort(order[k:])), _subset(dataset, np.sort(order[:k]))


def _subset(dataset: SFTDataset, indices: np.ndarray) -> SFTDataset:
    parts = []
    for p, (table, folder) in enumerate(zip(dataset.tables, dataset.folders, strict=True)):
        lo, hi = dataset.starts[p], dataset.starts[p + 1]
        local = indices[(indices >= lo) & (indices < hi)] - lo
        parts.append((table.select(local.tolist()), folder))
    return SFTDataset(parts, image_processor=dataset.image_processor, skip_bad=dataset.skip_bad)


def score_benchmark(bench: EvalBenchmarkSection, assistant, output: Path, label: str) -> dict[str, float]:
    """Ask `assistant` the benchmark's questions and score them with `llava-ft eval`'s code; the eval scripts'
    predictions.jsonl, results.json and results.md go to `output` (emptied first: the runner would resume
    from answers a previous model gave). Returns the metrics to log, eval_<kind>_accuracy first."""
    if output.exists():
        shutil.rmtree(output)
    predictor = Predictor(assistant, label, batch_size=bench.batch_size, max_new_tokens=bench.max_new_tokens)
    suffix = {} if bench.prompt_suffix is None else {"suffix": bench.prompt_suffix}
    if bench.kind == "mmbench":
        results = mmbench.run_mmbench(
            bench.data, output, predictor=predictor, limit=bench.limit, circular=bench.circular
        )
    elif bench.kind == "pope":
        results = pope.run_pope(
            bench.data, bench.images, output, predictor=predictor, limit=bench.limit, **suffix
        )
    else:
        results = vqa.run_vqa(
            bench.data, bench.images, output, predictor=predictor, limit=bench.limit, **suffix
        )
    kind = bench.kind
    metrics = {f"eval_{kind}_accuracy": float(results["headline"]["value"])}
    if kind == "mmbench":
        for name, score in results["scores"].items():  # circular (with rotations), single_all, single_main
            metrics[f"eval_{kind}_{name}_accuracy"] = float(score["value"])
    elif kind == "vqa":
        metrics[f"eval_{kind}_exact_match_accuracy"] = float(results["exact_match"]["value"])
    return metrics


class EpochBenchmark(TrainerCallback):
    """Scores the benchmark at each epoch end on the model in training (eval mode, then back to train mode) on
    the first process; every process then logs the same metrics through Trainer.log, so they reach the log
    history, summary.json and tensorboard like the Trainer's own eval_* values."""

    def __init__(self, trainer, bench: EvalBenchmarkSection, tokenizer, template):
        self.trainer = trainer
        self.bench = bench
        self.tokenizer = tokenizer
        self.template = template

    def on_epoch_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        step = state.global_step
        metrics: list[dict | None] = [None]
        if trainer.is_world_process_zero():
            model = trainer.model
            was_training = model.training
            output = Path(args.output_dir) / BENCHMARK_FOLDER / f"step-{step}"
            try:
                assistant = Assistant(model, self.tokenizer, self.template, args.device)
                metrics[0] = score_benchmark(self.bench, assistant, output, f"{args.output_dir}@step-{step}")
            finally:
                model.train(was_training)
            log.info("benchmark %s at step %d: %s (%s)", self.bench.kind, step, _fmt(metrics[0]), output)
        if args.world_size > 1:
            broadcast_object_list(metrics, from_process=0)
        trainer.log(metrics[0])
        return control


def _fmt(metrics: dict[str, float] | None) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in (metrics or {}).items())
