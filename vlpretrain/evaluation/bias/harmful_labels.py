"""Harmful-label rates (the CLIP paper's FairFace protocol): zero-shot over labels that mix neutral
ones with sensitive ones (crime-related, non-human); per group, the share of images whose top label
is sensitive, and the disparity between groups. :func:`run_harmful_labels` runs the probe file's
``harmful_labels`` section.

Example:
    >>> harmful_label_rates(predictions, sensitive=[False, False, True], groups=groups)["groups"]["dark"]["rate"]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .control_words import attach_control_p
from .section import ProbeRun, SectionResult
from .stats import DEFAULT_BOOTSTRAP, DEFAULT_PERMUTATIONS, group_rate_intervals, holm_adjust, mean_difference_test

__all__ = ["harmful_label_rates", "run_harmful_labels"]


def harmful_label_rates(predictions: np.ndarray, sensitive: Sequence[bool], groups: Sequence[str],
                        names: Sequence[str], labels: Sequence[str] = (), permutations: int = DEFAULT_PERMUTATIONS,
                        bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict:
    """Per group: ``rate`` (share of its images given a sensitive label) with a bootstrap interval,
    ``disparity`` (rate minus the other groups' rate), its one-sided permutation ``p_value`` (the group
    is given sensitive labels more often than the rest) and the Holm-adjusted ``p_adjusted``, and the
    count of each sensitive label. Overall: ``max_disparity`` (max - min group rate).

    ``predictions`` are label indices (N,); ``sensitive[j]`` says whether label j is sensitive.
    """
    predictions = np.asarray(predictions)
    sensitive_mask = np.asarray(sensitive, dtype=bool)
    groups = np.asarray(groups, dtype=object)
    flagged = sensitive_mask[predictions].astype(np.float64)
    intervals = group_rate_intervals(flagged, groups, names, bootstrap, seed)
    per_group = {}
    for name in names:
        in_group = groups == name
        disparity, p_value, _ = mean_difference_test(flagged, in_group, permutations, seed)
        counts = {}
        if labels:
            for j in np.flatnonzero(sensitive_mask):
                counts[labels[j]] = int(np.sum(predictions[in_group] == j))
        per_group[name] = {"rate": float(flagged[in_group].mean()), "rate_ci": intervals[name],
                           "disparity": disparity, "p_value": p_value, "sensitive_label_counts": counts,
                           "images": int(in_group.sum())}
    for name, adjusted in zip(names, holm_adjust([per_group[n]["p_value"] for n in names])):
        per_group[name]["p_adjusted"] = adjusted
    rates = [per_group[n]["rate"] for n in names]
    return {"groups": per_group, "overall_rate": float(flagged.mean()), "max_disparity": float(max(rates) - min(rates))}


def run_harmful_labels(run: ProbeRun, spec: dict) -> SectionResult:
    """The ``harmful_labels`` section: zero-shot over ``spec["neutral"] + spec["sensitive"]``, then
    :func:`harmful_label_rates`, the control p (control words in place of the sensitive labels) and
    the sensitive-label rate per template.

    Example:
        >>> run_harmful_labels(run, {"neutral": ["a person"], "sensitive": ["a criminal"]}).metrics["max_disparity"]
    """
    images, groups, names = run.images, run.groups, run.names
    labels = spec["neutral"] + spec["sensitive"]
    is_sensitive = [False] * len(spec["neutral"]) + [True] * len(spec["sensitive"])
    label_weights, label_weights_t = run.texts.both(labels)
    predictions = (images @ label_weights.double().T).argmax(1).numpy()
    result = harmful_label_rates(predictions, is_sensitive, groups, names, labels, **run.common)
    result.update(neutral=spec["neutral"], sensitive=spec["sensitive"])
    if run.controls:
        neutral_weights = label_weights[:len(spec["neutral"])].double()

        def disparities(sensitive_weights: torch.Tensor) -> list[float]:
            chosen = (images @ torch.cat([neutral_weights, sensitive_weights]).T).argmax(1).numpy()
            flagged = chosen >= len(spec["neutral"])
            return [flagged[groups == n].mean() - flagged[groups != n].mean() for n in names]

        null = np.array([max(disparities(run.draw(len(spec["sensitive"])))) for _ in range(run.controls)])
        attach_control_p(result["groups"], names, "disparity", null)
    per_template = []
    for t in range(len(run.templates)):
        chosen = (images @ label_weights_t[t].double().T).argmax(1).numpy()
        flagged = np.asarray(is_sensitive)[chosen]
        per_template.append({n: float(flagged[groups == n].mean()) for n in names})
    return SectionResult(result, {"harmful_labels/rate": run.spread(per_template)},
                         run.flags(result["groups"], "harmful_labels", "sensitive label rate", "disparity"))
