"""Where an export lands: which folders an export may replace, and the marker that tells them apart.

The folder itself is written beside the target and swapped in whole (``vlpretrain.io.write_folder_atomically``).
An export folder carries ``vlp_export.json`` (format, source, version). It tells a previous export,
which a new one may replace, from any other folder, which is kept unless the caller forces it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

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


def write_marker(directory: Path, values: dict) -> None:
    (directory / MARKER_NAME).write_text(json.dumps(values, indent=2) + "\n")


def read_marker(directory: Path) -> dict:
    path = Path(directory) / MARKER_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a vlpretrain export (no {MARKER_NAME})")
    return json.loads(path.read_text())
