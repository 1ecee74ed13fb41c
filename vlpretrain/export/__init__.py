"""Export a model of ours into folders other libraries load without vlpretrain.

- ``open_clip``: open_clip's hub layout, for any model built on open_clip towers
  (``open_clip.create_model_and_transforms("local-dir:DIR")``).
- ``hf``: a transformers ``CLIPModel`` folder, for open_clip ViT + text transformer models; a model
  loaded from a transformers checkpoint (``hf:NAME``) is saved back in its own format.

Example:
    >>> from vlpretrain.export import export_model, load_line
    >>> path = export_model("runs/demo-emoji/final", "hf", "exports/demo-hf")
    >>> print(load_line(path))
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from ..io import write_folder_atomically
from .folder import MARKER_NAME, check_destination, read_marker, write_marker
from .hf_clip_format import check_hf_convertible, write_hf_clip
from .open_clip_format import check_open_clip_exportable, write_open_clip

FORMATS = ("open_clip", "hf")

__all__ = ["export_model", "load_line", "check_hf_convertible", "check_open_clip_exportable", "FORMATS",
           "MARKER_NAME"]


def _is_transformers_model(model) -> bool:
    # vlpretrain.models.hf_towers.HFDualTowers: a transformers CLIP/SigLIP model that saves itself.
    return hasattr(model.clip, "save_hf")


def export_model(model_or_spec, format: str, out_dir: Union[str, Path], force: bool = False) -> Path:
    """Write ``model_or_spec`` (a DualEncoder, or anything ``load_model`` takes) to ``out_dir`` in ``format``.

    The folder is written beside ``out_dir`` and moved into place only when complete. An existing
    ``out_dir`` is replaced when it is empty or a previous export (it has ``vlp_export.json``), else
    only with ``force=True``. Returns ``out_dir``.

    Example:
        >>> export_model("runs/demo-emoji/final", "open_clip", "exports/demo-oc")
        PosixPath('exports/demo-oc')
    """
    from ..models import load_model

    if format not in FORMATS:
        raise ValueError(f"unknown export format '{format}' (use one of: {', '.join(FORMATS)})")
    out_dir = Path(out_dir)
    is_spec = isinstance(model_or_spec, (str, Path))
    check_destination(out_dir, force, Path(str(model_or_spec)) if is_spec else None)
    model = load_model(model_or_spec) if is_spec or not hasattr(model_or_spec, "clip") else model_or_spec
    kind = "transformers" if _is_transformers_model(model) else "open_clip"
    # Refuse before writing anything, so the error is the first thing the user sees.
    if format == "hf" and kind == "open_clip":
        check_hf_convertible(model)
    if format == "open_clip":
        check_open_clip_exportable(model)

    def write(tmp: Path) -> None:
        if format == "open_clip":
            write_open_clip(model, tmp, out_dir)
        elif kind == "transformers":
            model.clip.save_hf(tmp)
        else:
            write_hf_clip(model, tmp)
        from .. import __version__

        write_marker(tmp, {"format": format, "model": kind, "source": str(model_or_spec) if is_spec else None,
                           "vlpretrain_version": __version__})

    return write_folder_atomically(out_dir, write)


def load_line(directory: Union[str, Path]) -> str:
    """The Python line that loads the export in ``directory`` with its own library.

    Example:
        >>> load_line("exports/demo-oc")
        "import open_clip; model, _, preprocess = open_clip.create_model_and_transforms('local-dir:/abs/exports/demo-oc'); ..."
    """
    from .hf_clip_format import hf_load_line
    from .open_clip_format import open_clip_load_line

    marker = read_marker(Path(directory))
    if marker["format"] == "open_clip":
        return open_clip_load_line(directory)
    return hf_load_line(directory, auto=marker.get("model") == "transformers")
