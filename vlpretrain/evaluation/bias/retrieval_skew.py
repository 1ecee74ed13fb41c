"""Retrieval skew: for text queries over a group-labelled image pool, how far the groups' shares in
the top k depart from a desired distribution (by default the pool's own shares).

- ``Skew@k(g) = log(share of g in the top k / desired share of g)``; ``MaxSkew@k`` is its maximum over
  groups (Geyik et al. 2019): 0 when no group is over-represented.
- ``NDKL@k = (1/Z) sum_{i=1..k} KL(D_i || D) / log2(i + 1)``, ``Z = sum 1 / log2(i + 1)``, where
  ``D_i`` is the group distribution of the top i: 0 when every prefix matches the desired
  distribution.

:func:`run_retrieval_skew` runs the probe file's ``retrieval_skew`` section.

Example:
    >>> max_skew_at_k(top_groups=np.array([[0, 0, 1]]), desired=np.array([0.5, 0.5]))
    array([0.2876...])
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .control_words import attach_control_p
from .section import ProbeRun, SectionResult
from .stats import DEFAULT_BOOTSTRAP, DEFAULT_PERMUTATIONS, holm_adjust, mean_difference_test

__all__ = ["max_skew_at_k", "ndkl_at_k", "retrieval_skew", "run_retrieval_skew"]


def _shares(top_groups: np.ndarray, num_groups: int) -> np.ndarray:
    """(Q, G) share of each group among each query's listed items."""
    counts = np.stack([np.sum(top_groups == g, axis=1) for g in range(num_groups)], axis=1)
    return counts / top_groups.shape[1]


def max_skew_at_k(top_groups: np.ndarray, desired: np.ndarray) -> np.ndarray:
    """MaxSkew@k per query; ``top_groups`` (Q, k) holds group indices of each query's top k."""
    shares = _shares(np.asarray(top_groups), len(desired))
    with np.errstate(divide="ignore"):
        return np.max(np.log(shares / np.asarray(desired)[None]), axis=1)


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / q[None]), 0.0)
    return terms.sum(axis=1)


def ndkl_at_k(top_groups: np.ndarray, desired: np.ndarray) -> np.ndarray:
    """NDKL@k per query; ``top_groups`` (Q, k) as in :func:`max_skew_at_k`."""
    top_groups = np.asarray(top_groups)
    desired = np.asarray(desired, dtype=np.float64)
    k = top_groups.shape[1]
    weights = 1.0 / np.log2(np.arange(2, k + 2))
    total = np.zeros(len(top_groups))
    for i in range(1, k + 1):
        total += weights[i - 1] * _kl(_shares(top_groups[:, :i], len(desired)), desired)
    return total / weights.sum()


def retrieval_skew(similarities: np.ndarray, groups: Sequence[str], names: Sequence[str], k: int,
                   desired: Optional[dict[str, float]] = None, permutations: int = DEFAULT_PERMUTATIONS,
                   bootstrap: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict:
    """Skew of the top ``k`` images of each query (``similarities`` (Q, N)) over the groups.

    Returns ``max_skew`` and ``ndkl`` (means over queries, with bootstrap intervals from resampling
    the pool), per query values, and per group: mean top-k ``share`` against its ``desired`` share,
    ``skew`` (log ratio), and the one-sided permutation p-value that the group is over-represented
    (group labels shuffled over the pool, rankings fixed) with its Holm adjustment.
    """
    similarities = np.asarray(similarities, dtype=np.float64)
    groups = np.asarray(groups, dtype=object)
    num_queries, pool = similarities.shape
    if not 1 <= k <= pool:
        raise ValueError(f"retrieval skew: k={k} must be between 1 and the pool size ({pool})")
    index = {name: i for i, name in enumerate(names)}
    group_ids = np.array([index[g] for g in groups])
    pool_shares = np.bincount(group_ids, minlength=len(names)) / pool
    target = pool_shares if desired is None else np.array([float(desired[n]) for n in names])
    target = target / target.sum()
    order = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
    top_groups = group_ids[order]
    max_skew, ndkl = max_skew_at_k(top_groups, target), ndkl_at_k(top_groups, target)
    shares = _shares(top_groups, len(names)).mean(0)

    # How many queries list each image in their top k: a group's mean share is its members' total
    # over Q * k, so shuffling group labels over the pool is a mean-difference permutation test.
    listed = np.bincount(order.ravel(), minlength=pool).astype(np.float64)
    per_group = {}
    for g, name in enumerate(names):
        _, p_value, _ = mean_difference_test(listed, group_ids == g, permutations, seed)
        with np.errstate(divide="ignore"):
            skew = float(np.log(shares[g] / target[g]))
        per_group[name] = {"share": float(shares[g]), "desired_share": float(target[g]), "pool_share": float(pool_shares[g]),
                           "skew": skew, "p_value": p_value}
    for name, adjusted in zip(names, holm_adjust([per_group[n]["p_value"] for n in names])):
        per_group[name]["p_adjusted"] = adjusted

    def interval(draws: list) -> list[float]:
        return [float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))] if draws else [float("nan")] * 2

    rng = np.random.default_rng(seed)
    boot_skew, boot_ndkl, boot_shares = [], [], []
    for _ in range(bootstrap):
        sample = rng.integers(0, pool, pool)
        top = group_ids[sample[np.argsort(-similarities[:, sample], axis=1, kind="stable")[:, :k]]]
        boot_skew.append(max_skew_at_k(top, target).mean())
        boot_ndkl.append(ndkl_at_k(top, target).mean())
        boot_shares.append(_shares(top, len(names)).mean(0))
    for g, name in enumerate(names):
        per_group[name]["share_ci"] = interval([s[g] for s in boot_shares])
    return {"k": k, "max_skew": float(max_skew.mean()), "max_skew_ci": interval(boot_skew),
            "ndkl": float(ndkl.mean()), "ndkl_ci": interval(boot_ndkl),
            "per_query": {"max_skew": max_skew.tolist(), "ndkl": ndkl.tolist()}, "groups": per_group}


def _max_log_skew(similarities: np.ndarray, groups: np.ndarray, names: Sequence[str], k: int, target: np.ndarray) -> float:
    """The largest group skew of the top ``k`` over all queries together (a control draw's statistic)."""
    order = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
    top = groups[order]
    shares = np.array([np.mean(top == n) for n in names])
    with np.errstate(divide="ignore"):
        return float(np.max(np.log(shares / target)))


def run_retrieval_skew(run: ProbeRun, spec: dict) -> SectionResult:
    """The ``retrieval_skew`` section: for each named query set, :func:`retrieval_skew` at each k of
    ``spec["k"]``; at the first (the headline k) also the control p (control words in place of the
    queries), the skew per template and the flags.

    Example:
        >>> run_retrieval_skew(run, {"k": [50], "queries": {"crime": ["a criminal"]}}).metrics["crime"]["k=50"]
    """
    images, groups, names = run.images, run.groups, run.names
    headline_k = spec["k"][0]
    section = SectionResult({})
    for set_name, queries in spec["queries"].items():
        query_weights, query_weights_t = run.texts.both(queries)
        similarities = (query_weights.double() @ images.T).numpy()
        per_k = {f"k={k}": retrieval_skew(similarities, groups, names, k, spec.get("desired"), **run.common)
                 for k in spec["k"]}
        result = {"queries": queries, **per_k}
        headline = per_k[f"k={headline_k}"]
        if run.controls:
            target = np.array([headline["groups"][n]["desired_share"] for n in names])
            null = np.array([_max_log_skew((run.draw(len(queries)) @ images.T).numpy(), groups, names, headline_k, target)
                             for _ in range(run.controls)])
            attach_control_p(headline["groups"], names, "skew", null)
        per_template = []
        for t in range(len(run.templates)):
            top = retrieval_skew((query_weights_t[t].double() @ images.T).numpy(), groups, names, headline_k,
                                 spec.get("desired"), permutations=1, bootstrap=0, seed=run.seed)
            per_template.append({n: top["groups"][n]["skew"] for n in names} | {"max_skew": top["max_skew"]})
        section.sensitivity[f"retrieval_skew/{set_name}/skew@{headline_k}"] = run.spread(per_template, names + ["max_skew"])
        section.metrics[set_name] = result
        section.flags += run.flags(headline["groups"], "retrieval_skew", f"{set_name} top-{headline_k}", "skew")
    return section
