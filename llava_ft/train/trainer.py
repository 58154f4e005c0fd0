"""transformers' Trainer owns the loop, accumulation, resume and DeepSpeed; this subclass only adds what a
LLaVA model needs: projector and vision tower learning rates, trainable-only checkpoints, our samplers, and the
run's totals (tokens, runtime, samples replaced for a failed image) kept across --resume."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import gather_object
from safetensors import SafetensorError, safe_open
from transformers import ProgressCallback, Trainer, TrainerCallback, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, sort_checkpoints

from llava_ft.config import ConfigError
from llava_ft.data.faults import IMAGE_FAULTS, Fault, ImageFault
from llava_ft.errors import is_disk_full
from llava_ft.files import disk_full
from llava_ft.train.checkpoint import TRAINABLE_NAME, load_trainable, save_trainable

log = logging.getLogger("llava_ft")

RUN_TOTALS = "LlavaRunTotals"
"""Entry of trainer_state.json's stateful_callbacks holding `RunTotals`: written with the Trainer's own state, so a
checkpoint that loads has them."""
MAX_NAMED_FAULTS = 1000
"""Replaced samples named in checkpoints and summary.json (all are counted, and logged as they happen)."""


@dataclass
class RunTotals:
    """A run's totals over all processes and every session of it (--resume adds to a checkpoint's)."""

    counts: dict[str, int] = field(default_factory=dict)
    """Token counts: slots (padding included), real, trained, samples."""
    runtime_s: float = 0.0
    image_faults: int = 0
    """Samples replaced because an image failed to load (data.skip_bad)."""
    named_faults: list[Fault] = field(default_factory=list)

    @classmethod
    def of(cls, state: TrainerState) -> RunTotals:
        """The totals a checkpoint's trainer state holds; zero for one written without them."""
        stored = state.stateful_callbacks.get(RUN_TOTALS)
        return cls(**stored) if isinstance(stored, dict) else cls()


class LlavaTrainer(Trainer):
    def __init__(
        self,
        *args,
        projector_lr: float | None = None,
        vision_lr: float | None = None,
        train_sampler=None,
        pad_token_id: int = 0,
        eval_collator=None,
        **kwargs,
    ):
        """eval_collator: batches of the eval set (padded), when the train collator packs."""
        super().__init__(*args, **kwargs)
        self.projector_lr = projector_lr
        self.vision_lr = vision_lr
        self.eval_collator = eval_collator
        self._train_sampler = train_sampler
        self.pad_token_id = pad_token_id
        self.token_counts = {"slots": 0, "real": 0, "trained": 0, "samples": 0}
        self.image_faults: list[Fault] = []  # this process's, this session's (MAX_NAMED_FAULTS at most)
        self.image_fault_count = 0
        self.earlier = RunTotals()  # the checkpoint's, when resuming
        self._session_started = time.time()
        if hasattr(self.train_dataset, "set_epoch"):
            self.add_callback(DatasetEpoch(self.train_dataset))

    def train(self, resume_from_checkpoint: str | None = None, *args, **kwargs):
        if isinstance(resume_from_checkpoint, str):
            state = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, "trainer_state.json"))
            self.earlier = RunTotals.of(state)
        self._session_started = time.time()
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        except ImageFault as fault:  # without data.skip_bad: say how to go on
            self._close_progress_bar()
            raise ImageFault(fault.where, fault.image, f"{fault.reason} ({self._after_fault()})") from fault

    def _close_progress_bar(self) -> None:
        """Ends the progress bar's line, which the Trainer leaves open on an exception: the error that follows
        then starts a line of its own."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ProgressCallback) and callback.training_bar is not None:
                callback.training_bar.close()
                callback.training_bar = None

    def _after_fault(self) -> str:
        instead = "data.skip_bad trains another sample in place of such a one"
        if (checkpoint := last_checkpoint(self.args.output_dir)) is None:
            return f"no checkpoint-N saved yet: fix the file and run again; {instead}"
        return f"fix the file, then --resume continues from {Path(checkpoint).name}; {instead}"

    def get_eval_dataloader(self, eval_dataset=None):
        if self.eval_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator, self.data_collator = self.data_collator, self.eval_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def _get_train_sampler(self, train_dataset=None):
        if self._train_sampler is not None:
            return self._train_sampler
        return super()._get_train_sampler(train_dataset)

    def create_optimizer(self, model=None):
        """AdamW with the projector and the vision tower each in parameter groups of their own when they have
        their own learning rate."""
        own_lr = {"projector.": self.projector_lr, "vision_tower.": self.vision_lr}
        own_lr = {prefix: lr for prefix, lr in own_lr.items() if lr is not None}
        if self.optimizer is not None or not own_lr:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[str | None, bool], list] = {}
        for name, p in opt_model.named_parameters():
            if p.requires_grad:
                part = next((prefix for prefix in own_lr if name.startswith(prefix)), None)
                groups.setdefault((part, name in decay), []).append(p)
        param_groups = []
        for (part, decays), params in groups.items():
            group = {"params": params, "weight_decay": self.args.weight_decay if decays else 0.0}
            if part is not None:
                group["lr"] = own_lr[part]
            param_groups.append(group)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # Intermediate checkpoints hold the trainable parameters only (the frozen base is re-read from disk).
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        # Under DeepSpeed the Trainer hands over the consolidated state dict (ZeRO-3 shards the parameters).
        save_trainable(self.model, Path(output_dir), state_dict=state_dict)

    def _save_checkpoint(self, model, trial) -> None:
        # On every rank (the totals are summed over processes), before the Trainer writes its state with them.
        totals = self.run_totals(time.time() - self._session_started)
        self.state.stateful_callbacks[RUN_TOTALS] = asdict(totals)
        try:
            super()._save_checkpoint(model, trial)
        except (RuntimeError, OSError) as e:
            if not is_disk_full(e):
                raise
            raise disk_full(Path(self.args.output_dir)) from None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        path = os.path.join(resume_from_checkpoint, TRAINABLE_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{resume_from_checkpoint}: no {TRAINABLE_NAME}; not a llava_ft checkpoint")
        load_trainable(model or self.model, Path(resume_from_checkpoint))
        log.info("resumed trainable weights from %s", resume_from_checkpoint)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        faults = inputs.pop(IMAGE_FAULTS, [])  # the collators' report, not a model input
        if model.training:  # the run's totals count trained batches, not the eval loop's
            self._note_faults(faults)
            self._count_tokens(inputs)
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    def _count_tokens(self, inputs) -> None:
        """Token counts for throughput figures: slots (padding included), real tokens, trained tokens, samples."""
        counts = self.token_counts
        ids = inputs["input_ids"]
        counts["slots"] += ids.numel()
        if inputs.get("attention_mask") is not None:
            counts["real"] += int(inputs["attention_mask"].sum())
            counts["samples"] += ids.shape[0]
        else:
            real, samples = packed_counts(ids, inputs["labels"], inputs["position_ids"], self.pad_token_id)
            counts["real"] += real
            counts["samples"] += samples
        counts["trained"] += int((inputs["labels"] != -100).sum())

    def _note_faults(self, faults: list[Fault]) -> None:
        for fault in faults:
            log.warning(
                "%s: image %s: %s; trained %s in its place (data.skip_bad)",
                fault["record"],
                fault["image"],
                fault["problem"],
                fault["replaced_by"],
            )
            self.image_fault_count += 1
            if len(self.image_faults) < MAX_NAMED_FAULTS:
                self.image_faults.append(fault)

    def _summed(self, values: dict[str, int]) -> dict[str, int]:
        """values summed over all processes (each counts only the batches it ran). Every rank must call it."""
        keys = sorted(values)
        counts = torch.tensor([values[k] for k in keys], dtype=torch.int64, device=self.args.device)
        total = self.accelerator.reduce(counts, reduction="sum")  # itself when there is one process
        return dict(zip(keys, total.tolist(), strict=True))

    def run_totals(self, runtime_s: float) -> RunTotals:
        """The run's totals, this session's `runtime_s` added to the checkpoint's. Every rank must call it."""
        summed = self._summed({**self.token_counts, "image_faults": self.image_fault_count})
        faults = summed.pop("image_faults")
        # gather_object: every process's list, concatenated (the list itself when there is one process).
        named = self.earlier.named_faults + gather_object(self.image_faults)
        return RunTotals(
            counts={k: v + self.earlier.counts.get(k, 0) for k, v in summed.items()},
            runtime_s=self.earlier.runtime_s + runtime_s,
            image_faults=self.earlier.image_faults + faults,
            named_faults=named[:MAX_NAMED_FAULTS],
        )


class DatasetEpoch(TrainerCallback):
    """Tells an epoch-dependent dataset (packed rows, re-planned per epoch) which epoch starts. accelerate
    forwards set_epoch to the dataset only for some loader shapes, and the batch-skipping loader of a resumed
    epoch is not one: that epoch would train on epoch 0's rows. The epoch is computed as the Trainer does."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        steps_per_epoch = max(1, math.ceil(len(train_dataloader) / args.gradient_accumulation_steps))
        self.dataset.set_epoch(state.global_step // steps_per_epoch)


def packed_counts(ids, labels, position_ids, pad_token_id: int) -> tuple[int, int]:
    """(real tokens, samples) of packed rows. Each sample's positions start at 0; a row shorter than the batch
    ends with a padding segment (positions from 0 again, pad ids, no labels). Only that last segment is padding:
    pad ids inside samples are real tokens (the pad id is often EOS, which samples end with)."""
    real, samples = 0, 0
    for row_ids, row_labels, row_pos in zip(ids, labels, position_ids, strict=True):
        starts = (row_pos == 0).nonzero().flatten().tolist()
        last = starts[-1]
        padding = bool((row_ids[last:] == pad_token_id).all() and (row_labels[last:] == -100).all())
        real += last if padding else len(row_ids)
        samples += len(starts) - padding
    return real, samples


def planned_steps(trainer: Trainer) -> int:
    """This run's optimiser steps, as the Trainer computes them (max_steps, else epochs x steps per epoch)."""
    return trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]


def finished_checkpoint(checkpoint: str, max_steps: int) -> bool:
    """Whether a checkpoint already holds this run's last step (the Trainer, resumed there, would take one step
    more). The checkpoint's own max_steps does not count: a resume may extend the run (more steps or epochs)."""
    step = json.loads(Path(checkpoint, "trainer_state.json").read_text())["global_step"]
    if step > max_steps:
        raise ConfigError(
            f"--resume: {checkpoint} is at step {step}, past this run's {max_steps} steps; resume from an "
            "earlier checkpoint-N or raise train.max_steps / train.epochs"
        )
    return step == max_steps


def restore_finished(trainer: LlavaTrainer, checkpoint: str) -> TrainOutput:
    """The trainer as it stood at a finished checkpoint (weights, state and log history), for the stage output."""
    trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    trainer.earlier = RunTotals.of(trainer.state)
    trainer._load_from_checkpoint(checkpoint)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return TrainOutput(trainer.state.global_step, sum(losses) / len(losses) if losses else float("nan"), {})


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """Every checkpoint-N folder in output_dir (complete or not), oldest first: the Trainer's own listing, held to
    the names get_last_checkpoint takes (a "checkpoint-3-old" copy is not one)."""
    return [Path(p) for p in sort_checkpoints(str(output_dir)) if _CHECKPOINT_NAME.fullmatch(Path(p).name)]


_CHECKPOINT_NAME = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-\d+")


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete checkpoint-N folder that loads. The Trainer writes trainer_state.json after the
    weights, so a save cut short leaves a folder without it, which is passed over for the one before; a folder
    whose trainer state does not parse or whose weights do not read (a kill mid-write, a full disk) is passed
    over too, with a warning naming it."""
    for folder in reversed(checkpoint_folders(output_dir)):
        state, weights = folder / "trainer_state.json", folder / TRAINABLE_NAME
        if not (state.is_file() and weights.is_file()):
            continue
        problem = _damage(state, weights)
        if problem is None:
            return str(folder)
        log.warning("%s: %s; resuming from the checkpoint before it", folder, problem)
    return None


def _damage(state: Path, weights: Path) -> str | None:
    """What keeps a checkpoint from loading, read cheaply: the trainer state's JSON and the weights' header."""
    try:
        if not isinstance(json.loads(state.read_text()), dict):
            return f"{state.name} is not a JSON object"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"{state.name} does not parse ({e})"
    try:
        with safe_open(str(weights), framework="pt"):
            pass
    except SafetensorError as e:
        return f"{weights.name} does not read ({e})"
    return None
