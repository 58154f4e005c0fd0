"""`llava-ft train CONFIG --preflight`: the real run's first minutes, on its hardest batches, then an estimate.

It runs `train()` on a copy of the config that writes into a temporary folder (removed at the end, also on a
failure): the data and images are checked, two optimizer steps train on the longest samples (or the fullest
packed rows), the stage output is saved, reloaded and asked one question. The prepared-data cache is the real
one, so the real run reuses it; the real output folder is neither created nor changed.
"""

from __future__ import annotations

import copy
import gc
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import torch
from torch.utils.data import Dataset, Sampler
from transformers import TrainerCallback

from llava_ft.config import ConfigError, RunConfig
from llava_ft.data.dataset import SFTDataset, table_column
from llava_ft.data.images import load_image
from llava_ft.data.packing import PackedDataset
from llava_ft.inference import Assistant, Query
from llava_ft.train.run import train
from llava_ft.train.writable import check_writable

STEPS = 2
"""The first step pays warm-up (allocator, kernels, lazy initialisation); the second is the one timed."""
IMAGE_QUESTION = "Describe the image."
TEXT_QUESTION = "Hello! Who are you?"
MAX_NEW_TOKENS = 16


@dataclass
class PreflightReport:
    step_s: float
    """Wall time of one optimizer step on the longest samples: the second step (data loading included)."""
    first_step_s: float
    """The first step, warm-up included."""
    peak_memory_mb: float
    """Peak during the steps: RSS on CPU, torch.cuda.max_memory_allocated on GPU."""
    on_gpu: bool
    planned_steps: int
    """The real run's optimizer steps, as the Trainer computes them (data, epochs or max_steps, batch, world)."""
    timed_lengths: list[int]
    """Full lengths (image tokens included) of the samples or packed rows of the two steps, in step order."""
    trained_tokens: int
    """Real (not padding) tokens the two steps trained on, as the trainer counted them."""
    mean_length: float
    """Mean full length of all samples (or packed rows) of the real run."""
    largest_tokens: int
    """Full length of the longest sample (image tokens included); the timed items are at least as long."""
    largest_image_tokens: int
    """Of them, image tokens."""
    packed: bool
    question: str
    image: str | None
    answer: str

    @property
    def timed_mean(self) -> float:
        return sum(self.timed_lengths) / len(self.timed_lengths)

    @property
    def hours(self) -> float:
        """Upper bound for the real run: every step as long as one on the longest samples."""
        return self.planned_steps * self.step_s / 3600

    @property
    def token_hours(self) -> float:
        """The run's time in proportion to tokens: the bound scaled by mean length / mean timed length."""
        return self.hours * min(1.0, self.mean_length / self.timed_mean)

    def lines(self) -> list[str]:
        memory = "GPU max allocated" if self.on_gpu else "RSS"
        image = f" on {self.image}" if self.image else ""
        items = "fullest packed rows" if self.packed else "longest samples"
        answer = self.answer.replace("\\", "\\\\").replace("\n", "\\n")
        return [
            f"preflight: {STEPS} optimizer steps on the {items} (full lengths "
            f"{max(self.timed_lengths)} to {min(self.timed_lengths)}), saved, reloaded, answered",
            f"step time: {self.step_s:.4g} s per optimizer step (the second; the first took {self.first_step_s:.4g} s)",
            f"peak memory: {self.peak_memory_mb:.0f} MB ({memory}, at the longest samples)",
            f"largest sample: {self.largest_tokens} tokens ({self.largest_image_tokens} image + "
            f"{self.largest_tokens - self.largest_image_tokens} text); the peak memory above covers it (the timed "
            f"{items} are at least as long)",
            f"question{image}: {self.question}",
            f"answer: {answer}",
            f"estimate: {self.planned_steps} optimizer steps x {self.step_s:.4g} s = {self.hours:.4g} h at most "
            f"(every step as long as on the {items}); about {self.token_hours:.4g} h in proportion to "
            f"tokens (mean length {self.mean_length:.0f} / timed {self.timed_mean:.0f})",
        ]


def preflight(cfg: RunConfig, *, temp_root: str | Path | None = None) -> PreflightReport:
    """Two optimizer steps of `cfg` on its longest samples, into a temporary folder under `temp_root` (the
    system's temporary folder by default, see TMPDIR), a reload and one answer; the estimate for the real run."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--preflight runs in one process: start it without torchrun")
    # train() below writes only to the temporary folder: the real run's output folder is checked here.
    check_writable(cfg.train.output_dir, "train.output_dir")
    order = LongestFirst()
    timer = StepTimer()
    with tempfile.TemporaryDirectory(
        prefix="llava-ft-preflight-", dir=temp_root, ignore_cleanup_errors=True
    ) as temp:
        trial = trial_config(cfg, Path(temp) / "out")
        result = train(trial, callbacks=[timer], order=order)
        steps = real_planned_steps(result.trainer, cfg)
        peak, tokens = result.summary["peak_memory_mb"], result.summary["tokens"]
        del result  # the trained model and optimizer go before the reload: two copies may not fit
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        assistant = Assistant.load(trial.train.output_dir)
        image = first_image(order.dataset) if assistant.has_vision else None
        query = Query(IMAGE_QUESTION, load_image(image)) if image else Query(TEXT_QUESTION)
        answer = assistant.generate([query], max_new_tokens=MAX_NEW_TOKENS)[0]
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    lengths = order.lengths
    largest, largest_image = largest_sample(order.dataset)
    return PreflightReport(
        step_s=timer.step_s,
        first_step_s=timer.times[0],
        peak_memory_mb=peak,
        on_gpu=torch.cuda.is_available(),
        planned_steps=steps,
        timed_lengths=[lengths[i] for i in order.indices[: STEPS * per_step]],
        trained_tokens=tokens,
        mean_length=sum(lengths) / len(lengths),
        largest_tokens=largest,
        largest_image_tokens=largest_image,
        packed=isinstance(order.dataset, PackedDataset),
        question=query.question,
        image=str(image) if image else None,
        answer=answer,
    )


def trial_config(cfg: RunConfig, out: Path) -> RunConfig:
    """A copy of cfg that trains two steps into `out`, logs each step and reports nowhere; it saves a checkpoint
    when the real run does (the save path is part of what is checked)."""
    trial = copy.deepcopy(cfg)
    trial.train.output_dir = str(out)
    trial.train.max_steps = STEPS
    trial.train.save_steps = STEPS if cfg.train.save_steps > 0 else 0
    trial.train.logging_steps = 1
    trial.train.report_to = "none"
    return trial


def real_planned_steps(trainer, cfg: RunConfig) -> int:
    """The real run's optimizer steps: the Trainer's own count on this data, with the real epochs and max_steps
    (batch size, accumulation and world size are the trial's, equal to the real run's)."""
    args = copy.copy(trainer.args)
    args.max_steps = cfg.train.max_steps
    args.num_train_epochs = cfg.train.epochs
    return trainer.set_initial_training_values(args, trainer.get_train_dataloader())[-1]


def item_lengths(dataset: Dataset) -> list[int]:
    """Full length of each item the Trainer draws: a sample (image tokens included) or a packed row's load."""
    if isinstance(dataset, PackedDataset):
        return [sum(dataset.lengths[j] for j in row) for row in dataset.rows]
    return list(dataset.lengths)


def largest_sample(dataset: Dataset | None) -> tuple[int, int]:
    """(full length, image tokens) of the longest sample of the train data (inside packed rows too); (0, 0)
    for data that is no SFTDataset."""
    if isinstance(dataset, PackedDataset):
        dataset = dataset.dataset
    if not isinstance(dataset, SFTDataset) or not len(dataset):
        return 0, 0
    lengths = dataset.lengths
    i = max(range(len(lengths)), key=lengths.__getitem__)
    return lengths[i], dataset.image_token_totals()[i]


class LongestFirst:
    """The `order` hook of train(): a sampler of the train dataset, longest item first (ties by index). The
    dataset and its order are kept for the report."""

    def __init__(self):
        self.dataset: Dataset | None = None
        self.lengths: list[int] = []
        self.indices: list[int] = []

    def __call__(self, dataset: Dataset) -> Sampler[int]:
        self.dataset = dataset
        self.lengths = item_lengths(dataset)
        self.indices = sorted(range(len(self.lengths)), key=lambda i: -self.lengths[i])
        return _FixedOrder(self.indices)


class _FixedOrder(Sampler[int]):
    def __init__(self, indices: list[int]):
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class StepTimer(TrainerCallback):
    """Wall time per optimizer step: the first from its start, each later one from the end of the step before,
    so that fetching its batches (images decoded) counts."""

    def __init__(self):
        self.times: list[float] = []
        self._last: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._last is None:
            self._last = _now()

    def on_step_end(self, args, state, control, **kwargs):
        now = _now()
        self.times.append(now - self._last)
        self._last = now

    @property
    def step_s(self) -> float:
        return self.times[1] if len(self.times) > 1 else self.times[0]


def _now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the step's kernels finish inside its time
    return time.perf_counter()


def first_image(dataset: Dataset | None) -> Path | None:
    """The first image the train data refers to, or None for text-only data."""
    if isinstance(dataset, PackedDataset):
        dataset = dataset.dataset
    if not isinstance(dataset, SFTDataset):
        return None
    for table, folder in zip(dataset.tables, dataset.folders, strict=True):
        column = table_column(table, "images")
        counts = pa.compute.list_value_length(column).to_numpy(zero_copy_only=False)
        hits = (counts > 0).nonzero()[0]
        if len(hits):
            return folder / column[int(hits[0])][0].as_py()
    return None
