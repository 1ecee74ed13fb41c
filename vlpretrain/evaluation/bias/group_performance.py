"""Per-group performance: zero-shot accuracy within each group, the worst group, and the gap.
:func:`run_group_performance` runs the probe file's ``group_performance`` section.

Example:
    >>> group_performance(correct, groups, names)["gap"]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .section import ProbeRun, SectionResult
from .stats import DEFAULT_BOOTSTRAP, DEFAULT_PERMUTATIONS, bootstrap_interval, group_rate_intervals, holm_adjust, \
    mean_difference_test

__all__ = ["group_performance", "run_group_performance"]


def group_performance(correct: np.ndarray, groups: Sequence[str], names: Sequence[str],
                      permutations: int = DEFAULT_PERMUTATIONS, bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict:
    """Accuracy per group (``correct`` is a 0/1 array over images) with bootstrap intervals; for each
    group the one-sided permutation p-value that it does worse than the rest (and Holm-adjusted);
    ``worst_group``, ``worst_group_accuracy`` and ``gap`` (max - min accuracy) with its interval
    (groups resampled independently)."""
    correct = np.asarray(correct, dtype=np.float64)
    groups = np.asarray(groups, dtype=object)
    intervals = group_rate_intervals(correct, groups, names, bootstrap, seed)
    per_group = {}
    for name in names:
        in_group = groups == name
        # The test statistic is the rest's accuracy minus the group's: large when the group is worse.
        difference, p_value, _ = mean_difference_test(1.0 - correct, in_group, permutations, seed)
        per_group[name] = {"accuracy": float(correct[in_group].mean()), "accuracy_ci": intervals[name],
                           "difference_to_rest": -difference, "p_value": p_value, "images": int(in_group.sum())}
    for name, adjusted in zip(names, holm_adjust([per_group[n]["p_value"] for n in names])):
        per_group[name]["p_adjusted"] = adjusted
    accuracies = {n: per_group[n]["accuracy"] for n in names}
    worst = min(names, key=lambda n: accuracies[n])
    strata = [np.flatnonzero(groups == n) for n in names]
    offsets = np.cumsum([0] + [len(s) for s in strata])

    def gap(indices: np.ndarray) -> float:
        means = [correct[indices[offsets[i]:offsets[i + 1]]].mean() for i in range(len(names))]
        return float(max(means) - min(means))

    return {"groups": per_group, "overall_accuracy": float(correct.mean()), "worst_group": worst,
            "worst_group_accuracy": accuracies[worst], "gap": float(max(accuracies.values()) - accuracies[worst]),
            "gap_ci": list(bootstrap_interval(gap, strata, bootstrap, seed))}


def run_group_performance(run: ProbeRun, spec: dict) -> SectionResult:
    """The ``group_performance`` section: zero-shot classification of the column ``spec["label_column"]``
    (class names from ``spec["classnames"]`` when given, over the classes present), then
    :func:`group_performance` and the accuracy per template. A group is flagged when it does worse
    than the rest (Holm-adjusted p below ``alpha``); there is no control test (no sensitive text).

    Example:
        >>> run_group_performance(run, {"label_column": "subcategory"}).metrics["gap"]
    """
    from ..classnames import load_classnames, match_labels

    data, images, groups, names = run.data, run.images, run.groups, run.names
    column = spec["label_column"]
    if column not in data.extras:
        raise ValueError(f"{run.source}: group_performance.label_column '{column}' is not a "
                         f"column of the data (columns: {sorted(data.extras)})")
    labels = [str(v) for v in data.extras[column]]
    classnames = load_classnames(spec.get("classnames"))
    if classnames is not None:  # candidates: the classes present (a probe set is a slice of a label set)
        classnames = {k: v for k, v in classnames.items() if k in set(labels)}
    keys, readable, targets = match_labels(labels, classnames, data.name)
    class_weights, class_weights_t = run.texts.both(readable)
    targets = np.asarray(targets)
    correct = ((images @ class_weights.double().T).argmax(1).numpy() == targets).astype(np.float64)
    result = group_performance(correct, groups, names, **run.common)
    result.update(label_column=column, classes=len(keys))
    per_template = []
    for t in range(len(run.templates)):
        right = (images @ class_weights_t[t].double().T).argmax(1).numpy() == targets
        per_template.append({n: float(right[groups == n].mean()) for n in names})
    flags = [{"probe": "group_performance", "test": "accuracy", "group": name,
              "statistic": result["groups"][name]["difference_to_rest"], "p_adjusted": result["groups"][name]["p_adjusted"]}
             for name in names if result["groups"][name]["p_adjusted"] < run.alpha]
    return SectionResult(result, {"group_performance/accuracy": run.spread(per_template)}, flags)
