"""transformers' Trainer owns the loop, accumulation, resume and DeepSpeed; this subclass only adds what a
LLaVA model needs: a projector learning rate, trainable-only checkpoints, and our samplers."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from transformers import Trainer

from llava_ft.train.checkpoint import TRAINABLE_NAME, load_trainable, save_trainable

log = logging.getLogger("llava_ft")


class LlavaTrainer(Trainer):
    def __init__(
        self, *args, projector_lr: float | None = None, train_sampler=None, pad_token_id: int = 0, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.projector_lr = projector_lr
        self._train_sampler = train_sampler
        self.pad_token_id = pad_token_id
        self.token_counts = {"slots": 0, "real": 0, "trained": 0, "samples": 0}

    def _get_train_sampler(self, train_dataset=None):
        if self._train_sampler is not None:
            return self._train_sampler
        return super()._get_train_sampler(train_dataset)

    def create_optimizer(self, model=None):
        """AdamW with the projector in its own parameter group when it has its own learning rate."""
        if self.optimizer is not None or self.projector_lr is None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in opt_model.named_parameters():
            if p.requires_grad:
                groups.setdefault((name.startswith("projector."), name in decay), []).append(p)
        param_groups = []
        for (is_projector, decays), params in groups.items():
            group = {"params": params, "weight_decay": self.args.weight_decay if decays else 0.0}
            if is_projector:
                group["lr"] = self.projector_lr
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

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        path = os.path.join(resume_from_checkpoint, TRAINABLE_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{resume_from_checkpoint}: no {TRAINABLE_NAME}; not a llava_ft checkpoint")
        load_trainable(model or self.model, Path(resume_from_checkpoint))
        log.info("resumed trainable weights from %s", resume_from_checkpoint)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
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
        else:  # packed rows: the padding segment holds pad ids only
            real = ids != self.pad_token_id
            counts["real"] += int(real.sum())
            counts["samples"] += int(((inputs["position_ids"] == 0) & real).sum())
        counts["trained"] += int((inputs["labels"] != -100).sum())


def last_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint-N folder (one with trainer_state.json, written after the weights)."""
    if not os.path.isdir(output_dir):
        return None
    best = None
    for name in os.listdir(output_dir):
        if name.startswith("checkpoint-") and name[len("checkpoint-") :].isdigit():
            folder = os.path.join(output_dir, name)
            if os.path.isfile(os.path.join(folder, "trainer_state.json")) and os.path.isfile(
                os.path.join(folder, TRAINABLE_NAME)
            ):
                step = int(name[len("checkpoint-") :])
                if best is None or step > best[0]:
                    best = (step, folder)
    return best[1] if best else None
