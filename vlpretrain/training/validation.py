"""Validation during training: contrastive val loss and exact retrieval recall on ``data.val``, scored
by the main process at the end of every epoch and of the run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .prepare import PreparedRun
    from .monitors import TrainingMonitor
    from .run_log import RunLog


@torch.no_grad()
def validate(model: torch.nn.Module, corpus: Any, batch_size: int, accelerator: Optional["Accelerator"] = None,
             progress: bool = False, monitors: bool = False) -> dict[str, float]:
    """Val loss (contrastive, in consecutive blocks of ``batch_size``) and exact retrieval recall; with
    ``monitors``, also the embedding monitors of the whole set (:func:`~vlpretrain.training.monitors.embedding_stats`)
    and ``monitor/rows``, how many images they came from.

    Example:
        >>> metrics = validate(model, open_named_corpus("emoji:val", DataConfig()), batch_size=128)
        >>> metrics["val_loss"], metrics["image_retrieval_recall@1"]
    """
    from ..evaluation.retrieval import retrieval_metrics
    from ..inference import encode_corpus
    import torch.nn.functional as F

    context = accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)
    with context:
        feats = encode_corpus(model, corpus, batch_size=batch_size, progress=progress)
    images, texts, owner = feats["image_features"], feats["text_features"], feats["text_to_image"]
    first_caption = torch.zeros(len(images), dtype=torch.long)
    seen = set()
    for j, i in enumerate(owner.tolist()):
        if i not in seen:
            seen.add(i)
            first_caption[i] = j
    paired_texts = texts[first_caption]
    scale = model.logit_scale.exp().float().cpu()
    losses, weights = [], []
    for start in range(0, len(images), batch_size):
        img, txt = images[start:start + batch_size], paired_texts[start:start + batch_size]
        if len(img) < 2:
            continue
        logits = scale * img @ txt.T
        labels = torch.arange(len(img))
        losses.append(((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2).item())
        weights.append(len(img))
    metrics = retrieval_metrics(images, texts, owner)
    metrics["val_loss"] = sum(l * w for l, w in zip(losses, weights)) / max(sum(weights), 1)
    metrics["bad_images"] = len(feats["bad_images"])
    if monitors:
        from .monitors import embedding_stats

        metrics.update(embedding_stats(images, texts, owner))
        metrics["monitor/rows"] = len(images)
    return metrics


def validate_at_epoch_end(run: "PreparedRun", log: "RunLog", step: int, epoch: int,
                          monitor: Optional["TrainingMonitor"] = None) -> None:
    """After epoch ``epoch`` (or the run's last step): the main process validates ``run.scored`` and logs
    it; every process waits for it, then goes back to train mode. Nothing without ``data.val`` or with
    ``train.validate_every_epoch=false``. With an enabled ``monitor``, the record also holds the embedding
    monitors of the validation set, and the monitor warns about what they show.

    Example: ``validate_at_epoch_end(run, log, position.step, epoch)``
    """
    tc, accelerator = run.cfg.train, run.accelerator
    if run.val_corpus is None or not tc.validate_every_epoch:
        return
    if not (step % run.steps_per_epoch == 0 or step >= run.total_steps):
        return
    if accelerator.is_main_process:
        watched = monitor is not None and monitor.enabled
        val = validate(run.scored, run.val_corpus, tc.batch_size, accelerator, monitors=watched)
        log.write_validation(val, step, epoch)
        if watched:
            # a validation set of a few images has a small effective rank without having collapsed
            monitor.check(val, step, where="the validation set", rows=val["monitor/rows"])
    accelerator.wait_for_everyone()
    run.model.train()
