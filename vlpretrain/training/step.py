"""One optimizer step: forward, momentum distillation targets, loss, backward, clip, optimizer and
schedule step, logit-scale clamp, then the EMA and momentum updates.

The order below is the run's numerics (and, for the momentum queue, its state): keep it.
"""

from __future__ import annotations

import torch

from ..losses.albef import distill_alpha_at
from .prepare import PreparedRun


def train_step(run: PreparedRun, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Train on ``batch``; ``step`` is the number of optimizer steps done before this one.

    Returns the summed, weighted loss (still on the device) and the objective's dict of terms.

    Example: ``loss, terms = train_step(run, batch, position.step)``
    """
    cfg, accelerator = run.cfg, run.accelerator
    out = run.model(batch["image"], batch["tokens"], image_ids=batch["index"])
    distill = _momentum_targets(run, batch, step) if run.momentum is not None else {}
    losses = run.loss_fn(**out, **distill)
    loss = sum(cfg.loss.weight * v for k, v in losses.items() if k.endswith("_loss"))
    accelerator.backward(loss)
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
    return loss, losses


@torch.no_grad()
def _momentum_targets(run: PreparedRun, batch: dict, step: int) -> dict:
    """ALBEF's distillation inputs: the momentum encoders' features of the batch and alpha at ``step``."""
    with run.accelerator.autocast():
        return {"momentum_image_features": run.momentum.module.encode_image(batch["image"]).float(),
                "momentum_text_features": run.momentum.module.encode_text(batch["tokens"]).float(),
                "alpha": distill_alpha_at(step, run.cfg.loss.distill_alpha, run.distill_warmup)}
