"""Where an export lands: a fresh folder written beside the target and swapped in only when complete.

An export folder carries ``vlp_export.json`` (format, source, version). It tells a previous export,
which a new one may replace, from any other folder, which is kept unless the caller forces it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from ..models.dual_encoder import replace_directory

MARKER_NAME = "vlp_export.json"


def check_destination(out_dir: Path, force: bool = False, source: Optional[Path] = None) -> None:
    """Refuse a destination an export must not replace, before any model is loaded.

    Example:
        >>> check_destination(Path("exports/demo-oc"))          # missing, empty or a previous export: fine
    """
    if source is not None and source.exists() and out_dir.exists():
        if out_dir.resolve() == source.resolve():
            raise ValueError(f"{out_dir}: is the checkpoint being exported; choose another --out folder")
        if out_dir.resolve() in source.resolve().parents:
            # Replacing it (--force) would delete the checkpoint with it.
            raise ValueError(f"{out_dir}: holds the checkpoint being exported ({source}); choose another --out folder")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a folder; choose another --out folder")
    if force or (out_dir / MARKER_NAME).is_file() or not any(out_dir.iterdir()):
        return
    raise ValueError(f"{out_dir}: folder is not empty and is not a previous export (no {MARKER_NAME}); "
                     f"pass --force to replace it")


def write_folder_atomically(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temporary folder beside ``out_dir``, then move it into place.

    A failure anywhere in ``write`` removes the temporary folder and leaves ``out_dir`` as it was.

    Example:
        >>> write_folder_atomically(Path("exports/x"), lambda tmp: (tmp / "a.txt").write_text("hi"))
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        # mkdtemp makes a private (0700) folder; an export is meant to be shared like any new folder.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        write(tmp)
        replace_directory(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def write_marker(directory: Path, values: dict) -> None:
    (directory / MARKER_NAME).write_text(json.dumps(values, indent=2) + "\n")


def read_marker(directory: Path) -> dict:
    path = Path(directory) / MARKER_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a vlpretrain export (no {MARKER_NAME})")
    return json.loads(path.read_text())
