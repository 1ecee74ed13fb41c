"""Training checkpoint folders: written whole under a temporary name and swapped into place, with a
SHA-256 manifest written last and checked before a resume reads anything.

A folder ``checkpoints/step_N`` holds the model (``vlpretrain.load_model(folder)`` loads it; under FSDP,
per-process shards instead, see :mod:`.sharded_checkpoint`), the trainer
objects' state as safetensors + JSON (see :mod:`vlpretrain.training.checkpoint_state`), where the run
stands (``trainer_state.json``) and ``checkpoint_manifest.json``. Nothing in it is a pickle: a
checkpoint of an older version (Accelerate's ``.pkl`` / ``.bin`` pickles) is refused, never unpickled.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Optional

from ..data.shard_format import sha256_of
from ..io import read_manifest, replace_folder, write_json
from .checkpoint_state import save_trainer_objects

if TYPE_CHECKING:
    from .checkpoint_state import TrainerObjects

logger = logging.getLogger("vlpretrain.train")

TRAINER_STATE = "trainer_state.json"
MANIFEST = "checkpoint_manifest.json"
MANIFEST_FORMAT = "vlpretrain-checkpoint-v1"
REFUSE_ADVICE = "resume from another checkpoint (--resume FOLDER) or start over with train.overwrite=true"
# What Accelerate's save_state wrote: pickles (torch.save without weights_only on load).
_PICKLED = ("*.pkl", "*.bin", "*.pt", "*.pth")
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first (a folder only gets its final name once complete)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, output_dir: str | Path) -> Optional[Path]:
    """``latest`` or its synonym ``auto`` -> newest checkpoint of ``output_dir`` (None if there is none:
    a fresh start); else a folder path."""
    if resume in ("latest", "auto"):
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"train.resume: {path} is not a checkpoint folder (no {TRAINER_STATE}); "
                                f"use 'auto' (or 'latest') or a folder under {checkpoint_root(output_dir)}")
    return path


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / TRAINER_STATE).read_text())


def save_checkpoint(objects: "TrainerObjects", output_dir: str | Path, state: dict, keep: int = 2) -> Path:
    """Every process calls this. Writes into a temporary folder, then swaps it into place.

    The temporary folder has a fixed name (``.tmp_step_N``) rather than a random one, so every process
    finds the folder the main process made without a broadcast. The manifest is written last, once
    every process has written its files.

    Example: ``save_checkpoint(run.checkpointed, out, position.trainer_state(1000, 8))``
    """
    accelerator = objects.accelerator
    root = checkpoint_root(output_dir)
    final = root / f"step_{state['step']:08d}"
    tmp = root / f".tmp_step_{state['step']:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_trainer_objects(objects, tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(state, tmp / TRAINER_STATE)
        write_manifest(tmp)
        replace_folder(tmp, final)  # a checkpoint saved again at the same step is swapped whole
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def write_manifest(folder: Path) -> Path:
    """List every file under ``folder`` (its relative path, size and SHA-256) in ``checkpoint_manifest.json``.

    Example: ``write_manifest(Path("runs/x/checkpoints/.tmp_step_00000010"))``
    """
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    return write_json({"format": MANIFEST_FORMAT, "files": files}, folder / MANIFEST)


def verify_checkpoint(folder: Path) -> set[str]:
    """Check ``folder`` against its manifest before anything in it is read; returns the listed files.

    A checkpoint of an older version (pickles, no manifest), a missing manifest, or a listed file that
    is missing, of another size or another SHA-256 is a one-line error naming the file and what to do.
    Files the manifest does not list are never read (a warning names them).

    Example: ``load_trainer_objects(objects, checkpoint, verify_checkpoint(checkpoint))``
    """
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        pickled = sorted({p.name for pattern in _PICKLED for p in folder.glob(pattern)})
        if pickled:
            named = ", ".join(pickled[:5]) + (f" and {len(pickled) - 5} more" if len(pickled) > 5 else "")
            raise ValueError(f"{folder}: written by an older version of vlpretrain, whose checkpoints hold pickles "
                             f"({named}), and unpickling a file can run any code, so it is not "
                             f"loaded: start a new run from its weights (model.safetensors, which holds no code) "
                             f"with model.init_from={folder}, or start over with train.overwrite=true")
        raise FileNotFoundError(f"{manifest_path}: not found (the checkpoint is incomplete or was not written by "
                                f"vlpretrain); {REFUSE_ADVICE}")
    files = read_manifest(manifest_path, MANIFEST_FORMAT, REFUSE_ADVICE).get("files")
    if not isinstance(files, dict):
        raise ValueError(f"{manifest_path}: has no file list; {REFUSE_ADVICE}")
    for name, entry in files.items():
        _verify_file(folder, name, entry, manifest_path)
    unlisted = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                      if p.is_file() and p != manifest_path and p.relative_to(folder).as_posix() not in files)
    if unlisted:
        logger.warning("%s: ignoring %d files its manifest does not list (never read): %s", folder, len(unlisted),
                       ", ".join(unlisted[:5]) + (" ..." if len(unlisted) > 5 else ""))
    return set(files)


def _verify_file(folder: Path, name: str, entry: dict, manifest_path: Path) -> None:
    """One listed file: present, of the listed size and SHA-256 (size first: a truncation is named so)."""
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or not isinstance(entry, dict):
        raise ValueError(f"{manifest_path}: lists '{name}', which is not a file inside the checkpoint; "
                         f"{REFUSE_ADVICE}")
    path = folder / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (listed in {MANIFEST}); {REFUSE_ADVICE}")
    size = path.stat().st_size
    if size != entry.get("bytes"):
        raise ValueError(f"{path}: {size} bytes, but {MANIFEST} lists {entry.get('bytes')} (truncated or changed "
                         f"since it was saved); {REFUSE_ADVICE}")
    if sha256_of(path) != entry.get("sha256"):
        raise ValueError(f"{path}: SHA-256 differs from {MANIFEST} (corrupted or changed since it was saved); "
                         f"{REFUSE_ADVICE}")
