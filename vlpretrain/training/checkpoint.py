"""Training checkpoints: Accelerate's state (safetensors weights, optimizer, scheduler, RNG) plus
``trainer_state.json`` (step, epoch, position in the epoch), written atomically.

Each checkpoint folder also holds ``vlp_config.json``, so ``vlpretrain.load_model(folder)`` loads it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

from ..io import replace_folder

TRAINER_STATE = "trainer_state.json"
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
    """``latest`` -> newest checkpoint of ``output_dir`` (None if there is none); else a folder path."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"train.resume: {path} is not a checkpoint folder (no {TRAINER_STATE}); "
                                f"use 'latest' or a folder under {checkpoint_root(output_dir)}")
    return path


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / TRAINER_STATE).read_text())


def save_checkpoint(accelerator, model, output_dir: str | Path, state: dict, keep: int = 2) -> Path:
    """Every process calls this. Writes into a temporary folder, then swaps it into place.

    The temporary folder has a fixed name (``.tmp_step_N``) rather than a random one, so every process
    finds the folder the main process made without a broadcast.
    """
    from ..models.dual_encoder import CONFIG_NAME, HF_SUPPORT_DIR

    root = checkpoint_root(output_dir)
    final = root / f"step_{state['step']:08d}"
    tmp = root / f".tmp_step_{state['step']:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        (tmp / CONFIG_NAME).write_text(json.dumps(unwrapped.config_dict(), indent=2))
        save_support_files = getattr(unwrapped.clip, "save_support_files", None)
        if save_support_files is not None:  # a transformers model: tokenizer + processor, so the folder stands alone
            save_support_files(tmp / HF_SUPPORT_DIR)
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
        replace_folder(tmp, final)  # a checkpoint saved again at the same step is swapped whole
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
