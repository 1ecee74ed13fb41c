"""One optimizer step: forward, momentum distillation targets, loss, backward, the non-finite loss check,
clip, optimizer and schedule step, logit-scale clamp, then the EMA and momentum updates. With
``train.accum_freq`` K > 1 the forward / loss / backward part runs over K micro-batches
(:mod:`vlpretrain.training.accumulation`); the rest runs once per optimizer step, as with K = 1.

The order below is the run's numerics (and, for the momentum queue, its state): keep it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from ..losses.albef import distill_alpha_at
from .accumulation import accumulate_gradients
from .objective_inputs import forward_batch
from .prepare import PreparedRun
from .profiling import phase

if TYPE_CHECKING:
    from accelerate import Accelerator


class NonFiniteLossError(ValueError):
    """``train.max_nonfinite_steps`` steps in a row had a NaN / inf loss: the run stops."""


class NonFiniteGuard:
    """Decides, the same way on every process, whether a step's loss allows a weight update, and stops
    the run after ``limit`` non-finite losses in a row.

    Example:
        >>> guard = NonFiniteGuard(accelerator, limit=5)
        >>> if guard.check(loss, step=12): optimizer.step()
    """

    def __init__(self, accelerator: "Accelerator", limit: int):
        self.accelerator, self.limit = accelerator, limit
        self.streak: list[int] = []  # the steps of the current run of non-finite losses
        self.last_finite: Optional[tuple[int, float]] = None  # (step, loss averaged over processes)

    def check(self, loss: torch.Tensor, step: int) -> bool:
        """True when every process's loss at step ``step`` (1-based) is finite. A collective: every
        process calls it. Raises :class:`NonFiniteLossError` at the ``limit``-th non-finite step in a row."""
        value = loss.detach().float()
        bad = ~torch.isfinite(value)
        # One reduce carries both the flag and the loss, so a NaN on one rank makes every rank skip.
        flags = torch.stack([bad.float(), torch.where(bad, torch.zeros_like(value), value)])
        bad_ranks, loss_sum = self.accelerator.reduce(flags, "sum").tolist()
        if not bad_ranks:
            self.streak, self.last_finite = [], (step, loss_sum / self.accelerator.num_processes)
            return True
        self.streak.append(step)
        if len(self.streak) >= self.limit:
            last = (f"last finite loss {self.last_finite[1]:.4g} at step {self.last_finite[0]}"
                    if self.last_finite else "no finite loss before them in this run")
            raise NonFiniteLossError(f"train: the loss was not finite for {len(self.streak)} steps in a row (steps "
                                     f"{self.streak[0]}-{self.streak[-1]}; {last}); lower train.lr or check the data")
        return False


def train_step(run: PreparedRun, batches: list[dict], step: int,
               guard: NonFiniteGuard) -> tuple[torch.Tensor, dict[str, torch.Tensor], bool]:
    """Train on ``batches`` (``train.accum_freq`` micro-batches, one optimizer step); ``step`` is the number
    of optimizer steps done before this one.

    Returns the summed, weighted loss (still on the device), the objective's dict of terms, and whether
    the weights were updated: a NaN / inf loss on any process skips the update on all of them (gradients
    dropped; the schedule still advances, so it stays a function of the step).

    Example: ``loss, terms, updated = train_step(run, [batch], position.step, guard)``
    """
    cfg, accelerator = run.cfg, run.accelerator
    if len(batches) > 1:
        loss, losses = accumulate_gradients(lambda b: forward_batch(run.model, b), run.loss_fn, batches,
                                            total=lambda terms: _weighted_sum(cfg.loss.weight, terms),
                                            backward=accelerator.backward,
                                            no_sync=lambda: accelerator.no_sync(run.model))
        distill: dict = {}  # ALBEF (momentum) refuses accumulation: check_accumulation
    else:
        batch = batches[0]
        with phase("forward"):
            out = forward_batch(run.model, batch)
            distill = _momentum_targets(run, batch, step) if run.momentum is not None else {}
            losses = run.loss_fn(**out, **distill)
            loss = _weighted_sum(cfg.loss.weight, losses)
        with phase("backward"):
            accelerator.backward(loss)
    if not guard.check(loss, step + 1):
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        return loss, losses, False
    with phase("optimizer"):
        if cfg.train.grad_clip_norm:
            accelerator.clip_grad_norm_(run.model.parameters(), cfg.train.grad_clip_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.unwrapped.clamp_logit_scale()
        if run.ema is not None:
            run.ema.update(run.unwrapped, step=step + 1)
        if run.momentum is not None:
            run.loss_fn.dequeue_and_enqueue(distill["momentum_image_features"], distill["momentum_text_features"])
            run.momentum.update(run.unwrapped)
    return loss, losses, True


def _weighted_sum(weight: float, losses: dict) -> torch.Tensor:
    """The loss to backpropagate: ``loss.weight`` x the sum of the objective's ``*_loss`` terms."""
    return sum(weight * v for k, v in losses.items() if k.endswith("_loss"))


@torch.no_grad()
def _momentum_targets(run: PreparedRun, batch: dict, step: int) -> dict:
    """ALBEF's distillation inputs: the momentum encoders' features of the batch and alpha at ``step``."""
    with run.accelerator.autocast():
        return {"momentum_image_features": run.momentum.module.encode_image(batch["image"]).float(),
                "momentum_text_features": run.momentum.module.encode_text(batch["tokens"]).float(),
                "alpha": distill_alpha_at(step, run.cfg.loss.distill_alpha, run.distill_warmup)}
