"""Trainer callbacks for tests: runs cut short at a chosen step, as a kill after a checkpoint would leave them."""

from __future__ import annotations

from transformers import TrainerCallback


class StopAt(TrainerCallback):
    """Ends training after optimizer step `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
