"""Training under FSDP: PyTorch's ``fully_shard`` (FSDP2) driven by Accelerate's FSDP plugin, for towers whose
parameters, gradients and optimizer state do not fit one device.

Launch with the FSDP config (``fsdp_version: 2``)::

    accelerate launch --config_file recipes/accelerate/fsdp.yaml -m vlpretrain.cli.main train RECIPE

What changes under FSDP, and why:

- the model is called only through ``forward`` (encoding, logit scale and bias come out of its dict): FSDP
  gathers a sharded module's parameters in its forward hook, so ``encode_image`` / ``encode_text`` called
  outside it would see shards (what stopped open_clip's FSDP attempt);
- ``fully_shard`` refuses 0-dim parameters, so the logit scale (and SigLIP's bias) train as 1-element vectors;
  ``final/`` holds them as scalars again, in the ordinary format;
- checkpoints are sharded: each process writes its own shards (:mod:`.sharded_checkpoint`), and ``final/`` is
  consolidated (the full state dict gathered to the main process);
- what is not supported yet is refused before anything is built, in one line naming it
  (:func:`check_fsdp_supported`).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Optional

import torch

from ..config import RecipeConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger("vlpretrain.train")

# Where a 0-dim parameter's name is kept on the model once it trains as a 1-element vector.
_SCALARS_ATTR = "fsdp_scalar_params"
_USE_DDP = "turn it off or train with DDP (recipes/accelerate/multi-gpu.yaml)"


def uses_fsdp(accelerator: "Accelerator") -> bool:
    """True when Accelerate shards the model with FSDP.

    Example: ``if uses_fsdp(run.accelerator): ...``
    """
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def honour_fsdp_on_cpu(accelerator: "Accelerator") -> None:
    """Make Accelerate shard with FSDP on CPU processes (gloo) when ``accelerate launch`` asked for FSDP.

    Accelerate 1.15 builds the FSDP plugin from the launcher's ``FSDP_*`` variables but, with
    ``Accelerator(cpu=True)``, silently trains with DDP instead; torch's ``fully_shard`` itself runs on a CPU
    device mesh with gloo, so the plugin is put in place here (what Accelerate does on a GPU).

    Example: ``accelerator = Accelerator(cpu=True); honour_fsdp_on_cpu(accelerator)``
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not asked or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch set
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    from accelerate.state import PartialState

    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    # As Accelerate does on a GPU: every later AcceleratorState() copies the process state's type back.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def check_fsdp_supported(cfg: RecipeConfig, accelerator: "Accelerator") -> None:
    """Refuse, in one line naming it, what the trainer does not support under FSDP yet.

    Example: ``check_fsdp_supported(cfg, accelerator)`` raises ``ValueError("train.ema_decay (EMA weights) is
    not supported with FSDP yet; ...")``
    """
    version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
    if version != 2:
        raise ValueError(f"FSDP version {version} is not supported: set fsdp_version: 2 in the Accelerate config "
                         f"(as recipes/accelerate/fsdp.yaml does)")
    tc = cfg.train
    unsupported = [
        (tc.ema_decay is not None, "train.ema_decay (EMA weights)"),
        (cfg.loss.name == "albef" and bool(cfg.loss.momentum), "loss.momentum (ALBEF's momentum encoders)"),
        (bool(cfg.model.fusion), "model.fusion (fusion heads)"),
        (bool(cfg.data.val), "data.val (validation during training; evaluate final/ with vlp eval instead)"),
        # The suite runs on the main process alone, but a sharded model's forward needs every process.
        (bool(getattr(tc, "eval_suite", None)),
         "train.eval_suite (evaluation during training; evaluate final/ with vlp eval run instead)"),
        (tc.accum_freq > 1, "train.accum_freq > 1"),
        (bool(tc.compile), "train.compile"),
        (tc.precision == "fp16", "train.precision=fp16 (use bf16 or fp32)"),
        (cfg.model.lock_text and cfg.model.cache_locked_text, "model.cache_locked_text"),
        # The monitors read the logit scale outside forward (a shard on all but one process).
        (bool(getattr(tc, "monitor_every", 0)), "train.monitor_every (health monitors)"),
    ]
    for refused, what in unsupported:
        if refused:
            raise ValueError(f"{what} is not supported with FSDP yet; {_USE_DDP}")


def prepare_for_fsdp(model: torch.nn.Module) -> list[str]:
    """Turn every 0-dim parameter of ``model`` into a 1-element vector (``fully_shard`` refuses scalars), in
    place, before the optimizer is built; returns their names, also kept on the model for
    :func:`consolidated_state_dict`. The numbers are the same: a 1-element scale broadcasts like a scalar.

    Example:
        >>> prepare_for_fsdp(model)
        ['clip.logit_scale']
    """
    names = []
    for name, param in list(model.named_parameters()):
        if param.ndim == 0:
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            setattr(owner, leaf, torch.nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
            names.append(name)
    setattr(model, _SCALARS_ATTR, names)
    return names


def consolidated_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of the sharded ``model`` on the main process (CPU tensors; empty elsewhere), with the
    parameters :func:`prepare_for_fsdp` reshaped back to scalars: what ``save_pretrained`` writes. A collective:
    every process calls it.

    Example: ``model.save_pretrained(final_dir, state_dict=consolidated_state_dict(model))`` on the main process
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for name in getattr(model, _SCALARS_ATTR, []):
        if name in full:
            full[name] = full[name].reshape(())
    return full


def sharded_first_non_finite(model: torch.nn.Module, accelerator: "Accelerator") -> Optional[str]:
    """Like ``first_non_finite(model.state_dict())`` for a sharded model: each process checks its own shards and
    every process gets the same answer (a weight's name, or "a weight on another process"). A collective.

    Example: ``bad = sharded_first_non_finite(run.unwrapped, run.accelerator)``
    """
    from ..models.dual_encoder import first_non_finite

    local = {name: getattr(value, "to_local", lambda v=value: v)() for name, value in model.state_dict().items()}
    bad = first_non_finite(local)
    anywhere = accelerator.reduce(torch.tensor(float(bad is not None), device=accelerator.device), "sum").item()
    if not anywhere:
        return None
    return bad or "a weight held by another process"


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: a sharded parameter (DTensor) gathered from every process (a collective), anything else
    as it is.

    Example: ``full_tensor(run.unwrapped.logit_scale).exp().item()`` (every process calls it)
    """
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
