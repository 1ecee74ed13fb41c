"""A run's trainer objects as safetensors + JSON, and back: what a checkpoint holds besides where the
run stands (``trainer_state.json``).

Each object's ``state_dict()`` is split into its tensors (``NAME.safetensors``) and everything else
(``NAME.json``: the nesting, plain numbers, strings and flags, and for each tensor the key it is stored
under). Neither format can hold code, so resuming a checkpoint never runs any. This replaces
Accelerate's ``save_state`` / ``load_state``, which pickle the objects registered for checkpointing and
the random states, and unpickle some of them without ``weights_only``.

A checkpoint folder holds:

- ``model.safetensors``, ``vlp_config.json`` (and ``hf/`` for a transformers model): the model, as
  ``vlpretrain.load_model(folder)`` reads it;
- ``optimizer``, ``scheduler``, ``ema``, ``momentum`` (ALBEF's momentum encoders), ``loss`` (its ITC
  queue) and ``grad_scaler`` (fp16) as ``.json`` + ``.safetensors`` pairs, where the run has them;
  under several processes these are the same on every process and the main one writes them;
- ``random_states_rankR.json`` + ``.safetensors``: each process's Python, NumPy, torch and CUDA
  generators, restored as Accelerate's ``load_state`` restored them.

Under FSDP the model and optimizer state are sharded: each process writes its own shards instead of
``model.safetensors`` and ``optimizer`` (see :mod:`vlpretrain.training.sharded_checkpoint`).

Example:
    >>> objects = TrainerObjects(accelerator, unwrapped, optimizer, scheduler)
    >>> save_trainer_objects(objects, Path("runs/x/checkpoints/.tmp_step_00000010"))
    >>> load_trainer_objects(objects, Path("runs/x/checkpoints/step_00000010"))
"""

from __future__ import annotations

import logging
import numbers
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Optional

import numpy as np
import torch

from ..io import atomic_write, read_json, write_json

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger("vlpretrain.train")

STATE_FORMAT = "vlpretrain-state-v1"
# JSON stand-ins for what JSON has no type for: a tensor (its key in the .safetensors file), a tuple,
# and a mapping whose keys are not all strings (the optimizer's state is keyed by parameter index).
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_TAGS = frozenset((_TENSOR, _TUPLE, _ITEMS))
_DAMAGED = "the checkpoint is damaged: resume from another checkpoint (--resume FOLDER)"
# The objects a run may or may not have, by file stem (the optimizer and schedule are always there).
_OPTIONAL = ("ema", "momentum", "loss", "grad_scaler")


def random_states_name(rank: int) -> str:
    """The file stem of process ``rank``'s random states.

    Example:
        >>> random_states_name(1)
        'random_states_rank1'
    """
    return f"random_states_rank{rank}"


@dataclass
class TrainerObjects:
    """What a checkpoint carries of a run: the model (unwrapped), optimizer, schedule, and where the run
    has them the EMA weights, ALBEF's momentum encoders and the loss's buffers (its ITC queue).

    Example: ``TrainerObjects(accelerator, unwrapped, optimizer, scheduler, ema=ema)``
    """

    accelerator: "Accelerator"
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    ema: Optional[Any] = None
    momentum: Optional[Any] = None
    loss_fn: Optional[torch.nn.Module] = None
    # FSDP: each process holds shards of the model and optimizer state (see sharded_checkpoint.py).
    sharded: bool = False

    def shared(self) -> dict[str, Any]:
        """The objects whose state is the same on every process, by file stem (the main process saves
        them): gradients are all-reduced and the queue is filled from all processes' features. Under FSDP
        the optimizer state is sharded, so each process saves its own."""
        named = {"optimizer": None if self.sharded else self.optimizer, "scheduler": self.scheduler, "ema": self.ema,
                 "momentum": self.momentum, "loss": self.loss_fn,
                 "grad_scaler": getattr(self.accelerator, "scaler", None)}
        return {name: obj for name, obj in named.items() if obj is not None}


def save_trainer_objects(objects: TrainerObjects, folder: Path) -> None:
    """Every process calls this: the main process writes the model's files and the shared objects'
    state into ``folder``, each process its own random states.

    Example: ``save_trainer_objects(objects, tmp)`` (then a barrier, then the manifest)
    """
    from ..models.dual_encoder import write_model_files

    accelerator = objects.accelerator
    if objects.sharded:
        from .sharded_checkpoint import save_sharded_objects

        save_sharded_objects(objects, folder)
    if accelerator.is_main_process:
        if not objects.sharded:
            write_model_files(objects.model, folder)
        for name, obj in objects.shared().items():
            save_state_files(obj.state_dict(), folder, name)
    save_state_files(_random_states(), folder, random_states_name(accelerator.process_index))


def load_trainer_objects(objects: TrainerObjects, folder: Path, listed: Collection[str]) -> None:
    """Load the checkpoint ``folder`` into ``objects`` and this process's generators. Only files in
    ``listed`` (its verified manifest) are read; a missing one is a one-line error naming it.

    Example: ``load_trainer_objects(objects, checkpoint, verify_checkpoint(checkpoint))``
    """
    from ..models.dual_encoder import WEIGHTS_NAME
    from .sharded_checkpoint import check_shard_layout, load_sharded_objects

    check_shard_layout(folder, listed, objects.accelerator.num_processes, objects.sharded)
    if objects.sharded:
        load_sharded_objects(objects, folder, listed)
    else:
        weights = _listed_path(folder, WEIGHTS_NAME, listed)
        _load_into(objects.model, _load_tensors(weights), weights)
    shared = objects.shared()
    for name, obj in shared.items():
        _load_into(obj, load_state_files(folder, name, listed), folder / f"{name}.json")
    unused = [name for name in _OPTIONAL if f"{name}.json" in listed and name not in shared]
    if unused:
        logger.warning("%s holds %s state this run does not use (its recipe differs from the one that saved it)",
                       folder, ", ".join(unused))
    rank = objects.accelerator.process_index
    stem = random_states_name(rank)
    if f"{stem}.json" in listed:
        _set_random_states(load_state_files(folder, stem, listed))
    else:
        # Accelerate's load_state did the same: a process the saving run did not have keeps its seed.
        logger.warning("%s has no random states for process %d (saved by fewer processes): it keeps its own seed",
                       folder, rank)


def _load_into(obj: Any, state: Any, path: Path) -> None:
    """``obj.load_state_dict(state)``; a state of another shape (another recipe) is one line naming the file."""
    try:
        obj.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        # torch's own message starts "Error(s) in loading state_dict for X:"; the line after it says what.
        lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.strip().endswith(":")]
        reason = (lines or [type(e).__name__])[0][:300]
        raise ValueError(f"{path}: does not fit this run ({reason}); resume with the recipe that wrote the "
                         f"checkpoint") from None


def save_state_files(state: Any, folder: Path, name: str) -> None:
    """Write ``state`` (a ``state_dict()``: tensors, numbers, strings, lists, tuples, dicts) as
    ``NAME.json`` and, if it holds tensors, ``NAME.safetensors``.

    Example: ``save_state_files(optimizer.state_dict(), folder, "optimizer")``
    """
    from safetensors.torch import save_file

    tree, tensors = split_state(state)
    tensors_file = f"{name}.safetensors" if tensors else None
    if tensors_file:
        atomic_write(folder / tensors_file, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_json({"format": STATE_FORMAT, "tensors": tensors_file, "state": tree}, folder / f"{name}.json")


def load_state_files(folder: Path, name: str, listed: Optional[Collection[str]] = None) -> Any:
    """The state :func:`save_state_files` wrote as ``name`` in ``folder`` (tensors on the CPU). With
    ``listed`` (a checkpoint's manifest), a file not in it is refused rather than read.

    Example: ``optimizer.load_state_dict(load_state_files(folder, "optimizer"))``
    """
    path = _listed_path(folder, f"{name}.json", listed)
    data = read_json(path, _DAMAGED)
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT or "state" not in data:
        raise ValueError(f"{path}: not a {STATE_FORMAT} state file; {_DAMAGED}")
    tensors_file = data.get("tensors")
    tensors = _load_tensors(_listed_path(folder, Path(tensors_file).name, listed)) if tensors_file else {}
    return join_state(data["state"], tensors, path)


def _listed_path(folder: Path, name: str, listed: Optional[Collection[str]]) -> Path:
    if listed is not None and name not in listed:
        raise FileNotFoundError(f"{folder / name}: not in the checkpoint's manifest, and the run needs it: resume "
                                f"with the recipe that wrote the checkpoint, or from another checkpoint")
    return folder / name


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: unreadable tensors ({e}); {_DAMAGED}") from None


def split_state(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``state`` as a JSON-able tree plus the tensors it referred to (CPU copies, by key).

    Anything else (a function, an object) is refused: it could only be stored by pickling it.

    Example:
        >>> split_state({"step": 3, "betas": (0.9, 0.98), "state": {0: torch.zeros(2)}})[0]
        {'step': 3, 'betas': {'__tuple__': [0.9, 0.98]}, 'state': {'__items__': [[0, {'__tensor__': 'state.0'}]]}}
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            while key in tensors:  # a nested key spelled like a dotted one: keep both
                key += "'"
            # A copy of its own: safetensors refuses tensors that share storage (tied weights).
            tensors[key] = value.detach().to("cpu").contiguous().clone()
            return {_TENSOR: key}
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, numbers.Integral):
            return int(value)
        if isinstance(value, numbers.Real):
            return float(value)
        if isinstance(value, tuple):
            return {_TUPLE: [encode(v, f"{key}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, f"{key}.{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            prefix = f"{key}." if key else ""
            if all(isinstance(k, str) for k in value) and not _TAGS.intersection(value):
                return {k: encode(v, f"{prefix}{k}") for k, v in value.items()}
            return {_ITEMS: [[encode(k, f"{prefix}{k}:key"), encode(v, f"{prefix}{k}")] for k, v in value.items()]}
        raise TypeError(f"checkpoint state at '{key}': a {type(value).__name__} cannot be saved as safetensors "
                        f"or JSON")

    return encode(state, ""), tensors


def join_state(tree: Any, tensors: dict[str, torch.Tensor], source: Path | str = "state") -> Any:
    """The state :func:`split_state` took apart; ``source`` names the file in errors.

    Example:
        >>> tree, tensors = split_state({"betas": (0.9, 0.98)})
        >>> join_state(tree, tensors)
        {'betas': (0.9, 0.98)}
    """

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1 and _TENSOR in value:
            if value[_TENSOR] not in tensors:
                raise ValueError(f"{source}: names tensor '{value[_TENSOR]}', which its .safetensors file does "
                                 f"not hold; {_DAMAGED}")
            return tensors[value[_TENSOR]]
        if len(value) == 1 and _TUPLE in value:
            return tuple(decode(v) for v in value[_TUPLE])
        if len(value) == 1 and _ITEMS in value:
            return {_hashable(decode(k)): decode(v) for k, v in value[_ITEMS]}
        return {k: decode(v) for k, v in value.items()}

    return decode(tree)


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def _random_states() -> dict[str, Any]:
    """This process's generators: what Accelerate's ``save_state`` pickled into ``random_states_R.pkl``."""
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": {"name": name, "key": key.tolist(), "pos": pos, "has_gauss": has_gauss,
                        "cached_gaussian": cached_gaussian}}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_random_states(states: dict[str, Any]) -> None:
    """Restore what :func:`_random_states` saved, as Accelerate's ``load_state`` did."""
    random.setstate(states["python"])
    n = states["numpy"]
    np.random.set_state((n["name"], np.asarray(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
