"""ALBEF's objective: contrastive (ITC) + image-text matching with hard negatives (ITM) + masked
language modelling (MLM), with optional momentum distillation and a queue of momentum features.

The ITM negative samplers and the MLM masking rule live beside the model that uses them
(:mod:`vlpretrain.models.fusion_sampling`): the model builds the ITM pairs and the masked captions
inside ``DualEncoder.forward``; this module scores what it returns.

Example:
    >>> loss_fn = create_loss("albef", itm_weight=1.0, mlm_weight=1.0)
    >>> out = model(images, tokens, image_ids)      # + itm_logits / itm_labels / mlm_logits / mlm_labels
    >>> losses = loss_fn(**out)
    >>> sum(v for k, v in losses.items() if k.endswith("_loss")).backward()
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_gather_no_grad
from .contrastive import ContrastiveLoss

def distill_alpha_at(step: int, alpha: float, warmup_steps: Optional[int]) -> float:
    """The distillation weight at optimizer step ``step`` (0-based): a linear ramp from 0 to ``alpha``
    over ``warmup_steps`` (ALBEF ramps over the first epoch, since the momentum model starts as noise),
    then ``alpha``. ``warmup_steps`` None or 0 means no ramp.

    Example:
        >>> distill_alpha_at(50, 0.4, 100)
        0.2
    """
    if warmup_steps is not None and warmup_steps < 0:
        raise ValueError(f"loss.distill_warmup_steps must be >= 0 or null, got {warmup_steps}")
    if not warmup_steps:
        return float(alpha)
    return float(alpha) * min(1.0, max(step, 0) / warmup_steps)


class AlbefLoss(nn.Module):
    """ALBEF's losses, each already multiplied by its weight: ``itc_loss`` (+ ``itm_loss`` / ``mlm_loss``
    when the model returns ITM / MLM logits), plus the metrics ``itm_accuracy`` / ``mlm_accuracy``.

    ``itc_loss`` is :class:`ContrastiveLoss` (symmetric InfoNCE over the gathered global batch). With a
    queue (``queue_size`` > 0), the queued momentum features of earlier batches are extra negatives
    (image rows score against the text queue, text rows against the image queue). With momentum
    features and ``alpha`` > 0, the targets are ALBEF's soft ones: ``alpha * softmax(momentum
    similarities) + (1 - alpha) * one-hot``, the momentum similarities taken over the same columns
    (gathered momentum batch + queue) at the same (detached) logit scale.

    The trainer keeps the momentum model (an EMA of the model with decay ``momentum``), passes its
    features and ``alpha`` (:func:`distill_alpha_at`) to :meth:`forward`, then calls
    :meth:`dequeue_and_enqueue`. The queue is made of buffers: register the loss for checkpointing.

    Example:
        >>> loss_fn = AlbefLoss(queue_size=4096, momentum=0.995)
        >>> out = model(images, tokens, image_ids)
        >>> with torch.no_grad():
        ...     m = momentum_model(images, tokens)
        >>> losses = loss_fn(**out, momentum_image_features=m["image_features"],
        ...                  momentum_text_features=m["text_features"], alpha=distill_alpha_at(step, 0.4, 1000))
        >>> loss_fn.dequeue_and_enqueue(m["image_features"], m["text_features"])
    """

    def __init__(self, itc_weight: float = 1.0, itm_weight: float = 1.0, mlm_weight: float = 1.0,
                 queue_size: int = 0, momentum: Optional[float] = None, distill_alpha: float = 0.4,
                 distill_warmup_steps: Optional[int] = None, embed_dim: Optional[int] = None):
        super().__init__()
        if queue_size < 0:
            raise ValueError(f"loss.queue_size must be >= 0 (0 = no queue), got {queue_size}")
        if momentum is not None and not 0.0 < momentum < 1.0:
            raise ValueError(f"loss.momentum must be in (0, 1) (e.g. 0.995), or null for no momentum model; "
                             f"got {momentum}")
        if queue_size > 0 and momentum is None:
            raise ValueError(f"loss.queue_size={queue_size} needs loss.momentum (the queue holds momentum-model "
                             f"features); set loss.momentum=0.995 or loss.queue_size=0")
        if not 0.0 <= distill_alpha <= 1.0:
            raise ValueError(f"loss.distill_alpha must be in [0, 1], got {distill_alpha}")
        if distill_warmup_steps is not None and distill_warmup_steps < 0:
            raise ValueError(f"loss.distill_warmup_steps must be >= 0 or null, got {distill_warmup_steps}")
        self.itc_weight, self.itm_weight, self.mlm_weight = itc_weight, itm_weight, mlm_weight
        self.queue_size = queue_size
        self.momentum = momentum
        self.distill_alpha = distill_alpha
        self.distill_warmup_steps = distill_warmup_steps
        self.contrastive = ContrastiveLoss()
        # The feature width may be unknown until the first enqueue (then allocated; a checkpoint's
        # queue is adopted on load, see _load_from_state_dict).
        dim = embed_dim or 0
        self.register_buffer("image_queue", torch.zeros(queue_size, dim))
        self.register_buffer("text_queue", torch.zeros(queue_size, dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))
        # Python mirrors of the pointer / fill level: no device sync per step.
        self._ptr, self._count = 0, 0

    # ---- queue -------------------------------------------------------------------------------------
    def queued_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The queued momentum ``(image, text)`` features, oldest first, ``(count, dim)`` each."""
        if self._count < self.queue_size:
            return self.image_queue[:self._count], self.text_queue[:self._count]
        return torch.roll(self.image_queue, -self._ptr, 0), torch.roll(self.text_queue, -self._ptr, 0)

    def _ensure_queue(self, dim: int, device: torch.device) -> None:
        if self.image_queue.shape[1] != dim:
            if self._count:
                raise ValueError(f"AlbefLoss queue holds {self.image_queue.shape[1]}-d features but got {dim}-d "
                                 f"ones; use one model (and one embed_dim) per run")
            self.image_queue = torch.zeros(self.queue_size, dim, device=device)
            self.text_queue = torch.zeros(self.queue_size, dim, device=device)
        if self.image_queue.device != device:
            self.image_queue, self.text_queue = self.image_queue.to(device), self.text_queue.to(device)
            self.queue_ptr, self.queue_count = self.queue_ptr.to(device), self.queue_count.to(device)

    @torch.no_grad()
    def dequeue_and_enqueue(self, momentum_image_features: torch.Tensor, momentum_text_features: torch.Tensor) -> None:
        """Push this step's momentum features, gathered from every process, into the FIFO queue
        (the oldest entries are overwritten). A no-op with ``queue_size`` 0.

        Example:
            >>> loss_fn.dequeue_and_enqueue(m["image_features"], m["text_features"])
        """
        if self.queue_size == 0:
            return
        image = all_gather_no_grad(momentum_image_features.detach().contiguous()).float()
        text = all_gather_no_grad(momentum_text_features.detach().contiguous()).float()
        self._ensure_queue(image.shape[1], image.device)
        if image.shape[0] > self.queue_size:  # only the newest queue_size entries survive anyway
            image, text = image[-self.queue_size:], text[-self.queue_size:]
        n = image.shape[0]
        index = (self._ptr + torch.arange(n, device=image.device)) % self.queue_size
        self.image_queue[index] = image
        self.text_queue[index] = text
        self._ptr = (self._ptr + n) % self.queue_size
        self._count = min(self._count + n, self.queue_size)
        self.queue_ptr.fill_(self._ptr)
        self.queue_count.fill_(self._count)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in ("image_queue", "text_queue"):
            incoming = state_dict.get(prefix + name)
            if incoming is None:
                continue
            if incoming.shape[0] != self.queue_size:
                raise ValueError(f"the checkpoint's ITC queue holds {incoming.shape[0]} entries but loss.queue_size "
                                 f"is {self.queue_size}; resume with loss.queue_size={incoming.shape[0]}")
            if incoming.shape != self._buffers[name].shape:  # the width was not known at construction
                self._buffers[name] = torch.zeros(incoming.shape, device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._ptr, self._count = int(self.queue_ptr), int(self.queue_count)

    # ---- loss --------------------------------------------------------------------------------------
    def _itc(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
             momentum_image_features: Optional[torch.Tensor], momentum_text_features: Optional[torch.Tensor],
             alpha: float) -> torch.Tensor:
        if self._count == 0 and alpha == 0:
            return self.contrastive(image_features, text_features, logit_scale)["contrastive_loss"]
        logits_per_image, logits_per_text, labels = self.contrastive.logits(image_features, text_features, logit_scale)
        image_queue, text_queue = self.queued_features()
        # An empty queue may not know the feature width yet (0 columns): size it to the features.
        image_queue = image_queue.to(image_features.dtype).reshape(-1, image_features.shape[1])
        text_queue = text_queue.to(text_features.dtype).reshape(-1, text_features.shape[1])
        if self._count:
            logits_per_image = torch.cat([logits_per_image, logit_scale * image_features @ text_queue.T], dim=1)
            logits_per_text = torch.cat([logits_per_text, logit_scale * text_features @ image_queue.T], dim=1)
        if alpha == 0:
            return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        with torch.no_grad():
            scale = logit_scale.detach()
            m_image = momentum_image_features.detach().to(image_features.dtype)
            m_text = momentum_text_features.detach().to(text_features.dtype)
            text_columns = torch.cat([all_gather_no_grad(m_text), text_queue])
            image_columns = torch.cat([all_gather_no_grad(m_image), image_queue])
            one_hot = F.one_hot(labels, logits_per_image.shape[1]).to(logits_per_image.dtype)
            target_image = alpha * torch.softmax(scale * m_image @ text_columns.T, dim=1) + (1 - alpha) * one_hot
            target_text = alpha * torch.softmax(scale * m_text @ image_columns.T, dim=1) + (1 - alpha) * one_hot
        return (F.cross_entropy(logits_per_image, target_image) + F.cross_entropy(logits_per_text, target_text)) / 2

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                itm_logits: Optional[torch.Tensor] = None, itm_labels: Optional[torch.Tensor] = None,
                mlm_logits: Optional[torch.Tensor] = None, mlm_labels: Optional[torch.Tensor] = None,
                momentum_image_features: Optional[torch.Tensor] = None,
                momentum_text_features: Optional[torch.Tensor] = None, alpha: float = 0.0,
                **_: torch.Tensor) -> dict[str, torch.Tensor]:
        alpha = float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"AlbefLoss: alpha must be in [0, 1], got {alpha}")
        if alpha > 0 and (momentum_image_features is None or momentum_text_features is None):
            raise ValueError("AlbefLoss: alpha > 0 needs momentum_image_features and momentum_text_features; "
                             "set loss.momentum (e.g. 0.995) to train with a momentum model")
        out = {"itc_loss": self.itc_weight * self._itc(image_features, text_features, logit_scale,
                                                       momentum_image_features, momentum_text_features, alpha)}
        if itm_logits is not None:
            if itm_labels is None:
                raise ValueError("AlbefLoss: itm_logits given without itm_labels")
            out["itm_loss"] = self.itm_weight * F.cross_entropy(itm_logits.float(), itm_labels)
            out["itm_accuracy"] = _accuracy(itm_logits, itm_labels)
        if mlm_logits is not None:
            if mlm_labels is None:
                raise ValueError("AlbefLoss: mlm_logits given without mlm_labels")
            logits, labels = mlm_logits.reshape(-1, mlm_logits.shape[-1]).float(), mlm_labels.reshape(-1)
            # Sum / count rather than the mean: a step with nothing masked gives 0 (not NaN) without a
            # device sync, and still sends a (zero) gradient through the head.
            mlm = (F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
                   / (labels != -100).sum().clamp(min=1))
            out["mlm_loss"] = self.mlm_weight * mlm
            out["mlm_accuracy"] = _accuracy(mlm_logits, mlm_labels)
        return out


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Share of argmax predictions equal to the label, over positions whose label is not -100 (0 if none)."""
    with torch.no_grad():
        logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        valid = labels != -100
        correct = (logits.argmax(dim=-1) == labels) & valid
        return correct.sum().float() / valid.sum().clamp(min=1)
