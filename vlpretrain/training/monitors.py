"""Health monitors of a contrastive run (``train.monitor_every``): numbers a loss curve hides, written to
``metrics.jsonl`` (records with ``split: monitor``, and ``monitor/*`` keys in validation records), and
warnings in the log when one looks wrong.

- alignment (mean squared distance of matching image-text pairs) and uniformity per modality (log of the
  mean Gaussian potential over pairs, t = 2): Wang & Isola 2020;
- the modality gap: the distance between the image and the text embedding centroids (Liang et al. 2022);
- the spectrum of each modality's centred embeddings: effective rank (exp of the entropy of the normalized
  singular values, Roy & Vetterli 2007) and the top singular values; the spread (mean squared distance to
  the centroid). A tower that collapses (Jing et al. 2022) shows an effective rank near 1 or no spread;
- the logit scale and how long it has sat at its clamp (ln 100: the temperature can fall no further);
- the gradient norm of each tower (after clipping, when the optimizer steps);
- loss spikes: a step loss far above the median of the previous ones (robust z-score over a window).

Step records use the last micro-batch of the monitored step, as the training forward saw it (features
captured by a forward hook, no extra forward); validation records use the whole validation set.

Example:
    >>> stats = embedding_stats(image_features, text_features)
    >>> stats["monitor/erank_image"], stats["monitor/modality_gap"]
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:
    from .prepare import PreparedRun
    from .run_log import RunLog

logger = logging.getLogger("vlpretrain.train")

TOP_SINGULAR_VALUES = 3
# A modality whose embeddings spread less than this (mean squared distance to their centroid; about 1 for
# unrelated unit vectors) or vary along fewer than COLLAPSED_RANK directions has collapsed.
COLLAPSED_SPREAD = 1e-4
COLLAPSED_RANK = 1.5
# n centred rows have an effective rank of at most n - 1: with fewer rows than this, a low one says nothing.
COLLAPSE_MIN_ROWS = int(2 * COLLAPSED_RANK) + 1
# Uniformity compares every pair of rows: above this many, a fixed sample of this many stands for them.
UNIFORMITY_ROWS = 4096
# The logit scale at its clamp for this many monitor checks in a row is worth a warning.
SATURATED_CHECKS = 5
# A step loss more than SPIKE_Z robust standard deviations above the median of the last SPIKE_WINDOW steps
# (and SPIKE_RATIO times it) is a spike; the first SPIKE_WINDOW // 2 steps only fill the window.
SPIKE_WINDOW, SPIKE_Z, SPIKE_RATIO = 50, 6.0, 1.2


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> float:
    """Wang & Isola's alignment: ``mean ||x_i - y_i||^alpha`` over matching rows (lower: pairs closer).

    Example:
        >>> alignment(torch.eye(2), torch.eye(2))
        0.0
    """
    return (x.float() - y.float()).norm(dim=1).pow(alpha).mean().item()


def uniformity(x: torch.Tensor, t: float = 2.0, max_rows: int = UNIFORMITY_ROWS) -> float:
    """Wang & Isola's uniformity: ``log mean_{i<j} exp(-t ||x_i - x_j||^2)`` (lower: spread over the sphere;
    0 when every row is the same). NaN for fewer than 2 rows. Exact up to ``max_rows`` rows; above, an
    estimate over a fixed random sample of ``max_rows`` of them (seed 0: the same rows at every check), since
    the pairwise distances of all rows grow with their square (50k validation rows: ~5 GB).

    Example:
        >>> round(uniformity(torch.eye(2)), 3)
        -4.0
    """
    if x.shape[0] < 2:
        return float("nan")
    if x.shape[0] > max_rows:
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:max_rows].to(x.device)]
    return torch.pdist(x.float()).pow(2).mul(-t).exp().mean().log().item()


def modality_gap(image: torch.Tensor, text: torch.Tensor) -> float:
    """Distance between the centroids of the image and the text embeddings (Liang et al. 2022).

    Example:
        >>> modality_gap(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
        1.4142135381698608
    """
    return (image.float().mean(0) - text.float().mean(0)).norm().item()


def spectrum(x: torch.Tensor, top: int = TOP_SINGULAR_VALUES) -> dict[str, Any]:
    """The centred embeddings' ``spread`` (mean squared distance to the centroid), singular values (the
    ``top`` largest) and effective rank ``exp(H(s / sum s))``; rank 0 when there is no spread at all.

    Example:
        >>> round(spectrum(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))["erank"], 3)
        2.0
    """
    centred = x.float() - x.float().mean(0, keepdim=True)
    spread = centred.pow(2).sum(1).mean().item()
    values = torch.linalg.svdvals(centred)
    if spread < 1e-12 or values.sum() <= 0:
        return {"spread": spread, "erank": 0.0, "singular_values": [0.0] * min(top, len(values))}
    p = values / values.sum()
    p = p[p > 0]
    erank = math.exp(-(p * p.log()).sum().item())
    return {"spread": spread, "erank": erank, "singular_values": values[:top].tolist()}


def embedding_stats(image: torch.Tensor, text: torch.Tensor, text_image_index: Optional[torch.Tensor] = None
                    ) -> dict[str, float]:
    """Every embedding monitor as ``monitor/*`` keys: ``align`` (text row t paired with image row
    ``text_image_index[t]``, default t), ``uniform_*``, ``modality_gap``, ``spread_*``, ``erank_*``, ``sv{k}_*``.

    Example:
        >>> embedding_stats(F.normalize(torch.randn(8, 4), dim=1), F.normalize(torch.randn(8, 4), dim=1))
    """
    image, text = image.detach().float().cpu(), text.detach().float().cpu()
    owner = torch.arange(text.shape[0]) if text_image_index is None else text_image_index.detach().cpu().long()
    stats = {"monitor/align": alignment(image[owner], text), "monitor/modality_gap": modality_gap(image, text)}
    for name, x in (("image", image), ("text", text)):
        stats[f"monitor/uniform_{name}"] = uniformity(x)
        s = spectrum(x)
        stats[f"monitor/spread_{name}"], stats[f"monitor/erank_{name}"] = s["spread"], s["erank"]
        for k, value in enumerate(s["singular_values"], 1):
            stats[f"monitor/sv{k}_{name}"] = value
    return stats


def tower_of(name: str) -> str:
    """Which part of a dual encoder a parameter belongs to: ``image``, ``text``, ``fusion`` or ``other``
    (logit scale / bias).

    Example:
        >>> tower_of("clip.visual.conv1.weight"), tower_of("clip.transformer.resblocks.0.attn.in_proj_weight")
        ('image', 'text')
    """
    if "logit_scale" in name or "logit_bias" in name:
        return "other"
    if "fusion" in name:
        return "fusion"
    if "visual" in name or "vision" in name:
        return "image"
    return "text"


def grad_norms(named_parameters) -> dict[str, float]:
    """The L2 norm of the gradients of each tower (:func:`tower_of`); parameters without a gradient count 0.

    Example: ``grad_norms(model.named_parameters())["image"]``
    """
    squares: dict[str, list] = {}
    for name, p in named_parameters:
        parts = squares.setdefault(tower_of(name), [])
        grad = p.grad
        if grad is None:
            continue
        parts.append(grad.detach().float().pow(2).sum())  # summed on the device: one sync per tower
    return {tower: math.sqrt(torch.stack(parts).sum().item()) if parts else 0.0 for tower, parts in squares.items()}


class SpikeDetector:
    """Flags a loss far above the recent ones: more than ``z`` robust standard deviations (1.4826 x the
    median absolute deviation) and ``ratio`` times above the median of the last ``window`` losses.

    Example:
        >>> spikes = SpikeDetector()
        >>> [spikes.add(v) for v in [2.0] * 40 + [9.0]][-1]
        True
    """

    def __init__(self, window: int = SPIKE_WINDOW, z: float = SPIKE_Z, ratio: float = SPIKE_RATIO):
        self.recent: deque = deque(maxlen=window)
        self.z, self.ratio = z, ratio

    def add(self, loss: float) -> bool:
        """Add one step's loss; True when it is a spike (a spike still joins the window)."""
        spike = False
        if math.isfinite(loss) and len(self.recent) >= self.recent.maxlen // 2:
            values = torch.tensor(list(self.recent))
            median = values.median().item()
            sigma = 1.4826 * (values - median).abs().median().item()
            spike = loss > median * self.ratio and loss > median + self.z * max(sigma, 1e-6 * abs(median))
        if math.isfinite(loss):
            self.recent.append(loss)
        return spike


class TrainingMonitor:
    """The monitors of one run: a forward hook keeps the features of monitored steps, an optimizer pre-step
    hook the gradient norms, :meth:`after_step` writes a ``split: monitor`` record every ``every`` steps and
    warns. With ``every`` 0 it does nothing (no hooks, no syncs).

    Example:
        >>> monitor = TrainingMonitor(run, every=50, log=log)
        >>> monitor.before_step(step + 1); loss, terms, updated = train_step(...)
        >>> monitor.after_step(step + 1, epoch, loss, batches[-1])
        >>> monitor.close()
    """

    def __init__(self, run: "PreparedRun", every: int, log: "RunLog"):
        self.run, self.every, self.log = run, every, log
        self.enabled = every > 0
        self.capture, self.captured, self.grads = False, None, None
        self.spikes, self.spike_count, self.clamped_checks = SpikeDetector(), 0, 0
        self.warned: set[str] = set()
        self.hooks = []
        if self.enabled:
            self.hooks.append(run.unwrapped.register_forward_hook(self._keep_features))
            optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # under Accelerate's wrapper
            self.hooks.append(optimizer.register_step_pre_hook(self._keep_grad_norms))

    def due(self, step: int) -> bool:
        return self.enabled and step % self.every == 0

    def _keep_features(self, module, args, out) -> None:
        if self.capture and isinstance(out, dict) and "image_features" in out:
            self.captured = {k: out[k].detach() for k in ("image_features", "text_features") if k in out}

    def _keep_grad_norms(self, optimizer, args, kwargs) -> None:
        if self.capture:
            self.grads = grad_norms(self.run.unwrapped.named_parameters())

    def before_step(self, step: int) -> None:
        """Arm the hooks when optimizer step ``step`` (1-based) is a monitored one."""
        self.capture = self.due(step)
        self.captured, self.grads = None, None

    def after_step(self, step: int, epoch: int, loss: torch.Tensor, batch: dict, updated: bool = True) -> None:
        """Check the step's loss for a spike; on a monitored step, write its record and warn."""
        if not self.enabled:
            return
        if updated and self.spikes.add(loss.detach().float().item()):
            self.spike_count += 1
            self._warn_spike(step, loss.item())
        if not self.due(step):
            return
        self.capture = False
        record: dict[str, Any] = {"step": step, "epoch": epoch, "split": "monitor"}
        if self.captured is not None:
            count = batch["image"].shape[0]  # SLIP's forward holds both views: the first is the CLIP input
            record.update(embedding_stats(self.captured["image_features"][:count], self.captured["text_features"],
                                          batch.get("text_image_index")))
            rows = min(count, self.captured["text_features"].shape[0])
        else:
            rows = None
        record.update(self._scale_record(step))
        for tower, norm in (self.grads or {}).items():
            record[f"monitor/grad_norm_{tower}"] = norm
        record["monitor/loss_spikes"] = self.spike_count
        self.log.write(record)
        self.check(record, step, where="the training batch", rows=rows)

    def _scale_record(self, step: int) -> dict[str, float]:
        model = self.run.unwrapped
        scale = model.logit_scale.detach().float().item()
        at_clamp = scale >= getattr(model, "max_logit_scale", math.log(100)) - 1e-4
        self.clamped_checks = self.clamped_checks + 1 if at_clamp else 0
        return {"monitor/logit_scale": math.exp(scale), "monitor/logit_scale_at_clamp": float(at_clamp),
                "monitor/steps_at_clamp": self.clamped_checks * self.every if at_clamp else 0}

    def check(self, record: dict, step: int, where: str, rows: Optional[int] = None) -> None:
        """Warn (once per kind and modality) when a record shows a collapsed modality or a saturated scale.
        ``rows``: how many embeddings the record's statistics came from (None: enough). With fewer than
        ``COLLAPSE_MIN_ROWS`` the effective rank is not checked (B centred rows have one of at most B - 1, so a
        per-device batch of 2 would always look collapsed), only the spread; with one row, neither."""
        if not self.enabled:
            return
        rank_means_something = rows is None or rows >= COLLAPSE_MIN_ROWS
        spread_means_something = rows is None or rows >= 2
        for name in ("image", "text"):
            spread, erank = record.get(f"monitor/spread_{name}"), record.get(f"monitor/erank_{name}")
            if spread is None:
                continue
            if not ((spread_means_something and spread < COLLAPSED_SPREAD)
                    or (rank_means_something and erank < COLLAPSED_RANK)):
                continue
            self._warn_once(f"collapse-{name}",
                            f"{name} embeddings have collapsed at step {step}: on {where} they vary along "
                            f"{erank:.2f} directions (effective rank; spread {spread:.2g}), so the {name} tower "
                            f"gives nearly the same output for every input and retrieval cannot work; lower "
                            f"train.lr, add train.warmup_steps, or check the {name}s in the data")
        if self.clamped_checks >= SATURATED_CHECKS:
            self._warn_once("saturated", f"the logit scale has sat at its clamp "
                            f"({math.exp(self.run.unwrapped.max_logit_scale):.0f}) for {self.clamped_checks * self.every} "
                            f"steps (step {step}): the temperature can fall no further, and the loss may be "
                            f"too easy on this data (duplicate captions?) or the lr too high")

    def _warn_spike(self, step: int, loss: float) -> None:
        if self.spike_count <= 10 and self.run.accelerator.is_main_process:  # named up to 10 times, then only counted (monitor/loss_spikes)
            median = torch.tensor(list(self.spikes.recent)[:-1]).median().item()
            logger.warning("loss spike at step %d: %.4g against a recent median of %.4g; a few are harmless, "
                           "many suggest lowering train.lr or setting train.grad_clip_norm", step, loss, median)

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self.warned:
            self.warned.add(kind)
            if self.run.accelerator.is_main_process:
                logger.warning(message)

    def close(self) -> None:
        """Remove the hooks."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
