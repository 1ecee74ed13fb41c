"""Sharded checkpoints of an FSDP run, without pickles: each process writes the shards it holds of the model
and of the optimizer state as safetensors + JSON, and the main process a layout file.

torch.distributed.checkpoint's own writer is not used: its ``.metadata`` file is a pickle. The shards are
taken from (and put back through) its state-dict API (``get_model_state_dict`` / ``set_model_state_dict``
and the optimizer counterparts), which hands out each parameter as a ``DTensor``; ``to_local()`` is the
process's shard, and ``DTensor.from_local`` with the live parameter's mesh and placements puts it back.

A sharded checkpoint folder holds, beside the usual ``trainer_state.json``, scheduler, random states and
manifest (see :mod:`.checkpoint_state`):

- ``fsdp_shards.json``: format, world size, and each model tensor's global shape, dtype and placement;
- ``model_shard_rankR.json`` + ``.safetensors``: process R's shards of the model's weights;
- ``optimizer_rankR.json`` + ``.safetensors``: process R's shards of the optimizer state;
- ``vlp_config.json``: the model's config (the weights are consolidated in ``final/`` only).

A shard holds rows of a tensor split by world size, so a resume needs the same number of processes; another
number is refused in one line.

Example:
    >>> save_sharded_objects(objects, tmp)     # every process
    >>> load_sharded_objects(objects, checkpoint, verify_checkpoint(checkpoint))
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection

import torch

from ..io import read_json, write_json

if TYPE_CHECKING:
    from .checkpoint_state import TrainerObjects

SHARD_LAYOUT = "fsdp_shards.json"
SHARD_FORMAT = "vlpretrain-fsdp-shards-v1"


def model_shard_name(rank: int) -> str:
    """The file stem of process ``rank``'s model shards.

    Example:
        >>> model_shard_name(1)
        'model_shard_rank1'
    """
    return f"model_shard_rank{rank}"


def optimizer_shard_name(rank: int) -> str:
    """The file stem of process ``rank``'s optimizer-state shards.

    Example:
        >>> optimizer_shard_name(0)
        'optimizer_rank0'
    """
    return f"optimizer_rank{rank}"


def _local(value: Any) -> Any:
    """A DTensor's shard on this process; anything else as it is."""
    return value.to_local() if hasattr(value, "to_local") else value


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # under Accelerate's AcceleratedOptimizer


def save_sharded_objects(objects: "TrainerObjects", folder: Path) -> None:
    """Every process writes its shards of the model and the optimizer state into ``folder``; the main process
    also the layout (``fsdp_shards.json``) and the model's config. A collective.

    Example: ``save_sharded_objects(run.checkpointed, tmp)``
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from ..models.dual_encoder import CONFIG_NAME
    from .checkpoint_state import save_state_files
    from .fsdp import sharded_first_non_finite

    accelerator = objects.accelerator
    rank = accelerator.process_index
    # As save_pretrained does for unsharded weights: no shard of NaN / inf is written (every process gets the
    # same answer, so all of them stop together).
    bad = sharded_first_non_finite(objects.model, accelerator)
    if bad is not None:
        raise ValueError(f"{folder}: checkpoint not written: the weights hold NaN or inf values (e.g. {bad}); "
                         f"resume from the last checkpoint with a lower train.lr or a train.grad_clip_norm")
    model_state = get_model_state_dict(objects.model)
    optimizer_state = get_optimizer_state_dict(objects.model, _torch_optimizer(objects.optimizer))
    save_state_files({name: _local(value) for name, value in model_state.items()}, folder, model_shard_name(rank))
    local_optimizer = {**optimizer_state,
                       "state": {name: {k: _local(v) for k, v in entry.items()}
                                 for name, entry in optimizer_state["state"].items()}}
    save_state_files(local_optimizer, folder, optimizer_shard_name(rank))
    if accelerator.is_main_process:
        layout = {name: {"shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", ""),
                         "placements": [str(p) for p in getattr(value, "placements", ())]}
                  for name, value in model_state.items()}
        write_json({"format": SHARD_FORMAT, "world_size": accelerator.num_processes, "fsdp_version": 2,
                    "tensors": layout}, folder / SHARD_LAYOUT)
        write_json(objects.model.config_dict(), folder / CONFIG_NAME)


def check_shard_layout(folder: Path, listed: Collection[str], world_size: int, sharded_run: bool) -> None:
    """Refuse, in one line, a checkpoint whose shards do not fit this run: a sharded one in a run without FSDP,
    an unsharded one under FSDP, or shards written by another number of processes.

    Example: ``check_shard_layout(checkpoint, listed, accelerator.num_processes, sharded_run=True)``
    """
    advice = "or start over with train.overwrite=true"
    if SHARD_LAYOUT not in listed:
        if sharded_run:
            raise ValueError(f"{folder}: not an FSDP checkpoint (it has no {SHARD_LAYOUT}); resume it without FSDP "
                             f"(DDP), or start this FSDP run from its weights with model.init_from={folder}")
        return
    layout = read_json(folder / SHARD_LAYOUT, f"resume from another checkpoint {advice}")
    saved = layout.get("world_size") if isinstance(layout, dict) else None
    if not isinstance(layout, dict) or layout.get("format") != SHARD_FORMAT or not isinstance(saved, int):
        raise ValueError(f"{folder / SHARD_LAYOUT}: not a {SHARD_FORMAT} layout; resume from another checkpoint "
                         f"{advice}")
    if not sharded_run:
        raise ValueError(f"{folder}: sharded by FSDP over {saved} processes; resume it under FSDP with {saved} "
                         f"processes (accelerate launch --config_file recipes/accelerate/fsdp.yaml "
                         f"--num_processes {saved}), or use its final/ weights")
    if saved != world_size:
        raise ValueError(f"{folder}: sharded by FSDP over {saved} processes, but this run has {world_size}; resume "
                         f"with --num_processes {saved} (FSDP shards are per process), {advice}")


def load_sharded_objects(objects: "TrainerObjects", folder: Path, listed: Collection[str]) -> None:
    """Put this process's shards of the model and optimizer state from ``folder`` back into ``objects``; the
    layout must fit (:func:`check_shard_layout`, called before). A collective.

    Example: ``load_sharded_objects(run.checkpointed, checkpoint, verify_checkpoint(checkpoint))``
    """
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.tensor import DTensor

    from .checkpoint_state import load_state_files

    rank = objects.accelerator.process_index
    live = get_model_state_dict(objects.model)
    saved = load_state_files(folder, model_shard_name(rank), listed)
    if not isinstance(saved, dict) or set(saved) != set(live):
        differing = sorted(set(live) ^ set(saved or {}))[:3]
        raise ValueError(f"{folder / model_shard_name(rank)}.json: does not fit this model (e.g. {', '.join(differing)}"
                         f"); resume with the recipe that wrote the checkpoint")

    def like(reference: Any, local: torch.Tensor, name: str) -> Any:
        """``local`` (this process's shard) as a DTensor laid out like the live ``reference``."""
        if not isinstance(reference, DTensor):
            return local
        if tuple(local.shape) != tuple(reference.to_local().shape):
            raise ValueError(f"{folder}: the shard of {name} is {tuple(local.shape)} here but "
                             f"{tuple(reference.to_local().shape)} in this run; resume with the recipe that wrote it")
        return DTensor.from_local(local.to(reference.device, reference.dtype), reference.device_mesh,
                                  reference.placements, shape=reference.shape, stride=reference.stride())

    set_model_state_dict(objects.model, {name: like(live[name], saved[name], name) for name in live})
    optimizer_state = load_state_files(folder, optimizer_shard_name(rank), listed)
    _check_optimizer_shard(optimizer_state, live, folder / f"{optimizer_shard_name(rank)}.json")
    # Optimizer state is keyed by parameter name; each moment is laid out like its parameter.
    optimizer_state["state"] = {
        name: {key: like(live[name], value, name) if isinstance(value, torch.Tensor) and value.ndim else value
               for key, value in entry.items()}
        for name, entry in optimizer_state["state"].items()}
    set_optimizer_state_dict(objects.model, _torch_optimizer(objects.optimizer), optimizer_state)


def _check_optimizer_shard(optimizer_state: Any, live: Collection[str], path: Path) -> None:
    """Refuse, in one line naming ``path``, optimizer shards without a ``state`` table (of per-parameter dicts)
    or with state for parameters this model lacks.

    Example:
        >>> _check_optimizer_shard({"state": {"w": {}}}, {"w"}, Path("optimizer_rank0.json"))
    """
    fix = "resume with the recipe that wrote the checkpoint, or start over with train.overwrite=true"
    state = optimizer_state.get("state") if isinstance(optimizer_state, dict) else None
    if not isinstance(state, dict) or not all(isinstance(entry, dict) for entry in state.values()):
        raise ValueError(f"{path}: no optimizer state table ('state' of per-parameter entries); {fix}")
    unknown = sorted(set(state) - set(live))
    if unknown:
        raise ValueError(f"{path}: optimizer state for parameters this model does not have (e.g. "
                         f"{', '.join(unknown[:3])}); {fix}")
