"""WiSE-FT sweeps: interpolate a zero-shot model and its fine-tune at several alphas and run an evaluation
suite at each, then write the trade-off as JSON, a table (markdown, CSV) and a plot.

Example:
    >>> summary = wise_ft_sweep("runs/lit/final", "runs/ft/final", [0, 0.5, 1], "eval/suites/demo.yaml", "results/wise-ft")
    >>> summary["best"]
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..io import save_figure, write_csv, write_json, write_text
from ..models.dual_encoder import DualEncoder
from ..models.weight_interpolation import (
    ModelSpec,
    alpha_name,
    check_alpha,
    check_same_architecture,
    load_spec,
    mix_into,
    model_name,
)

__all__ = ["wise_ft_sweep", "main_metric"]

_CLASSIFICATION_METRIC = "mean_per_class_recall"
_RETRIEVAL_METRIC = "image_retrieval_recall@1"
_READABLE = {_CLASSIFICATION_METRIC: "mean per-class recall", _RETRIEVAL_METRIC: "text-to-image R@1"}


def main_metric(report: dict) -> tuple[str, dict[str, float], Optional[float]]:
    """``(metric name, metrics kept, chance level)`` of one suite report: mean per-class recall for
    classification (with acc1), Recall@1/5/10 both ways for retrieval (text-to-image R@1 leads)."""
    m = report["metrics"]
    if report.get("task") == "zeroshot_retrieval":
        kept = {f"{d}_recall@{k}": m[f"{d}_recall@{k}"] for d in ("image_retrieval", "text_retrieval")
                for k in (1, 5, 10) if f"{d}_recall@{k}" in m}
        return _RETRIEVAL_METRIC, kept, m.get(f"chance_{_RETRIEVAL_METRIC}")
    chance = m.get("chance_mean_per_class_recall")
    if chance is None and m.get("num_classes"):
        chance = 1 / m["num_classes"]
    return _CLASSIFICATION_METRIC, {_CLASSIFICATION_METRIC: m[_CLASSIFICATION_METRIC], "acc1": m.get("acc1")}, chance


def _readable(metric: str) -> str:
    return _READABLE.get(metric, metric)


def _pct(value: Optional[float], digits: int = 1) -> str:
    return "" if value is None or math.isnan(value) else f"{100 * value:.{digits}f}"


def _table(summary: dict) -> tuple[list[str], list[list[Optional[float]]]]:
    tasks = list(summary["tasks"])
    rows = []
    for entry in summary["results"]:
        values = []
        for task in tasks:
            metrics = entry["tasks"].get(task)
            values.append(None if metrics is None else metrics[summary["tasks"][task]["metric"]])
        rows.append([entry["alpha"]] + values)
    return tasks, rows


def _write_csv(summary: dict, path: Path) -> None:
    tasks, rows = _table(summary)
    write_csv(path, ["alpha"] + tasks, [[alpha_name(row[0])] + [_pct(v, 2) for v in row[1:]] for row in rows])


def _write_markdown(summary: dict, path: Path) -> None:
    tasks, rows = _table(summary)
    info = summary["tasks"]
    metrics = "; ".join(f"{t}: {_readable(info[t]['metric'])} (chance {_pct(info[t]['chance'])})" for t in tasks)
    lines = [f"# WiSE-FT: {summary['suite']}", "",
             f"zero-shot (alpha 0): {summary['zeroshot']}  ", f"fine-tuned (alpha 1): {summary['finetuned']}", "",
             f"Percentages; {metrics}.", "",
             "| alpha | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    lines += ["| " + " | ".join([alpha_name(row[0])] + [_pct(v) for v in row[1:]]) + " |" for row in rows]
    best = summary["best"]
    best_alphas = [alpha_name(best[t]["alpha"]) if t in best else "" for t in tasks]
    lines.append("| best alpha | " + " | ".join(best_alphas) + " |")
    skipped = {t: r for entry in summary["results"] for t, r in entry["skipped"].items()}
    lines += [f"\nskipped {task}: {reason}" for task, reason in skipped.items()]
    write_text(path, "\n".join(lines) + "\n")


def _write_plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, rows = _table(summary)
    rows = sorted(rows, key=lambda row: row[0])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    chance_labelled = False
    for i, task in enumerate(tasks):
        points = [(row[0], 100 * row[i + 1]) for row in rows if row[i + 1] is not None and not math.isnan(row[i + 1])]
        if not points:
            continue
        line, = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                        label=f"{task} ({_readable(summary['tasks'][task]['metric'])})")
        chance = summary["tasks"][task]["chance"]
        if chance is not None:
            ax.axhline(100 * chance, linestyle="--", linewidth=1, color=line.get_color(),
                       label=None if chance_labelled else "chance (dashed)")
            chance_labelled = True
    ax.set_xlabel("alpha (0 = zero-shot, 1 = fine-tuned)")
    ax.set_ylabel("%")
    ax.set_xlim(-0.02, 1.02)
    ax.set_title(f"WiSE-FT on {summary['suite']}")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the plot, never over a line
    try:
        save_figure(fig, path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)


def wise_ft_sweep(zeroshot: ModelSpec, finetuned: ModelSpec, alphas: Sequence[float], suite_path: Union[str, Path],
                  out_dir: Union[str, Path], keep_checkpoints: bool = False, progress: bool = True) -> dict:
    """Interpolate at each alpha and run an evaluation suite on the result.

    Writes ``OUT/alpha_<a>/`` (the suite's reports; with ``keep_checkpoints`` also the interpolated
    checkpoint, loadable with ``load_model``), then ``OUT/wise_ft.json`` (per alpha and task, the main
    metric and its companions), ``wise_ft.md`` / ``wise_ft.csv`` (rows alpha, columns tasks, in %) and
    ``wise_ft.png`` (metric against alpha, one line per task, dashed chance levels). Returns the JSON.

    Example:
        >>> summary = wise_ft_sweep("open_clip:ViT-B-32/laion2b_s34b_b79k", "runs/ft/final",
        ...                         [0, 0.25, 0.5, 0.75, 1], "eval/suites/demo.yaml", "results/wise-ft")
        >>> summary["best"]["emoji-categories"]["alpha"]
    """
    from .suite import load_suite, run_suite

    values = [check_alpha(a) for a in alphas]
    if not values:
        raise ValueError("wise-ft sweep: no alphas given (e.g. 0,0.25,0.5,0.75,1)")
    repeated = sorted({alpha_name(a) for a in values if values.count(a) > 1})
    if repeated:
        raise ValueError(f"wise-ft sweep: alpha {repeated[0]} is listed twice")
    suite = load_suite(suite_path)  # a bad suite fails before any model is loaded
    out_dir = Path(out_dir)
    zeroshot_name, finetuned_name = model_name(zeroshot, "zeroshot model"), model_name(finetuned, "finetuned model")
    zeroshot_model, finetuned_model = load_spec(zeroshot), load_spec(finetuned)
    check_same_architecture(zeroshot_model, finetuned_model, zeroshot_name, finetuned_name)
    zeroshot_state = zeroshot_model.state_dict()
    # One model whose weights are overwritten at each alpha, instead of a copy per alpha; the
    # fine-tuned weights are kept aside when that model is the loaded fine-tune itself.
    if isinstance(finetuned, DualEncoder):
        target, finetuned_state = copy.deepcopy(finetuned_model), finetuned_model.state_dict()
    else:
        target = finetuned_model
        finetuned_state = {k: v.detach().clone() for k, v in finetuned_model.state_dict().items()}
    target.eval()

    summary: dict[str, Any] = {"method": "wise-ft", "zeroshot": zeroshot_name, "finetuned": finetuned_name,
                               "suite": suite["name"], "suite_path": str(suite_path), "alphas": values,
                               "tasks": {}, "results": [], "best": {}}
    for alpha in values:
        folder = out_dir / f"alpha_{alpha_name(alpha)}"
        print(f"alpha {alpha_name(alpha)}:")
        mix_into(target, zeroshot_state, finetuned_state, alpha)
        if keep_checkpoints:
            target.save_pretrained(folder)  # first: it replaces the folder, reports are written after
        result = run_suite(suite_path, target, f"wise-ft alpha={alpha_name(alpha)}", folder, progress=progress)
        entry = {"alpha": alpha, "reports": folder.name, "checkpoint": folder.name if keep_checkpoints else None,
                 "tasks": {}, "skipped": dict(result.skipped)}
        for task, report in result.results.items():
            metric, kept, chance = main_metric(report)
            summary["tasks"].setdefault(task, {"task": report.get("task"), "dataset": report.get("dataset"),
                                               "metric": metric, "chance": chance})
            entry["tasks"][task] = kept
        summary["results"].append(entry)
    for task, info in summary["tasks"].items():
        scored = [(e["tasks"][task][info["metric"]], e["alpha"]) for e in summary["results"] if task in e["tasks"]]
        scored = [s for s in scored if s[0] is not None and not math.isnan(s[0])]
        if scored:
            value, alpha = max(scored, key=lambda s: (s[0], -s[1]))  # ties: the smaller alpha
            summary["best"][task] = {"alpha": alpha, "value": value}

    write_json(summary, out_dir / "wise_ft.json")
    _write_markdown(summary, out_dir / "wise_ft.md")
    _write_csv(summary, out_dir / "wise_ft.csv")
    _write_plot(summary, out_dir / "wise_ft.png")
    return summary
