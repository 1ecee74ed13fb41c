"""The training loop: Accelerate for devices, processes and precision; one contrastive step per batch.

One process on CPU::

    vlp train recipes/demo-emoji.yaml

Several processes (GPUs, or CPU processes talking over gloo)::

    accelerate launch --multi_gpu --num_processes 2 -m vlpretrain.cli.main train recipes/demo-emoji.yaml
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader

from ..config import RecipeConfig
from ..losses import create_loss
from ..losses.albef import distill_alpha_at
from .start import build_start_model
from .checkpoint import list_checkpoints, read_trainer_state, resolve_resume, save_checkpoint
from .data import build_train_dataset, open_named_corpus
from .optim import create_optimizer, create_scheduler

logger = logging.getLogger("vlpretrain.train")


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Optional[Path]
    step: int
    skipped_samples: int
    val_metrics: list[dict] = field(default_factory=list)
    samples_per_second: float = 0.0


def _make_accelerator(cfg: RecipeConfig):
    from accelerate import Accelerator, DataLoaderConfiguration

    # Accelerator(cpu=True) is what lets `accelerate launch --multi_gpu` run gloo processes on a CPU box.
    precision = {"fp32": "no"}.get(cfg.train.precision, cfg.train.precision)
    if precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"train.precision: '{cfg.train.precision}' is not one of no (fp32), bf16, fp16")
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(),
                       dataloader_config=DataLoaderConfiguration(even_batches=True))


def _setup_logging(accelerator, output_dir: Path) -> None:
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    root = logging.getLogger("vlpretrain")
    root.setLevel(logging.INFO)
    if not any(getattr(h, "_vlp", False) for h in root.handlers):
        fmt = logging.Formatter(f"%(asctime)s [rank {accelerator.process_index}] %(levelname)s %(message)s",
                                "%H:%M:%S")
        handler = logging.FileHandler(output_dir / f"train.rank{accelerator.process_index}.log")
        handler.setFormatter(fmt)
        handler._vlp = True
        root.addHandler(handler)
        console = logging.StreamHandler()
        console.setFormatter(fmt)
        console.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
        console._vlp = True
        root.addHandler(console)


def _close_logging() -> None:
    root = logging.getLogger("vlpretrain")
    for handler in [h for h in root.handlers if getattr(h, "_vlp", False)]:
        root.removeHandler(handler)
        handler.close()


@torch.no_grad()
def validate(model, corpus, batch_size: int, accelerator=None, progress: bool = False) -> dict[str, float]:
    """Val loss (contrastive, in consecutive blocks of ``batch_size``) and exact retrieval recall."""
    from ..evaluation.features import encode_corpus
    from ..evaluation.retrieval import retrieval_metrics
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
    return metrics


def _make_ema(model, tc):
    """timm's ModelEmaV3 over ``model`` when ``train.ema_decay`` is set, else None."""
    if tc.ema_decay is None:
        return None
    if not 0.0 <= tc.ema_decay < 1.0:
        raise ValueError(f"train.ema_decay must be in [0, 1) (e.g. 0.999), got {tc.ema_decay}")
    from timm.utils import ModelEmaV3

    # Kept in float32 beside float32 weights (Accelerate's bf16 is autocast), so updates never round away.
    return ModelEmaV3(model, decay=tc.ema_decay, use_warmup=tc.ema_warmup, warmup_power=0.75)


def _make_loss(cfg: RecipeConfig):
    """The recipe's objective; ALBEF's takes its weights, momentum and queue settings from ``loss``."""
    if cfg.loss.name != "albef":
        return create_loss(cfg.loss.name)
    settings = {k: v for k, v in dataclasses.asdict(cfg.loss).items() if k not in ("name", "weight")}
    return create_loss("albef", **settings)


def _make_momentum_model(model, cfg: RecipeConfig):
    """ALBEF's momentum encoders: an EMA copy of the model (``loss.momentum``), updated every step."""
    if cfg.loss.name != "albef" or not cfg.loss.momentum:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.loss.momentum)


def train(cfg: RecipeConfig, on_step: Optional[Callable[[int], None]] = None) -> TrainResult:
    """Train a dual encoder as the recipe says; returns where the final model was written.

    ``on_step(step)`` is called after every optimizer step (tests use it to interrupt a run).

    Example:
        >>> from vlpretrain.config import load_recipe
        >>> result = train(load_recipe("recipes/demo-emoji.yaml", ["train.epochs=1"]))
        >>> vlpretrain.load_model(result.final_dir)
    """
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    accelerator = _make_accelerator(cfg)
    output_dir = Path(tc.output_dir)
    _setup_logging(accelerator, output_dir)
    try:
        return _train(cfg, accelerator, output_dir, on_step)
    finally:
        _close_logging()


def _train(cfg: RecipeConfig, accelerator, output_dir: Path, on_step: Optional[Callable[[int], None]]) -> TrainResult:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from ..data import EpochPermutationSampler, collate_image_text

    tc = cfg.train
    set_seed(tc.seed)
    world = accelerator.num_processes
    # Checked before anything is written, so a refused run leaves the earlier one untouched.
    earlier = list_checkpoints(output_dir)
    if earlier and not tc.resume:
        if not tc.overwrite:
            raise ValueError(f"{output_dir} already holds checkpoints of an earlier run ({earlier[-1].name}); "
                             f"pass --resume (train.resume=latest) to continue it, train.overwrite=true to "
                             f"replace it, or another train.output_dir")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            logger.warning("train.overwrite: removing %d checkpoints of an earlier run in %s", len(earlier), output_dir)
            for path in earlier:
                shutil.rmtree(path, ignore_errors=True)
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (output_dir / "recipe.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    model = build_start_model(cfg.model, augmentation=cfg.data.augmentation)
    loss_fn = _make_loss(cfg)
    dataset = build_train_dataset(cfg.data, model, tc.seed)
    if len(dataset) < tc.batch_size * world:
        raise ValueError(f"data.train has {len(dataset)} pairs, fewer than one global batch "
                         f"({tc.batch_size} x {world} processes): lower train.batch_size")
    sampler = EpochPermutationSampler(len(dataset), seed=tc.seed)
    loader = DataLoader(dataset, batch_size=tc.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.data.num_workers, collate_fn=collate_image_text,
                        persistent_workers=False, pin_memory=torch.cuda.is_available())
    val_corpus = open_named_corpus(cfg.data.val, cfg.data, cfg.data.val_split) if cfg.data.val else None

    optimizer = create_optimizer(model, tc)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = len(loader)
    total_steps = tc.max_steps or tc.epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    # Not passed through accelerator.prepare(): that steps it once per process per step; we step
    # it once per optimizer step and let save_state / load_state carry it.
    scheduler = create_scheduler(optimizer, tc, total_steps)
    accelerator.register_for_checkpointing(scheduler)
    unwrapped = accelerator.unwrap_model(model)
    ema = _make_ema(unwrapped, tc)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    scored = ema.module if ema is not None else unwrapped  # what validation scores and final/ holds
    momentum = _make_momentum_model(unwrapped, cfg)
    if momentum is not None:
        accelerator.register_for_checkpointing(momentum)
    if any(True for _ in loss_fn.buffers()):  # the ITC queue: saved and restored with the run
        loss_fn.to(accelerator.device)
        accelerator.register_for_checkpointing(loss_fn)
    distill_warmup = cfg.loss.distill_warmup_steps if cfg.loss.distill_warmup_steps is not None else steps_per_epoch

    step, start_epoch, skip_batches, samples_seen = 0, 0, 0, 0
    if tc.resume:
        checkpoint = resolve_resume(tc.resume, output_dir)
        if checkpoint is None:
            logger.info("train.resume=latest: no checkpoint in %s yet, starting fresh", output_dir)
        else:
            accelerator.load_state(str(checkpoint))
            state = read_trainer_state(checkpoint)
            step, start_epoch, skip_batches = state["step"], state["epoch"], state["batch_in_epoch"]
            samples_seen = state.get("samples_seen", 0)
            if state.get("total_steps") not in (None, total_steps):
                logger.warning("resuming a run planned for %s steps with %s steps", state["total_steps"], total_steps)
            if skip_batches >= steps_per_epoch:
                start_epoch, skip_batches = start_epoch + 1, 0
            logger.info("resumed from %s at step %d (epoch %d, batch %d)", checkpoint, step, start_epoch, skip_batches)

    trainable = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
    logger.info("training %s: %d pairs, %d processes x batch %d, %d steps/epoch, %d steps, "
                "%.1fM trainable parameters, precision %s", cfg.data.train, len(dataset), world, tc.batch_size,
                steps_per_epoch, total_steps, trainable / 1e6, tc.precision)

    metrics_path = output_dir / "metrics.jsonl"
    # A resumed run appends to its metrics; a fresh one starts the file anew.
    metrics_file = open(metrics_path, "a" if step else "w") if accelerator.is_main_process else None
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not (tc.progress and accelerator.is_main_process),
               dynamic_ncols=True)
    skipped_local = 0
    val_history: list[dict] = []
    interval_start, interval_samples = time.perf_counter(), 0
    loss_sum, loss_count = torch.zeros((), device=accelerator.device), 0
    throughput = 0.0
    train_start, train_samples = time.perf_counter(), 0

    def write_metrics(record: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def checkpoint_state(epoch: int, batch_in_epoch: int) -> dict:
        return {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "samples_seen": samples_seen,
                "total_steps": total_steps, "world_size": world}

    model.train()
    try:
        for epoch in range(start_epoch, num_epochs):
            if step >= total_steps:
                break
            epoch_loader = loader
            batch_in_epoch = 0
            if epoch == start_epoch and skip_batches:
                epoch_loader = accelerator.skip_first_batches(loader, skip_batches)
                batch_in_epoch = skip_batches
            # Accelerate's loaders re-set the sampler's epoch from their own iteration count when
            # iterated; setting it through them keeps the order a function of the epoch alone.
            for target in (epoch_loader, sampler, dataset):
                if hasattr(target, "set_epoch"):
                    target.set_epoch(epoch)
            for batch in epoch_loader:
                for source, reason in batch["skipped"]:
                    skipped_local += 1
                    if skipped_local <= 20:
                        logger.warning("skipped bad sample %s: %s", source, reason)
                    elif skipped_local == 21:
                        logger.warning("more bad samples skipped; the count is in metrics.jsonl")
                out = model(batch["image"], batch["tokens"], image_ids=batch["index"])
                distill = {}
                if momentum is not None:
                    with torch.no_grad(), accelerator.autocast():
                        distill = {"momentum_image_features": momentum.module.encode_image(batch["image"]).float(),
                                   "momentum_text_features": momentum.module.encode_text(batch["tokens"]).float(),
                                   "alpha": distill_alpha_at(step, cfg.loss.distill_alpha, distill_warmup)}
                losses = loss_fn(**out, **distill)
                loss = sum(cfg.loss.weight * v for k, v in losses.items() if k.endswith("_loss"))
                accelerator.backward(loss)
                if tc.grad_clip_norm:
                    accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                unwrapped.clamp_logit_scale()
                if ema is not None:
                    ema.update(unwrapped, step=step + 1)
                if momentum is not None:
                    loss_fn.dequeue_and_enqueue(distill["momentum_image_features"], distill["momentum_text_features"])
                    momentum.update(unwrapped)

                step += 1
                batch_in_epoch += 1
                global_batch = batch["image"].shape[0] * world
                samples_seen += global_batch
                interval_samples += global_batch
                train_samples += global_batch
                loss_sum += loss.detach().float()  # stays on the device: no sync per step
                loss_count += 1
                bar.update(1)

                if step % tc.log_every == 0 or step == total_steps:
                    elapsed = time.perf_counter() - interval_start
                    throughput = interval_samples / max(elapsed, 1e-9)
                    mean_loss = accelerator.reduce(loss_sum, "mean").item() / loss_count
                    skipped_total = int(accelerator.reduce(torch.tensor(skipped_local, device=accelerator.device), "sum").item())
                    record = {"step": step, "epoch": epoch, "loss": mean_loss,
                              **{k: v.item() for k, v in losses.items()},
                              "lr": scheduler.get_last_lr()[0], "logit_scale": unwrapped.logit_scale.exp().item(),
                              "samples_per_s": throughput, "skipped_samples": skipped_total, "samples_seen": samples_seen,
                              "elapsed_s": time.perf_counter() - train_start}
                    write_metrics(record)
                    bar.set_postfix(loss=f"{mean_loss:.3f}", scale=f"{record['logit_scale']:.1f}",
                                    sps=f"{throughput:.0f}", refresh=False)
                    interval_start, interval_samples = time.perf_counter(), 0
                    loss_sum, loss_count = torch.zeros((), device=accelerator.device), 0

                if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < total_steps:
                    save_checkpoint(accelerator, model, output_dir, checkpoint_state(epoch, batch_in_epoch),
                                    keep=tc.keep_checkpoints)
                if on_step is not None:
                    on_step(step)
                if step >= total_steps:
                    break

            if val_corpus is not None and tc.validate_every_epoch and (step % steps_per_epoch == 0 or step >= total_steps):
                if accelerator.is_main_process:
                    val = validate(scored, val_corpus, tc.batch_size, accelerator)
                    val.update({"step": step, "epoch": epoch, "split": "val",
                                "elapsed_s": time.perf_counter() - train_start})
                    val_history.append(val)
                    write_metrics(val)
                    logger.info("epoch %d val: loss %.4f, text->image R@1 %.3f R@5 %.3f R@10 %.3f, "
                                "image->text R@1 %.3f R@5 %.3f R@10 %.3f", epoch, val["val_loss"],
                                val["image_retrieval_recall@1"], val["image_retrieval_recall@5"],
                                val["image_retrieval_recall@10"], val["text_retrieval_recall@1"],
                                val["text_retrieval_recall@5"], val["text_retrieval_recall@10"])
                accelerator.wait_for_everyone()
                model.train()
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()

    skipped_total = int(accelerator.reduce(torch.tensor(skipped_local, device=accelerator.device), "sum").item())
    if skipped_total:
        logger.warning("%d bad samples were skipped in total (see train.rank*.log)", skipped_total)
    if tc.checkpoint_every:
        save_checkpoint(accelerator, model, output_dir, checkpoint_state(num_epochs, 0), keep=tc.keep_checkpoints)
    final_dir = output_dir / "final"
    if accelerator.is_main_process:
        if ema is not None:
            unwrapped.save_pretrained(output_dir / "final-online")
        scored.save_pretrained(final_dir)
        logger.info("saved the final model%s to %s", " (EMA weights)" if ema is not None else "", final_dir)
    accelerator.wait_for_everyone()
    train_time = time.perf_counter() - train_start
    return TrainResult(output_dir=output_dir, final_dir=final_dir, step=step, skipped_samples=skipped_total,
                       val_metrics=val_history, samples_per_second=train_samples / max(train_time, 1e-9))
