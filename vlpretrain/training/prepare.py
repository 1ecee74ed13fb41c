"""Everything a run builds before its first step: the accelerator, model, objective, data, optimizer,
schedule, EMA and momentum copies, passed through Accelerate and gathered for checkpoints
(:class:`~vlpretrain.training.checkpoint_state.TrainerObjects`).

The order of the calls in :func:`prepare_run` is part of the run's numbers (the seed is set first, then
each object draws from it in turn): keep it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset

from ..config import RecipeConfig
from ..data.named import open_named_corpus
from ..io import write_json
from ..losses import create_loss
from .accumulation import optimizer_steps
from .checkpoint import list_checkpoints
from .checkpoint_state import TrainerObjects
from .data import build_train_dataset
from .fsdp import check_fsdp_supported, honour_fsdp_on_cpu, prepare_for_fsdp, uses_fsdp
from .optim import create_optimizer, create_scheduler
from .start import build_start_model

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger("vlpretrain.train")


@dataclass
class PreparedRun:
    """The objects one training run steps, as :func:`prepare_run` built them.

    ``model`` is what Accelerate wrapped (call it, clip its gradients); ``unwrapped`` is the plain
    module under it (clamp, update EMA from, save); ``scored`` is what validation scores and ``final/``
    holds: the EMA weights when ``train.ema_decay`` is set, else ``unwrapped``.
    """

    cfg: RecipeConfig
    accelerator: "Accelerator"
    model: torch.nn.Module
    unwrapped: torch.nn.Module
    scored: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    dataset: Any
    sampler: Any
    loader: Any
    val_corpus: Any
    ema: Any  # timm ModelEmaV3 or None
    momentum: Any  # ALBEF's momentum encoders (a ModelEmaV3) or None
    checkpointed: TrainerObjects  # what save_checkpoint writes and a resume loads back
    steps_per_epoch: int
    total_steps: int
    num_epochs: int
    distill_warmup: int
    # A ShardStream (WebDataset shards): each process reads its own shards, so its loader is not passed
    # through Accelerate (which would re-split or dispatch it); batches are moved to the device here.
    stream: bool = False

    @property
    def world(self) -> int:
        """How many processes train together."""
        return self.accelerator.num_processes

    def epoch_loader(self, epoch: int, skip_steps: int = 0):
        """The loader for ``epoch`` (``train.batch_size`` micro-batches), the batches of its first
        ``skip_steps`` optimizer steps skipped (a resumed epoch).

        Example: ``for batch in run.epoch_loader(3): ...``
        """
        skip_batches = skip_steps * self.cfg.train.accum_freq
        if self.stream:
            # The stream replays the epoch's shard order and skips what was trained on itself.
            self.dataset.set_epoch(epoch, skip_batches)
            return _on_device(self.loader, self.accelerator.device)
        epoch_loader = self.loader
        if skip_batches:
            epoch_loader = self.accelerator.skip_first_batches(self.loader, skip_batches)
        # Accelerate's loaders re-set the sampler's epoch from their own iteration count when
        # iterated; setting it through them keeps the order a function of the epoch alone.
        for target in (epoch_loader, self.sampler, self.dataset):
            if hasattr(target, "set_epoch"):
                target.set_epoch(epoch)
        return _started_without_drawing(epoch_loader) if skip_batches else epoch_loader

    def log_summary(self) -> None:
        """One log line: corpus, processes, batch, steps, trainable parameters, precision."""
        tc = self.cfg.train
        trainable = sum(p.numel() for p in self.unwrapped.parameters() if p.requires_grad)
        accumulated = f" x {tc.accum_freq} accumulated" if tc.accum_freq > 1 else ""
        logger.info("training %s: %d pairs, %d processes x batch %d%s, %d steps/epoch, %d steps, "
                    "%.1fM trainable parameters, precision %s", self.cfg.data.train,
                    self.dataset.samples_per_epoch if self.stream else len(self.dataset), self.world,
                    tc.batch_size, accumulated, self.steps_per_epoch, self.total_steps, trainable / 1e6,
                    tc.precision)


def _started_without_drawing(loader):
    """Iterate ``loader`` with its iterator started under ``fork_rng``. Starting a DataLoader's iterator draws
    its workers' seed from torch's global generator; the uninterrupted run drew it at the start of the epoch,
    before the checkpoint whose generator state a resume restores, so a resumed epoch must not draw it
    again (else every later dropout draw shifts)."""
    with torch.random.fork_rng(devices=[]):
        iterator = iter(loader)
        first = next(iterator, _END)  # Accelerate's loaders start the DataLoader at the first next()
    if first is not _END:
        yield first
        yield from iterator


_END = object()


def _on_device(loader, device: torch.device):
    """The batches of ``loader`` moved to ``device`` (what Accelerate's prepared loaders do)."""
    from accelerate.utils import send_to_device

    for batch in loader:
        yield send_to_device(batch, device)


def make_accelerator(cfg: RecipeConfig) -> "Accelerator":
    """The run's Accelerator, with ``train.precision`` (fp32 / bf16 / fp16 / auto) as its mixed precision.

    Example: ``accelerator = make_accelerator(load_recipe("recipes/demo-emoji.yaml"))``
    """
    from accelerate import Accelerator, DataLoaderConfiguration

    # Accelerator(cpu=True) is what lets `accelerate launch --multi_gpu` run gloo processes on a CPU box.
    accelerator = Accelerator(mixed_precision=resolve_precision(cfg.train.precision),
                              cpu=not torch.cuda.is_available(),
                              dataloader_config=DataLoaderConfiguration(even_batches=True))
    honour_fsdp_on_cpu(accelerator)
    return accelerator


# torch.compile's backend for train.compile (a module constant so a test can trace with "eager" in seconds).
COMPILE_BACKEND = "inductor"


def compile_for_training(model: torch.nn.Module, cfg: RecipeConfig) -> torch.nn.Module:
    """``model`` (as ``accelerator.prepare`` returned it) under ``torch.compile`` when ``train.compile`` is set.

    Compiled last, after any DDP wrapper, as Accelerate's ``dynamo_backend`` does; done here instead because
    Accelerate keeps its dynamo setting per process (the first run's, for every later run in it) and turns on
    TF32 for fp32 GPU runs. ``PreparedRun.unwrapped`` is the plain module (no ``_orig_mod.`` keys), which
    eval, EMA, checkpoints and ``final/`` use.

    Example: ``model = compile_for_training(accelerator.prepare(model), cfg)``
    """
    backend = compile_backend(cfg)
    return torch.compile(model, backend=backend) if backend else model


def compile_backend(cfg: RecipeConfig) -> Optional[str]:
    """torch.compile's backend for ``train.compile``: None when off, else :data:`COMPILE_BACKEND`, once it is
    known to work here; what is missing (a C++ compiler on a CPU, triton on a GPU) is a one-line error.

    Example:
        >>> compile_backend(load_recipe("recipes/demo-emoji.yaml", ["train.compile=true"]))
        'inductor'
    """
    if not cfg.train.compile:
        return None
    from torch._dynamo.eval_frame import is_dynamo_supported

    off = "or set train.compile: false"
    if not is_dynamo_supported():
        raise ValueError(f"train.compile: torch.compile does not support Python {sys.version.split()[0]} with "
                         f"torch {torch.__version__}; {off}")
    if COMPILE_BACKEND != "inductor":
        return COMPILE_BACKEND
    if torch.cuda.is_available():
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ValueError(f"train.compile: torch.compile on a GPU needs triton (pip install triton); {off}")
        return COMPILE_BACKEND
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except RuntimeError:  # inductor's InvalidCxxCompiler: none of its compilers (or $CXX) runs
        raise ValueError(f"train.compile: torch.compile on a CPU needs a C++ compiler (g++ or clang++, or $CXX "
                         f"naming one): apt-get install g++, {off}") from None
    return COMPILE_BACKEND


def resolve_precision(precision: str) -> str:
    """Accelerate's mixed-precision name for ``train.precision``. ``auto`` is bf16 where the device
    multiplies bf16 natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), else fp32 (``no``).

    Example:
        >>> resolve_precision("fp32"), resolve_precision("bf16")
        ('no', 'bf16')
    """
    if precision == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "no"
        return "bf16" if cpu_has_native_bf16() else "no"
    resolved = {"fp32": "no"}.get(precision, precision)
    if resolved not in ("no", "bf16", "fp16"):
        raise ValueError(f"train.precision: '{precision}' is not one of no (fp32), bf16, fp16, auto")
    return resolved


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); without either, bf16 matmuls
    fall back to a path that runs tens of times slower than fp32 (measured: 0.9 against 61 GFLOP/s).

    Example:
        >>> precision = "bf16" if cpu_has_native_bf16() else "no"
    """
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def _warn_if_slow_bf16(cfg: RecipeConfig, accelerator: "Accelerator") -> None:
    if cfg.train.precision == "auto":
        logger.info("train.precision=auto: %s on this device", resolve_precision("auto").replace("no", "fp32"))
    elif cfg.train.precision == "bf16" and accelerator.device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning("train.precision=bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX): bf16 matmuls "
                       "run tens of times slower than fp32 here; set train.precision=no for fp32")


def prepare_run(cfg: RecipeConfig, accelerator: "Accelerator", output_dir: Path) -> PreparedRun:
    """Seed, check for an earlier run, write ``recipe.json``, then build and prepare every object of the run.

    Example:
        >>> run = prepare_run(cfg, make_accelerator(cfg), Path(cfg.train.output_dir))
        >>> run.total_steps
    """
    from accelerate.utils import set_seed

    from ..data import EpochPermutationSampler, collate_image_text

    tc = cfg.train
    set_seed(tc.seed)
    world = accelerator.num_processes
    if uses_fsdp(accelerator):
        check_fsdp_supported(cfg, accelerator)
    _refuse_or_clear_earlier_run(cfg, accelerator, output_dir)
    _warn_if_slow_bf16(cfg, accelerator)
    if accelerator.is_main_process:
        write_json(cfg.to_dict(), output_dir / "recipe.json")

    model = build_start_model(cfg.model, augmentation=cfg.data.augmentation)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if uses_fsdp(accelerator):
        prepare_for_fsdp(model)  # before the optimizer takes its parameters
    loss_fn = _make_loss(cfg)
    dataset = build_train_dataset(cfg.data, model, tc.seed, tc.batch_size, accelerator.process_index, world,
                                  loss_name=cfg.loss.name)
    if isinstance(dataset, IterableDataset):
        return _prepare_stream_run(cfg, accelerator, model, loss_fn, dataset)
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
    model = compile_for_training(model, cfg)
    return _register_the_rest(cfg, accelerator, model, loss_fn, optimizer, dataset, sampler, loader, val_corpus,
                              steps_per_epoch=optimizer_steps(len(loader), tc.accum_freq))


def _prepare_stream_run(cfg: RecipeConfig, accelerator: "Accelerator", model, loss_fn, dataset) -> PreparedRun:
    """:func:`prepare_run` for a ShardStream: a plain DataLoader over this process's stream, outside
    Accelerate (its IterableDatasetShard / dispatching would split the stream a second time)."""
    from ..data import collate_image_text

    tc = cfg.train
    # Its own generator: creating the loader's iterator each epoch leaves the global RNG untouched.
    loader = DataLoader(dataset, batch_size=tc.batch_size, num_workers=cfg.data.num_workers,
                        collate_fn=collate_image_text, persistent_workers=False,
                        pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(tc.seed))
    val_corpus = open_named_corpus(cfg.data.val, cfg.data, cfg.data.val_split) if cfg.data.val else None
    optimizer = create_optimizer(model, tc)
    model, optimizer = accelerator.prepare(model, optimizer)
    model = compile_for_training(model, cfg)
    return _register_the_rest(cfg, accelerator, model, loss_fn, optimizer, dataset, None, loader, val_corpus,
                              steps_per_epoch=optimizer_steps(dataset.steps_per_epoch, tc.accum_freq), stream=True)


def _register_the_rest(cfg: RecipeConfig, accelerator: "Accelerator", model, loss_fn, optimizer, dataset, sampler,
                       loader, val_corpus, steps_per_epoch: int, stream: bool = False) -> PreparedRun:
    """The schedule, EMA, momentum model and loss buffers, gathered with the model and optimizer for
    checkpoints."""
    tc = cfg.train
    total_steps = tc.max_steps or tc.epochs * steps_per_epoch
    # Not passed through accelerator.prepare(): that steps it once per process per step; we step
    # it once per optimizer step and our checkpoints carry it.
    scheduler = create_scheduler(optimizer, tc, total_steps)
    # The plain module under torch.compile and DDP: what eval, EMA and checkpoints use (no _orig_mod. keys;
    # unwrap_model keeps the compile wrapper by default, and accelerate < 1.4 has no option to drop it).
    unwrapped = accelerator.unwrap_model(getattr(model, "_orig_mod", model))
    ema = _make_ema(unwrapped, tc)
    momentum = _make_momentum_model(unwrapped, cfg)
    stateful_loss = any(True for _ in loss_fn.buffers())  # the ITC queue: saved and restored with the run
    if stateful_loss:
        loss_fn.to(accelerator.device)
    checkpointed = TrainerObjects(accelerator, unwrapped, optimizer, scheduler, ema=ema, momentum=momentum,
                                  loss_fn=loss_fn if stateful_loss else None, sharded=uses_fsdp(accelerator))
    distill_warmup = cfg.loss.distill_warmup_steps if cfg.loss.distill_warmup_steps is not None else steps_per_epoch
    return PreparedRun(cfg=cfg, accelerator=accelerator, model=model, unwrapped=unwrapped,
                       scored=ema.module if ema is not None else unwrapped, loss_fn=loss_fn, optimizer=optimizer,
                       scheduler=scheduler, dataset=dataset, sampler=sampler, loader=loader, val_corpus=val_corpus,
                       ema=ema, momentum=momentum, checkpointed=checkpointed, steps_per_epoch=steps_per_epoch,
                       total_steps=total_steps, num_epochs=math.ceil(total_steps / steps_per_epoch),
                       distill_warmup=distill_warmup, stream=stream)


def _refuse_or_clear_earlier_run(cfg: RecipeConfig, accelerator: "Accelerator", output_dir: Path) -> None:
    """Checkpoints of an earlier run in ``output_dir``: an error, unless ``train.resume`` continues them or
    ``train.overwrite`` removes them. Checked before anything is written, so a refused run leaves the
    earlier one untouched."""
    tc = cfg.train
    earlier = list_checkpoints(output_dir)
    if not earlier or tc.resume:
        return
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


def _make_ema(model: torch.nn.Module, tc) -> Optional[Any]:
    """timm's ModelEmaV3 over ``model`` when ``train.ema_decay`` is set, else None."""
    if tc.ema_decay is None:
        return None
    if not 0.0 <= tc.ema_decay < 1.0:
        raise ValueError(f"train.ema_decay must be in [0, 1) (e.g. 0.999), got {tc.ema_decay}")
    from timm.utils import ModelEmaV3

    # Kept in float32 beside float32 weights (Accelerate's bf16 is autocast), so updates never round away.
    return ModelEmaV3(model, decay=tc.ema_decay, use_warmup=tc.ema_warmup, warmup_power=0.75)


def _make_loss(cfg: RecipeConfig) -> torch.nn.Module:
    """The recipe's objective; ALBEF's takes its weights, momentum and queue settings from ``loss``."""
    if cfg.loss.name == "slip":
        return create_loss("slip", ssl_weight=cfg.loss.ssl_weight, ssl_temperature=cfg.loss.ssl_temperature)
    if cfg.loss.name != "albef":
        return create_loss(cfg.loss.name)
    settings = {k: v for k, v in dataclasses.asdict(cfg.loss).items()
                if k not in ("name", "weight", "ssl_weight", "ssl_temperature")}
    return create_loss("albef", **settings)


def _make_momentum_model(model: torch.nn.Module, cfg: RecipeConfig) -> Optional[Any]:
    """ALBEF's momentum encoders: an EMA copy of the model (``loss.momentum``), updated every step."""
    if cfg.loss.name != "albef" or not cfg.loss.momentum:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.loss.momentum)
