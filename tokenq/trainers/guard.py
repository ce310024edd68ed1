"""Divergence is an error, not a checkpoint.

transformers' `Trainer` trains on through a NaN / inf loss: it drops the value from its running mean (the log
shows `loss 0`), the optimiser writes NaN into every weight, and the run saves them and exits 0.
`DivergenceGuard` looks at every optimiser step before the optimiser runs: the step's loss terms and its
gradients (every process's, reduced, so all processes decide alike). A non-finite step raises
`TrainingDiverged` (the step, the terms that went non-finite, the last finite logged values, what to try)
before the weights change, unless `max_nonfinite_steps` allows skipping it: then the gradients are dropped
(the optimiser leaves every weight as it is) and the step's terms are left out of the logs. Weights that
became non-finite anyway (an update too large for the dtype) are caught at the next save
(`check_finite_weights`), so nothing non-finite is ever written.
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

from tokenq.checkpoint_checks import listed, nonfinite_names

logger = logging.getLogger(__name__)


class TrainingDiverged(FloatingPointError):
    """Training produced a non-finite loss, gradient or weight."""


ADVICE = ("lower --learning_rate (or --head_learning_rate), clip gradients (--max_grad_norm 1.0), z-score large rewards "
          "(--reward_normalization zscore), train in float32; or let up to N bad batches be skipped with "
          "--max_nonfinite_steps N")


def check_finite_weights(named: dict[str, torch.Tensor], where: str) -> None:
    """Raise `TrainingDiverged` naming the tensors of `named` with NaN / inf values (`where`: what is being saved)."""
    bad = nonfinite_names(named)
    if bad:
        raise TrainingDiverged(f"refusing to save {where}: {len(bad)} weight tensor(s) hold NaN / inf ({listed(bad)}): "
                               f"training diverged. Try: {ADVICE}")


def _describe(bad_terms: list[str], bad_grads: list[str]) -> str:
    """What went non-finite in a step, for the message."""
    grads = f"gradients of {len(bad_grads)} tensor(s) ({listed(bad_grads, 3)})" if bad_grads else ""
    if bad_terms:
        return f"loss term(s) {', '.join(bad_terms)}" + (f"; {grads}" if grads else "")
    return f"{grads} (the loss terms were finite)" if grads else "loss or gradients on another process"


class DivergenceGuard(TrainerCallback):
    """Checks each optimiser step of `trainer` (a `TokenQTrainer`) before the optimiser runs; see the module
    docstring. `trainer.step_terms()` gives the step's recorded loss terms; `trainer.keep_step(kept)` files
    them into (or out of) the next log line."""

    def __init__(self, trainer, max_nonfinite_steps: int) -> None:
        self.trainer, self.max_nonfinite_steps, self.skipped = trainer, max_nonfinite_steps, 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        terms = trainer.step_terms()
        bad_terms = [name for name, values in terms.items() if not torch.stack(values).isfinite().all()]
        grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
        bad_grads = nonfinite_names(grads)
        flag = torch.tensor(float(bool(bad_terms or bad_grads)), device=args.device)
        if trainer.accelerator.num_processes > 1:  # a NaN on one process is a NaN of the global step
            flag = trainer.accelerator.reduce(flag, reduction="sum")
        if not flag.item():
            trainer.keep_step(True)
            return
        step = state.global_step + 1
        what = _describe(bad_terms, bad_grads)
        self.skipped += 1
        if self.skipped > self.max_nonfinite_steps:
            last = trainer.last_logged_terms or "none logged yet"
            raise TrainingDiverged(
                f"training diverged at optimiser step {step}: non-finite (NaN / inf) {what}. Nothing of this step was "
                f"applied or saved. Last finite logged values: {last}. Try: {ADVICE}"
                + (f" (already skipped {self.skipped - 1} step(s), --max_nonfinite_steps {self.max_nonfinite_steps})"
                   if self.max_nonfinite_steps else ""))
        logger.warning("optimiser step %d skipped: non-finite %s (%d of --max_nonfinite_steps %d)", step, what,
                       self.skipped, self.max_nonfinite_steps)
        for p in trainer.model.parameters():
            p.grad = None  # the optimiser skips parameters without a gradient: no update, no moment change
        trainer.keep_step(False)
