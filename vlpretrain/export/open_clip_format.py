"""Export to open_clip's hub folder layout, loadable with ``open_clip`` alone.

The folder holds ``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``) and
``open_clip_model.safetensors`` (the state dict of ``model.clip``, which is an open_clip model). A
Hugging Face text tower also needs its ``config.json`` and tokenizer files: with ``local-dir:``,
``open_clip.get_tokenizer`` always reads the tokenizer from the folder itself, while the model
builds the tower from ``text_cfg.hf_model_name``, which therefore points at the folder too when the
tower came from a local folder (a hub id is kept, so the folder can be pushed to the hub as is).
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import open_clip
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import save_file

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"

# Keys open_clip's factory adds to tower configs while building; they are decided again at load time.
_BUILD_TIME_KEYS = ("timm_model_pretrained", "hf_model_pretrained")


def is_open_clip_model(model) -> bool:
    return isinstance(model.clip, (open_clip.CLIP, open_clip.CustomTextCLIP))


def check_open_clip_exportable(model) -> None:
    """One-line ValueError for a model whose ``.clip`` is not an open_clip model (a transformers one)."""
    if is_open_clip_model(model):
        return
    clip = model.clip
    what = (f"{getattr(clip, 'source', type(clip).__name__)} is a transformers {getattr(clip, 'model_type', '')} "
            f"model, not an open_clip one") if hasattr(clip, "save_hf") else \
        f"{type(clip).__name__} is not an open_clip model"
    raise ValueError(f"--format open_clip: {' '.join(what.split())}; use --format hf")


def _model_arguments() -> set[str]:
    names = set()
    for cls in (open_clip.CLIP, open_clip.CustomTextCLIP):
        names |= set(inspect.signature(cls.__init__).parameters)
    return (names | {"custom_text"}) - {"self", "cast_dtype", "output_dict", "args", "kwargs"}


def open_clip_model_cfg(model, final_dir: Path) -> dict:
    """``model.open_clip_config`` with only keys open_clip's model classes take, and the Hugging Face
    text tower pointed at ``final_dir`` when it came from a local folder."""
    allowed = _model_arguments()
    cfg = {k: copy.deepcopy(v) for k, v in model.open_clip_config.items() if k in allowed}
    for key in ("vision_cfg", "text_cfg"):
        cfg[key] = {k: v for k, v in cfg[key].items() if k not in _BUILD_TIME_KEYS}
    text_cfg = cfg["text_cfg"]
    if "hf_model_name" in text_cfg:
        source = text_cfg["hf_model_name"]
        for key in ("hf_model_name", "hf_tokenizer_name"):
            name = text_cfg.get(key) or source
            text_cfg[key] = str(final_dir.resolve()) if Path(name).is_dir() else name
    return cfg


def preprocess_cfg(model) -> dict:
    """The eval transform of ``vlpretrain.data.transforms.build_transforms`` in open_clip's ``preprocess_cfg`` terms."""
    image_size = model.open_clip_config["vision_cfg"].get("image_size", 224)
    mean = getattr(model.model_config, "image_mean", None) or OPENAI_DATASET_MEAN
    std = getattr(model.model_config, "image_std", None) or OPENAI_DATASET_STD
    return {"size": image_size, "mean": list(mean), "std": list(std), "interpolation": "bicubic",
            "resize_mode": "shortest"}


def write_open_clip(model, directory: Path, final_dir: Path) -> None:
    """Write the open_clip folder for ``model`` into ``directory`` (which will become ``final_dir``).

    Example:
        >>> write_open_clip(model, Path("out"), Path("out"))
        >>> open_clip.create_model_and_transforms("local-dir:out")
    """
    check_open_clip_exportable(model)
    model_cfg = open_clip_model_cfg(model, final_dir)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg(model)}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    # safetensors refuses shared storage; clone makes every tensor its own.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.clip.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    if "hf_model_name" in model_cfg["text_cfg"]:
        model.clip.text.config.save_pretrained(str(directory))
        model.tokenizer.save_pretrained(str(directory))


def open_clip_load_line(directory: Path) -> str:
    where = repr(f"local-dir:{Path(directory).resolve()}")
    return (f"import open_clip; model, _, preprocess = open_clip.create_model_and_transforms({where}); "
            f"tokenizer = open_clip.get_tokenizer({where})")
