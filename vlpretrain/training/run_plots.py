"""Curves of one or several training runs side by side, from their ``metrics.jsonl``: training loss,
validation recall, the evaluation suite's metrics during training (zero-shot) and the health monitors.
Each run is one colour in every panel; the plotted series are also written as JSON.

Example:
    >>> series = run_series([Path("runs/demo-emoji"), Path("runs/slip-emoji")])
    >>> plot_runs(series, Path("results/runs.png"))          # + results/runs.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from ..io import save_figure, write_json

# (panel title, y label, [(series key in metrics.jsonl, which records, line style label)])
PANELS = [
    ("training loss", "loss", [("loss", "train", "")]),
    ("validation recall@1", "recall@1", [("image_retrieval_recall@1", "val", "text->image"),
                                         ("text_retrieval_recall@1", "val", "image->text")]),
    ("evaluation suite during training", "metric", [("eval/*/mean_per_class_recall", "eval", ""),
                                                    ("eval/*/image_retrieval_recall@1", "eval", "")]),
    ("effective rank (monitor)", "effective rank", [("monitor/erank_image", "monitor", "image"),
                                                    ("monitor/erank_text", "monitor", "text")]),
    ("modality gap (monitor)", "centroid distance", [("monitor/modality_gap", "monitor", "")]),
    ("alignment / uniformity (monitor)", "value", [("monitor/align", "monitor", "align"),
                                                   ("monitor/uniform_image", "monitor", "uniform image"),
                                                   ("monitor/uniform_text", "monitor", "uniform text")]),
    ("logit scale", "scale", [("logit_scale", "train", "")]),
]
_STYLES = ["-", "--", ":", "-."]


def read_run(run: Path) -> list[dict]:
    """The records of ``run/metrics.jsonl`` (``run`` a run folder or the file itself); a line that does not
    parse (a run killed mid-write) is skipped.

    Example: ``records = read_run(Path("runs/demo-emoji"))``
    """
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise ValueError(f"{run}: no metrics.jsonl here; give a training run's output folder (train.output_dir)")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _split(record: dict) -> str:
    return record.get("split") or "train"


def _matches(key: str, pattern: str) -> bool:
    if "*" not in pattern:
        return key == pattern
    head, tail = pattern.split("*", 1)
    return key.startswith(head) and key.endswith(tail)


def run_series(runs: Sequence[Path], labels: Optional[Sequence[str]] = None) -> dict[str, dict[str, dict]]:
    """``{run label: {series key: {"step": [...], "value": [...]}}}`` for every key the panels plot, in step
    order. Labels default to the run folders' names (their paths when two names are the same).

    Example:
        >>> run_series([Path("runs/demo-emoji")])["demo-emoji"]["loss"]["value"][:2]
    """
    runs = [Path(r) for r in runs]
    if labels is None:
        names = [r.name if r.is_dir() else r.parent.name for r in runs]
        labels = names if len(set(names)) == len(names) else [str(r) for r in runs]
    patterns = [(key, split) for _, _, lines in PANELS for key, split, _ in lines]
    out: dict[str, dict[str, dict]] = {}
    for run, label in zip(runs, labels):
        series: dict[str, dict] = {}
        for record in read_run(run):
            if "step" not in record:
                continue
            for key, value in record.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if any(_split(record) == split and _matches(key, pattern) for pattern, split in patterns):
                    entry = series.setdefault(key, {"step": [], "value": []})
                    entry["step"].append(record["step"])
                    entry["value"].append(value)
        out[label] = series
    return out


def plot_runs(series: dict[str, dict[str, dict]], out: Path) -> tuple[Path, Path]:
    """Draw the panels that have data in any run (one colour per run, one line style per series) to ``out``
    (PNG) and write ``series`` beside it (``out`` with ``.json``); returns both paths.

    Example: ``png, data = plot_runs(run_series(runs), Path("results/runs.png"))``
    """
    # A Figure on its own Agg canvas, without pyplot: the caller's backend and pyplot's figures stay as they are.
    from matplotlib import rcParams
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(title, ylabel, [(k, s, n) for k, s, n in lines if any(_matches(key, k) for run in series.values()
                                                                     for key in run)])
              for title, ylabel, lines in PANELS]
    panels = [p for p in panels if p[2]]
    if not panels:
        raise ValueError("nothing to plot: the runs' metrics.jsonl hold no step records")
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(5 * columns, 3.6 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    colours = rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, ylabel, lines) in zip(axes.flat, panels):
        for r, (label, run) in enumerate(series.items()):
            style_index = 0
            for pattern, _, name in lines:
                for key in sorted(k for k in run if _matches(k, pattern)):
                    part = name or (key.split("/")[1] if key.startswith("eval/") else "")
                    ax.plot(run[key]["step"], run[key]["value"], _STYLES[style_index % len(_STYLES)],
                            color=colours[r % len(colours)], marker="." if len(run[key]["step"]) < 20 else None,
                            label=f"{label} {part}".strip())
                    style_index += 1
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    png = save_figure(fig, out, dpi=90)
    return png, write_json(series, out.with_suffix(".json"))
