"""Cross-modal embedding association test (WEAT / iEAT style): do images of one group sit closer
to one set of attribute texts than images of the other groups do?

For an image ``w`` and attribute text sets A, B: ``s(w) = mean_a cos(w, a) - mean_b cos(w, b)``.
For target image sets X (the group) and Y (the rest), the effect size is
``(mean_X s - mean_Y s) / std_{X u Y} s`` (Caliskan et al. 2017, sample standard deviation), and the
one-sided p-value is the share of relabellings of X u Y into sets of the same sizes whose
``mean_X s - mean_Y s`` is at least the observed one. :func:`run_association` runs the probe file's
``association`` tests: each group against the rest, with the control test and the template spread.

Example:
    >>> scores = association_scores(image_features, sensitive_text_features, neutral_text_features)
    >>> association_test(scores, groups == "dark")["effect_size"]
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .control_words import attach_control_p
from .section import ProbeRun, SectionResult
from .stats import DEFAULT_BOOTSTRAP, DEFAULT_PERMUTATIONS, bootstrap_interval, holm_adjust, mean_difference_test

__all__ = ["association_scores", "effect_size", "association_test", "run_association"]


def association_scores(images: torch.Tensor, attributes_a: torch.Tensor, attributes_b: torch.Tensor) -> np.ndarray:
    """``s(w)`` for each image: mean cosine to the A texts minus mean cosine to the B texts, (N,).

    Features need not be normalized; cosines are taken in float64.
    """
    images = F.normalize(torch.as_tensor(images).double(), dim=-1)
    a = F.normalize(torch.as_tensor(attributes_a).double(), dim=-1)
    b = F.normalize(torch.as_tensor(attributes_b).double(), dim=-1)
    return ((images @ a.T).mean(1) - (images @ b.T).mean(1)).numpy()


def effect_size(scores: np.ndarray, in_group: np.ndarray) -> float:
    """``(mean s(X) - mean s(Y)) / std(s(X u Y))`` with the sample standard deviation (ddof=1)."""
    scores = np.asarray(scores, dtype=np.float64)
    in_group = np.asarray(in_group, dtype=bool)
    spread = scores.std(ddof=1)
    if not spread > 0:
        return float("nan")
    return float((scores[in_group].mean() - scores[~in_group].mean()) / spread)


def association_test(scores: np.ndarray, in_group: np.ndarray, permutations: int = DEFAULT_PERMUTATIONS,
                     bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                     restrict: Optional[np.ndarray] = None) -> dict:
    """Effect size of the group (``in_group`` True) against the rest, its one-sided permutation
    p-value (the group more associated with A than the rest is) and a bootstrap 95% interval.

    ``restrict`` (bool mask) limits the test to some items (e.g. the two groups of a pairwise test).

    Example:
        >>> association_test(np.array([0.3, 0.2, 0.1, -0.1]), np.array([True, True, False, False]))
        {'effect_size': 1.46..., 'p_value': 0.1666..., 'exact': True, ...}
    """
    scores = np.asarray(scores, dtype=np.float64)
    in_group = np.asarray(in_group, dtype=bool)
    if restrict is not None:
        scores, in_group = scores[restrict], in_group[restrict]
    n_in, n_out = int(in_group.sum()), int((~in_group).sum())
    if n_in < 2 or n_out < 2:
        raise ValueError(f"association test: needs at least 2 images in each target set, got {n_in} and {n_out}")
    observed, p_value, exact = mean_difference_test(scores, in_group, permutations, seed)
    members, others = np.flatnonzero(in_group), np.flatnonzero(~in_group)

    def resampled(indices: np.ndarray) -> float:
        return effect_size(scores[indices], np.arange(len(indices)) < n_in)

    low, high = bootstrap_interval(resampled, [members, others], bootstrap, seed)
    return {"effect_size": effect_size(scores, in_group), "effect_size_ci": [low, high],
            "mean_difference": observed, "p_value": p_value, "exact": exact,
            "group_size": n_in, "rest_size": n_out}


def group_mean_scores(scores: np.ndarray, groups: Sequence[str], names: Sequence[str]) -> dict[str, float]:
    """Mean association score of each group's images."""
    groups = np.asarray(groups, dtype=object)
    return {name: float(np.mean(scores[groups == name])) for name in names}


def run_association(run: ProbeRun, tests: list[dict]) -> SectionResult:
    """The ``association`` section: for each test (``name``, ``sensitive`` and ``neutral`` texts) and
    each group, :func:`association_test` against the rest with Holm-adjusted p-values, the control p
    (control words in place of the sensitive texts) and the effect size per template.

    Example:
        >>> run_association(run, [{"name": "crime", "sensitive": ["a criminal"], "neutral": ["a person"]}]).flags
    """
    images, groups, names = run.images, run.groups, run.names
    section = SectionResult({})
    for test in tests:
        sensitive, sensitive_t = run.texts.both(test["sensitive"])
        neutral, neutral_t = run.texts.both(test["neutral"])
        scores = association_scores(images, sensitive.double(), neutral.double())
        result = {"sensitive": test["sensitive"], "neutral": test["neutral"], "groups": {}}
        for name in names:
            result["groups"][name] = association_test(scores, groups == name, **run.common)
            result["groups"][name]["mean_score"] = float(scores[groups == name].mean())
        for name, adjusted in zip(names, holm_adjust([result["groups"][n]["p_value"] for n in names])):
            result["groups"][name]["p_adjusted"] = adjusted
        if run.controls:
            null = np.array([np.nanmax([effect_size(association_scores(images, run.draw(len(test["sensitive"])),
                                                                        neutral.double()), groups == n)
                                        for n in names]) for _ in range(run.controls)])
            attach_control_p(result["groups"], names, "effect_size", null)
        per_template = []
        for t in range(len(run.templates)):
            s = association_scores(images, sensitive_t[t].double(), neutral_t[t].double())
            per_template.append({n: effect_size(s, groups == n) for n in names})
        section.sensitivity[f"association/{test['name']}/effect_size"] = run.spread(per_template)
        section.metrics[test["name"]] = result
        section.flags += run.flags(result["groups"], "association", test["name"], "effect_size")
    return section
