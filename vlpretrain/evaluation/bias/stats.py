"""Resampling statistics shared by the bias probes: permutation p-values, bootstrap intervals, Holm.

Every probe compares one group with the others through a statistic of per-item values (an
association score, a "given a sensitive label" indicator, a top-k membership count). Shuffling the
group labels gives the null distribution; resampling items within each group gives the interval.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Optional, Sequence

import numpy as np

__all__ = ["permutation_p_value", "group_permutations", "bootstrap_interval", "holm_adjust"]

# Below this many distinct relabellings the test enumerates them all (an exact p-value, which the
# reference tests compare with itertools); above it, this many random ones are drawn.
DEFAULT_PERMUTATIONS = 10_000
DEFAULT_BOOTSTRAP = 1_000


def group_permutations(in_group: np.ndarray, permutations: int = DEFAULT_PERMUTATIONS,
                       seed: int = 0) -> tuple[np.ndarray, bool]:
    """Relabellings of the items for a permutation test: ``(masks (P, N) bool, exact)``.

    Each row marks which items play the group (as many as ``in_group`` has True). When the number
    of distinct relabellings ``C(N, n)`` is at most ``permutations`` every one is listed (the observed
    labelling included) and ``exact`` is True; otherwise ``permutations`` random ones are drawn.

    Example:
        >>> masks, exact = group_permutations(np.array([True, True, False, False]))
        >>> masks.shape, exact
        ((6, 4), True)
    """
    in_group = np.asarray(in_group, dtype=bool)
    n, k = len(in_group), int(in_group.sum())
    if math.comb(n, k) <= permutations:
        masks = np.zeros((math.comb(n, k), n), dtype=bool)
        for row, chosen in enumerate(itertools.combinations(range(n), k)):
            masks[row, list(chosen)] = True
        return masks, True
    masks = np.zeros((permutations, n), dtype=bool)
    np.put_along_axis(masks, _random_members(n, k, permutations, np.random.default_rng(seed)), True, axis=1)
    return masks, False


def _random_members(n: int, k: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``(count, k)`` item indices: ``count`` random choices of ``k`` of ``n`` items (the ``k`` smallest
    of uniform keys per row)."""
    return np.argpartition(rng.random((count, n)), k - 1, axis=1)[:, :k]


def permutation_p_value(observed: float, null: np.ndarray, exact: bool) -> float:
    """One-sided p-value of ``observed`` against null statistics (larger = more extreme).

    Exact enumeration (the observed labelling is one of ``null``): the share of relabellings at
    least as extreme. Random relabellings: ``(1 + count) / (1 + P)``, which never reports 0.
    A tolerance of 1e-12 keeps ties that differ only by rounding counted as ties.

    Example:
        >>> permutation_p_value(2.0, np.array([0.0, 1.0, 2.0, 3.0]), exact=True)
        0.5
    """
    extreme = int(np.sum(null >= observed - 1e-12))
    if exact:
        return extreme / len(null)
    return (1 + extreme) / (1 + len(null))


def bootstrap_interval(statistic: Callable[[np.ndarray], float], strata: Sequence[np.ndarray],
                       resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(indices)``.

    ``strata`` are index arrays (e.g. the group's items and the others'); each resample draws, with
    replacement, as many indices from each stratum as it has, and passes their concatenation. NaN
    resamples (e.g. a zero spread) are left out.

    Example:
        >>> values = np.array([1.0, 2.0, 3.0, 4.0])
        >>> low, high = bootstrap_interval(lambda idx: values[idx].mean(), [np.arange(4)])
    """
    rng = np.random.default_rng(seed)
    strata = [np.asarray(s, dtype=np.int64) for s in strata]
    draws = []
    for _ in range(resamples):
        indices = np.concatenate([s[rng.integers(0, len(s), len(s))] for s in strata if len(s)])
        draws.append(statistic(indices))
    draws = np.asarray(draws, dtype=np.float64)
    draws = draws[~np.isnan(draws)]
    if not len(draws):
        return float("nan"), float("nan")
    tail = (1 - level) / 2
    return float(np.quantile(draws, tail)), float(np.quantile(draws, 1 - tail))


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error over the groups of one probe).

    Example:
        >>> holm_adjust([0.01, 0.04, 0.03])
        [0.03, 0.06, 0.06]
    """
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return [float(round(v, 15)) for v in adjusted]


def one_vs_rest(groups: Sequence[str], names: Optional[Sequence[str]] = None) -> dict[str, np.ndarray]:
    """``{group: bool mask}`` for each group name, in ``names`` order (default: sorted)."""
    groups = np.asarray(groups, dtype=object)
    names = list(names) if names is not None else sorted(set(groups.tolist()))
    return {name: groups == name for name in names}


def mean_difference_test(values: np.ndarray, in_group: np.ndarray, permutations: int = DEFAULT_PERMUTATIONS,
                         seed: int = 0) -> tuple[float, float, bool]:
    """``(mean(values[group]) - mean(values[rest]), one-sided permutation p-value, exact)``.

    Example:
        >>> mean_difference_test(np.array([1.0, 1.0, 0.0, 0.0]), np.array([True, True, False, False]))
        (1.0, 0.1666..., True)
    """
    values = np.asarray(values, dtype=np.float64)
    in_group = np.asarray(in_group, dtype=bool)
    observed = float(values[in_group].mean() - values[~in_group].mean())
    n, k = len(values), int(in_group.sum())
    exact = math.comb(n, k) <= permutations
    if exact:
        masks, _ = group_permutations(in_group, permutations, seed)
        in_sums = masks.astype(np.float64) @ values
    else:
        # Random relabellings in chunks of about 2e7 keys, so memory stays bounded for large sets.
        rng = np.random.default_rng(seed)
        rows = max(1, 20_000_000 // max(n, 1))
        in_sums = np.concatenate([
            values[_random_members(n, k, min(rows, permutations - start), rng)].sum(1)
            for start in range(0, permutations, rows)])
    null = in_sums / k - (values.sum() - in_sums) / (n - k)
    return observed, permutation_p_value(observed, null, exact), exact


def group_rate_intervals(values: np.ndarray, groups: np.ndarray, names: Sequence[str],
                         resamples: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict[str, list[float]]:
    """Bootstrap 95% interval of the mean of ``values`` within each group."""
    values = np.asarray(values, dtype=np.float64)
    out = {}
    for name in names:
        members = np.flatnonzero(np.asarray(groups, dtype=object) == name)
        out[name] = list(bootstrap_interval(lambda idx: float(values[idx].mean()), [members], resamples, seed))
    return out
