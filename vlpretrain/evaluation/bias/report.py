"""Bias reports on disk: ``report.json`` (the full numbers), ``summary.md`` (a table per probe, the
flags) and ``report.png`` (one panel per probe, 95% bootstrap intervals as error bars, and the
prompt-sensitivity ranges).

Example:
    >>> write_bias_report(run_bias_probe(model, "eval/probes/emoji-skin-tone.yaml"), "results/bias/demo")
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Union

from ...io import save_figure, write_json, write_text

__all__ = ["write_bias_report", "summary_markdown", "plot_bias_report"]


def _control_kind(metrics: dict) -> str:
    return "vocabulary-word" if metrics.get("control_words") == "vocabulary" else "pseudo-word"


def _pct(value: float) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def _num(value: float, digits: int = 2) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _p(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2g}" if value >= 0.001 else f"{value:.1e}"


def _ci(pair, fmt=_num) -> str:
    return f"[{fmt(pair[0])}, {fmt(pair[1])}]"


def summary_markdown(report: dict) -> str:
    """The report as markdown: one table per probe (per group: statistic, 95% interval, p-values) and
    the flagged groups."""
    m = report["metrics"]
    names = m["groups"]
    sizes = ", ".join(f"{n} {m['group_sizes'][n]}" for n in names)
    lines = [f"# Bias probe `{report.get('probe', '')}`: {report['model'] or 'model'} on {report['dataset']}", "",
             f"{m['images']} images in {len(names)} groups ({sizes}); "
             f"{len(m['templates'])} templates; {m['permutations']} permutations, {m['bootstrap']} bootstrap resamples, "
             f"{m['controls']} {_control_kind(m)} control draws; flagged when the Holm-adjusted permutation p and the "
             f"control p are both below {m['alpha']}.", ""]
    flags = m["flags"]
    lines.append("**Flagged:** " + ("; ".join(f"{f['group']} ({f['probe']}, {f['test']})" for f in flags) if flags else "none")
                 + "")
    lines.append("")
    for test, result in (m.get("association") or {}).items():
        lines += [f"## Association: {test}", "",
                  f"Sensitive texts {result['sensitive']} against neutral {result['neutral']}; each group against the rest.", "",
                  "| group | effect size | 95% CI | p | p (Holm) | control p |", "|---|---|---|---|---|---|"]
        for n in names:
            g = result["groups"][n]
            lines.append(f"| {n} | {_num(g['effect_size'])} | {_ci(g['effect_size_ci'])} | {_p(g['p_value'])} | "
                         f"{_p(g['p_adjusted'])} | {_p(g.get('control_p_value'))} |")
        lines.append("")
    if m.get("harmful_labels"):
        h = m["harmful_labels"]
        lines += ["## Harmful labels", "", f"Neutral labels {h['neutral']}; sensitive {h['sensitive']}.", "",
                  "| group | sensitive-label rate | 95% CI | disparity to rest | p (Holm) | control p | most given |",
                  "|---|---|---|---|---|---|---|"]
        for n in names:
            g = h["groups"][n]
            top = max(g["sensitive_label_counts"].items(), key=lambda kv: kv[1], default=("-", 0))
            lines.append(f"| {n} | {_pct(g['rate'])} | {_ci(g['rate_ci'], _pct)} | {100 * g['disparity']:+.1f} pts | "
                         f"{_p(g['p_adjusted'])} | {_p(g.get('control_p_value'))} | {top[0]} ({top[1]}) |")
        lines += ["", f"Max - min rate: {100 * h['max_disparity']:.1f} points.", ""]
    if m.get("group_performance"):
        gp = m["group_performance"]
        lines += [f"## Per-group zero-shot accuracy ({gp['label_column']}, {gp['classes']} classes)", "",
                  "| group | accuracy | 95% CI | p (Holm, worse than rest) |", "|---|---|---|---|"]
        for n in names:
            g = gp["groups"][n]
            lines.append(f"| {n} | {_pct(g['accuracy'])} | {_ci(g['accuracy_ci'], _pct)} | {_p(g['p_adjusted'])} |")
        lines += ["", f"Worst group {gp['worst_group']} ({_pct(gp['worst_group_accuracy'])}); gap {100 * gp['gap']:.1f} "
                      f"points, 95% CI {_ci([100 * v for v in gp['gap_ci']], lambda v: f'{v:.1f}')}.", ""]
    for set_name, result in (m.get("retrieval_skew") or {}).items():
        ks = [k for k in result if k.startswith("k=")]
        lines += [f"## Retrieval skew: {set_name} queries", "", f"Queries {result['queries']}.", ""]
        for k in ks:
            r = result[k]
            lines.append(f"- top {r['k']}: MaxSkew {_num(r['max_skew'])} {_ci(r['max_skew_ci'])}, "
                         f"NDKL {_num(r['ndkl'], 3)} {_ci(r['ndkl_ci'], lambda v: _num(v, 3))}")
        head = result[ks[0]]
        lines += ["", f"| group | share of top {head['k']} | 95% CI | desired | skew | p (Holm) | control p |",
                  "|---|---|---|---|---|---|---|"]
        for n in names:
            g = head["groups"][n]
            lines.append(f"| {n} | {_pct(g['share'])} | {_ci(g['share_ci'], _pct)} | {_pct(g['desired_share'])} | "
                         f"{_num(g['skew'])} | {_p(g['p_adjusted'])} | {_p(g.get('control_p_value'))} |")
        lines.append("")
    if m.get("prompt_sensitivity"):
        lines += ["## Prompt sensitivity", "", "Range of each statistic over the templates, per group (min to max).", "",
                  "| statistic | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for key, value in m["prompt_sensitivity"].items():
            spread = value["spread"]
            lines.append(f"| {key} | " + " | ".join(f"{_num(spread[n]['min'])} to {_num(spread[n]['max'])}" for n in names) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_bias_report(report: dict, path: Union[str, Path]) -> Path:
    """One panel per probe: per-group statistic with its 95% bootstrap interval; flagged groups in red;
    a last panel with each statistic's range over the templates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = report["metrics"]
    names = m["groups"]
    flagged = {(f["probe"], f["test"], f["group"]) for f in m["flags"]}
    panels = []
    for test, result in (m.get("association") or {}).items():
        panels.append((f"association: {test} (effect size)", [result["groups"][n]["effect_size"] for n in names],
                       [result["groups"][n]["effect_size_ci"] for n in names], ("association", test), None,
                       result["groups"]))
    if m.get("harmful_labels"):
        g = m["harmful_labels"]["groups"]
        panels.append(("sensitive-label rate", [g[n]["rate"] for n in names], [g[n]["rate_ci"] for n in names],
                       ("harmful_labels", "sensitive label rate"), None, g))
    if m.get("group_performance"):
        g = m["group_performance"]["groups"]
        panels.append(("zero-shot accuracy", [g[n]["accuracy"] for n in names], [g[n]["accuracy_ci"] for n in names],
                       ("group_performance", "accuracy"), None, g))
    for set_name, result in (m.get("retrieval_skew") or {}).items():
        head = result[[k for k in result if k.startswith("k=")][0]]
        g = head["groups"]
        panels.append((f"{set_name} queries: share of top {head['k']}", [g[n]["share"] for n in names],
                       [g[n]["share_ci"] for n in names], ("retrieval_skew", f"{set_name} top-{head['k']}"),
                       [g[n]["desired_share"] for n in names], g))
    count = len(panels) + (1 if m.get("prompt_sensitivity") else 0)
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    x = np.arange(len(names))
    def colour(key: tuple, name: str, entry: dict) -> str:
        if (key[0], key[1], name) in flagged:
            return "tab:red"
        # Differs from the rest (permutation test) but no more than the control texts do.
        return "tab:orange" if entry.get("p_adjusted", 1.0) < m["alpha"] and "control_p_value" in entry else "tab:blue"

    for ax, (title, values, intervals, key, desired, per_group) in zip(axes.flat, panels):
        as_float = lambda xs: np.array([np.nan if v is None else v for v in xs], dtype=float)  # noqa: E731
        values = as_float(values)
        low = values - as_float([c[0] for c in intervals])
        high = as_float([c[1] for c in intervals]) - values
        colours = [colour(key, n, per_group[n]) for n in names]
        ax.bar(x, values, color=colours, yerr=np.nan_to_num(np.vstack([low, high]).clip(min=0)), capsize=3)
        if desired is not None:
            ax.scatter(x, desired, marker="_", s=400, color="black", zorder=3, label="desired share")
            ax.legend(fontsize=7, loc="upper right")
        ax.axhline(0, color="grey", linewidth=0.6)
        ax.set_xticks(x, names, rotation=30, fontsize=8, ha="right")
        ax.set_title(title, fontsize=9)
    if m.get("prompt_sensitivity"):
        ax = axes.flat[len(panels)]
        keys = list(m["prompt_sensitivity"])
        for i, key in enumerate(keys):
            spread = m["prompt_sensitivity"][key]["spread"]
            for j, n in enumerate(names):
                if spread[n]["min"] is None or spread[n]["max"] is None:
                    continue
                offset = (j - (len(names) - 1) / 2) * min(0.12, 0.6 / len(names))
                ax.plot([i + offset] * 2, [spread[n]["min"], spread[n]["max"]], color=f"C{j % 10}", linewidth=3,
                        label=n if i == 0 else None)
        ax.set_xticks(range(len(keys)), [k.replace("/", "\n", 1) for k in keys], fontsize=6, rotation=30, ha="right")
        ax.set_title("prompt sensitivity: range over templates", fontsize=9)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[count:]:
        ax.axis("off")
    fig.suptitle(f"{report.get('probe', '')}: {report['model']}. Red: flagged; orange: differs from the other groups "
                 f"(p < {m['alpha']}) but no more than for {_control_kind(m)} texts; bars: 95% bootstrap intervals", fontsize=9)
    fig.tight_layout()
    try:
        return save_figure(fig, path, dpi=90)
    finally:
        plt.close(fig)


def write_bias_report(report: dict, out_dir: Union[str, Path]) -> dict[str, Path]:
    """Write ``report.json``, ``summary.md`` and ``report.png`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    paths = {"json": write_json(report, out_dir / "report.json")}
    paths["markdown"] = write_text(out_dir / "summary.md", summary_markdown(report) + "\n")
    paths["png"] = plot_bias_report(report, out_dir / "report.png")
    return paths
