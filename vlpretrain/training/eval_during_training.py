"""An evaluation suite run inside training (``train.eval_suite``, every ``train.eval_every_epochs`` epochs and
after the last), as open_clip_train's ImageNet zero-shot is: the suite's tasks score ``run.scored``, their
reports go to ``output_dir/eval/step_NNNNNNNN/`` (as ``vlp eval suite`` writes them) and their numbers to
``metrics.jsonl`` as one ``split: eval`` record with ``eval/<task>/<metric>`` keys.

Example:
    >>> evals = SuiteDuringTraining(cfg, Path("runs/demo"))       # checks the suite file at once
    >>> evals.after_epoch(run, log, step=96, epoch=0)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..config import ConfigError, RecipeConfig

if TYPE_CHECKING:
    from .prepare import PreparedRun
    from .run_log import RunLog

logger = logging.getLogger("vlpretrain.train")


class SuiteDuringTraining:
    """``train.eval_suite`` during a run; does nothing when it is not set.

    Example: ``SuiteDuringTraining(cfg, output_dir).after_epoch(run, log, position.step, epoch)``
    """

    def __init__(self, cfg: RecipeConfig, output_dir: Path):
        self.path: Optional[str] = cfg.train.eval_suite
        self.every = cfg.train.eval_every_epochs
        self.output_dir = Path(output_dir)
        if self.path is not None:
            from ..evaluation.suite import load_suite

            try:
                load_suite(self.path)  # a missing or malformed suite stops the run before it trains
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"train.eval_suite: {e}") from None

    def due(self, run: "PreparedRun", step: int, epoch: int) -> bool:
        """After every ``eval_every_epochs``-th epoch and after the run's last step."""
        if self.path is None:
            return False
        at_epoch_end = step % run.steps_per_epoch == 0
        return (at_epoch_end and (epoch + 1) % self.every == 0) or step >= run.total_steps

    def after_epoch(self, run: "PreparedRun", log: "RunLog", step: int, epoch: int) -> Optional[dict]:
        """Run the suite on the main process when due, log its record (returned there), and bring every
        process back to training."""
        if not self.due(run, step, epoch):
            return None
        record = None
        if run.accelerator.is_main_process:
            from ..evaluation.suite import run_suite

            import torch

            # Forked: the suite's data loaders draw seeds from the global generator, which training's
            # later random draws (dropout, resumed loaders) must not see.
            with torch.random.fork_rng(devices=[]), run.accelerator.autocast():
                result = run_suite(self.path, run.scored, Path(run.cfg.train.output_dir).name,
                                   self.output_dir / "eval" / f"step_{step:08d}", progress=False)
            record = {"step": step, "epoch": epoch, "split": "eval"}
            for task, report in result.results.items():
                for metric, value in report["metrics"].items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        record[f"eval/{task}/{metric}"] = value
            log.write(record)
            logger.info("epoch %d eval suite %s: %s", epoch, self.path,
                        ", ".join(f"{k[5:]} {v:.3f}" for k, v in record.items()
                                  if k.endswith(("/mean_per_class_recall", "/image_retrieval_recall@1"))))
        run.accelerator.wait_for_everyone()
        run.model.train()
        return record
