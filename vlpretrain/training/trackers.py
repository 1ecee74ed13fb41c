"""Experiment trackers (``train.log_with: tensorboard | wandb | mlflow | none``) through Accelerate's tracking
classes, fed the same records as ``metrics.jsonl`` (:class:`~vlpretrain.training.run_log.RunLog` writes each
record once and hands it here).

A record's numbers are logged at its ``step`` under a name that says where they come from: ``train/loss``,
``val/image_retrieval_recall@1``, ``monitor/erank_image``, ``eval/<task>/<metric>`` (see :func:`tracker_values`).
TensorBoard writes to ``output_dir/tensorboard/``, MLflow to ``output_dir/mlruns/``, Weights & Biases to
``output_dir/wandb/`` (offline when the wandb servers cannot be reached; ``wandb sync`` uploads later).

Example:
    >>> trackers = open_trackers(cfg, Path("runs/demo"))
    >>> trackers.log({"step": 10, "loss": 2.3, "lr": 1e-4})     # -> train/loss, train/lr at step 10
    >>> trackers.close()
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from pathlib import Path
from typing import Any

from ..config import ConfigError, RecipeConfig

logger = logging.getLogger("vlpretrain.train")

TRACKERS = ("tensorboard", "wandb", "mlflow", "none")
# The package each tracker imports, and how to get it.
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
# Record keys that place a record rather than measure anything.
_PLACEMENT = ("step", "split", "task")


def check_log_with(name: str) -> None:
    """Refuse an unknown ``train.log_with`` or one whose package is missing, in one line.

    Example:
        >>> check_log_with("tensorbord")
        Traceback (most recent call last):
        ConfigError: train.log_with: 'tensorbord' is not one of tensorboard, wandb, mlflow, none
    """
    if name not in TRACKERS:
        raise ConfigError(f"train.log_with: '{name}' is not one of {', '.join(TRACKERS)}")
    package = PACKAGES.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"train.log_with={name} needs the {package} package: pip install {package} "
                          f"(or set train.log_with: none)")


def tracker_values(record: dict) -> dict[str, float]:
    """A ``metrics.jsonl`` record's numbers under tracker names: keys with a ``/`` as they are, the others
    prefixed by the record's split (``train/`` when it has none). Booleans, strings and lists are left out.

    Example:
        >>> tracker_values({"step": 4, "split": "val", "val_loss": 1.5})
        {'val/val_loss': 1.5}
    """
    prefix = f"{record.get('split') or 'train'}/"
    values = {}
    for key, value in record.items():
        if key in _PLACEMENT or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        values[key if "/" in key else prefix + key] = float(value)
    return values


class Trackers:
    """The run's trackers (none with ``train.log_with: none``); :meth:`log` takes ``metrics.jsonl`` records.

    Example: ``trackers = Trackers([]); trackers.log({"step": 1, "loss": 2.0}); trackers.close()``
    """

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log(self, record: dict) -> None:
        """Log one record's numbers at its step (a record without a step is not logged)."""
        if not self.trackers or "step" not in record:
            return
        values = tracker_values(record)
        for tracker in self.trackers:
            tracker.log(values, step=int(record["step"]))

    def close(self) -> None:
        """Flush and close every tracker."""
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def open_trackers(cfg: RecipeConfig, output_dir: Path, is_main_process: bool = True) -> Trackers:
    """The trackers ``train.log_with`` asks for, started (on the main process only: the others log nothing).

    Example: ``trackers = open_trackers(cfg, Path(cfg.train.output_dir))``
    """
    name = cfg.train.log_with
    check_log_with(name)
    if name == "none" or not is_main_process:
        return Trackers([])
    run_name = Path(output_dir).resolve().name
    if name == "tensorboard":
        from accelerate.tracking import TensorBoardTracker

        tracker = TensorBoardTracker(run_name, Path(output_dir) / "tensorboard")
    elif name == "wandb":
        from accelerate.tracking import WandBTracker

        options: dict[str, Any] = {"dir": str(output_dir)}
        if "WANDB_MODE" not in os.environ and not _reachable("api.wandb.ai"):
            logger.info("train.log_with=wandb: the wandb servers are not reachable; logging offline to %s "
                        "(upload later with `wandb sync`)", Path(output_dir) / "wandb")
            options["mode"] = "offline"  # wandb.init's argument: this run only, the process's environment untouched
        tracker = WandBTracker(run_name, **options)
    else:
        from accelerate.tracking import MLflowTracker

        tracker = MLflowTracker(experiment_name=run_name, logging_dir=str(Path(output_dir) / "mlruns"))
    if hasattr(tracker, "start"):  # accelerate >= 1.5 starts a tracker apart from building it
        tracker.start()
    if name != "tensorboard":  # TensorBoard's hparams land in extra event folders; recipe.json holds them
        tracker.store_init_configuration(_flat(cfg.to_dict()))
    return Trackers([tracker])


def _flat(values: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``, values a tracker takes (others as text)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
    return out


def _reachable(host: str, port: int = 443, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False

