"""Per-group performance: zero-shot accuracy within each group, the worst group, and the gap.

Example:
    >>> group_performance(correct, groups, names)["gap"]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .stats import DEFAULT_BOOTSTRAP, DEFAULT_PERMUTATIONS, bootstrap_interval, group_rate_intervals, holm_adjust, \
    mean_difference_test

__all__ = ["group_performance"]


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
