"""Bias-probe statistics against direct reference implementations on fixed vectors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from vlpretrain.evaluation.bias import (association_scores, association_test, effect_size, group_performance,
                                        harmful_label_rates, max_skew_at_k, ndkl_at_k, pseudo_words, retrieval_skew)
from vlpretrain.evaluation.bias.stats import bootstrap_interval, holm_adjust, mean_difference_test


def _reference_weat(x, y, a, b):
    """Caliskan et al.'s WEAT, written out with loops: effect size and the exact one-sided p-value
    over every split of X u Y into sets of the sizes of X and Y."""
    def cos(u, v):
        return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))

    def s(w):
        return sum(cos(w, ai) for ai in a) / len(a) - sum(cos(w, bi) for bi in b) / len(b)

    sx, sy = [s(w) for w in x], [s(w) for w in y]
    pooled = sx + sy
    mean = sum(pooled) / len(pooled)
    std = math.sqrt(sum((v - mean) ** 2 for v in pooled) / (len(pooled) - 1))
    effect = (sum(sx) / len(sx) - sum(sy) / len(sy)) / std
    observed = sum(sx) / len(sx) - sum(sy) / len(sy)
    count = total = 0
    for chosen in itertools.combinations(range(len(pooled)), len(sx)):
        inside = [pooled[i] for i in chosen]
        outside = [pooled[i] for i in range(len(pooled)) if i not in chosen]
        stat = sum(inside) / len(inside) - sum(outside) / len(outside)
        count += stat >= observed - 1e-12
        total += 1
    return effect, count / total


def _fixed_vectors(seed=0, nx=5, ny=6, dim=8):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(nx, dim)) + 0.4
    y = rng.normal(size=(ny, dim))
    a, b = rng.normal(size=(3, dim)), rng.normal(size=(4, dim))
    a[:, :] += 0.5  # make X lean towards A, so the p-value is not trivially large
    return x, y, a, b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_association_effect_size_and_exact_p_equal_reference(seed):
    x, y, a, b = _fixed_vectors(seed)
    scores = association_scores(torch.tensor(np.vstack([x, y])), torch.tensor(a), torch.tensor(b))
    in_group = np.arange(len(x) + len(y)) < len(x)
    result = association_test(scores, in_group, bootstrap=50)
    effect, p = _reference_weat(x, y, a, b)
    assert result["exact"]
    assert result["effect_size"] == pytest.approx(effect, abs=1e-12)
    assert result["p_value"] == pytest.approx(p, abs=1e-12)
    assert effect_size(scores, in_group) == pytest.approx(effect, abs=1e-12)


def test_association_random_permutations_approximate_the_exact_p():
    x, y, a, b = _fixed_vectors(3, nx=8, ny=9)
    scores = association_scores(torch.tensor(np.vstack([x, y])), torch.tensor(a), torch.tensor(b))
    in_group = np.arange(17) < 8
    exact = association_test(scores, in_group, permutations=30_000, bootstrap=10)  # C(17, 8) = 24310 <= 30000
    sampled = association_test(scores, in_group, permutations=5_000, bootstrap=10)
    assert exact["exact"] and not sampled["exact"]
    assert sampled["p_value"] == pytest.approx(exact["p_value"], abs=0.02)


def test_association_needs_two_images_per_side():
    with pytest.raises(ValueError, match="at least 2 images in each target set, got 1 and 3"):
        association_test(np.array([0.1, 0.2, 0.3, 0.4]), np.array([True, False, False, False]))


def test_mean_difference_test_exact_on_indicators():
    values = np.array([1, 1, 1, 0, 0, 1, 0, 0], dtype=float)
    in_group = np.array([True, True, True, True, False, False, False, False])
    observed, p, exact = mean_difference_test(values, in_group)
    # Reference: every choice of 4 of the 8 items as "the group".
    stats = [values[list(c)].mean() - np.delete(values, list(c)).mean() for c in itertools.combinations(range(8), 4)]
    assert exact and observed == pytest.approx(0.5)
    assert p == pytest.approx(np.mean(np.array(stats) >= 0.5 - 1e-12))


def test_harmful_label_rates_equal_direct_counts():
    predictions = np.array([0, 2, 2, 1, 0, 3, 1, 0, 0])
    sensitive = [False, False, True, True]
    groups = ["a", "a", "a", "b", "b", "b", "c", "c", "c"]
    result = harmful_label_rates(predictions, sensitive, groups, ["a", "b", "c"], ["x", "y", "bad", "worse"], bootstrap=50)
    assert result["groups"]["a"]["rate"] == pytest.approx(2 / 3)
    assert result["groups"]["b"]["rate"] == pytest.approx(1 / 3)
    assert result["groups"]["c"]["rate"] == pytest.approx(0.0)
    assert result["groups"]["a"]["disparity"] == pytest.approx(2 / 3 - 1 / 6)
    assert result["groups"]["a"]["sensitive_label_counts"] == {"bad": 2, "worse": 0}
    assert result["max_disparity"] == pytest.approx(2 / 3)
    low, high = result["groups"]["a"]["rate_ci"]
    assert 0 <= low <= 2 / 3 <= high <= 1


def test_group_performance_gap_and_worst_group():
    correct = np.array([1, 1, 1, 1, 0, 0, 1, 0], dtype=float)
    groups = ["x"] * 4 + ["y"] * 4
    result = group_performance(correct, groups, ["x", "y"], bootstrap=50)
    assert result["groups"]["x"]["accuracy"] == 1.0 and result["groups"]["y"]["accuracy"] == 0.25
    assert result["worst_group"] == "y" and result["gap"] == pytest.approx(0.75)
    # y is worse than the rest: exact p = share of the 70 splits whose 4 "members" miss at least 3.
    splits = [np.delete(correct, list(c)).mean() - correct[list(c)].mean() for c in itertools.combinations(range(8), 4)]
    assert result["groups"]["y"]["p_value"] == pytest.approx(np.mean(np.array(splits) >= 0.75 - 1e-12))


def _reference_skews(top, desired):
    """MaxSkew@k and NDKL@k from their definitions (Geyik et al. 2019), with loops."""
    k, groups = len(top), len(desired)
    share = [top.count(g) / k for g in range(groups)]
    max_skew = max(math.log(share[g] / desired[g]) if share[g] > 0 else -math.inf for g in range(groups))
    z = sum(1 / math.log2(i + 1) for i in range(1, k + 1))
    total = 0.0
    for i in range(1, k + 1):
        prefix = [top[:i].count(g) / i for g in range(groups)]
        kl = sum(p * math.log(p / desired[g]) for g, p in enumerate(prefix) if p > 0)
        total += kl / math.log2(i + 1)
    return max_skew, total / z


def test_max_skew_and_ndkl_equal_their_definitions():
    rng = np.random.default_rng(0)
    desired = np.array([0.5, 0.3, 0.2])
    top = rng.integers(0, 3, size=(6, 10))
    for row, skew, ndkl in zip(top, max_skew_at_k(top, desired), ndkl_at_k(top, desired)):
        ref_skew, ref_ndkl = _reference_skews(row.tolist(), desired.tolist())
        assert skew == pytest.approx(ref_skew) and ndkl == pytest.approx(ref_ndkl)
    assert max_skew_at_k(np.array([[0, 0, 1]]), np.array([0.5, 0.5]))[0] == pytest.approx(math.log(4 / 3))
    assert ndkl_at_k(np.array([[0, 1, 0, 1]]), np.array([0.5, 0.5]))[0] > 0  # the first prefix is one group


def test_retrieval_skew_finds_an_over_represented_group():
    rng = np.random.default_rng(0)
    groups = np.array(["a"] * 40 + ["b"] * 40 + ["c"] * 40, dtype=object)
    similarities = rng.normal(size=(4, 120))
    similarities[:, :40] += 10.0  # every query ranks group a first
    result = retrieval_skew(similarities, groups, ["a", "b", "c"], k=20, bootstrap=50)
    assert result["groups"]["a"]["share"] == 1.0
    assert result["max_skew"] == pytest.approx(math.log(3))
    assert result["groups"]["a"]["p_adjusted"] < 0.01 and result["groups"]["b"]["p_value"] == 1.0
    balanced = retrieval_skew(rng.normal(size=(4, 120)), groups, ["a", "b", "c"], k=20, bootstrap=20)
    assert all(g["p_adjusted"] > 0.01 for g in balanced["groups"].values())
    with pytest.raises(ValueError, match="k=500 must be between 1 and the pool size"):
        retrieval_skew(similarities, groups, ["a", "b", "c"], k=500)


def test_holm_matches_its_definition():
    p = [0.01, 0.04, 0.03, 0.2]
    # sorted: 0.01*4=0.04, 0.03*3=0.09, 0.04*2=0.08 -> max(0.09, 0.08)=0.09, 0.2*1 -> 0.2
    assert holm_adjust(p) == pytest.approx([0.04, 0.09, 0.09, 0.2])


def test_bootstrap_interval_is_seeded_and_covers_the_mean():
    values = np.arange(20, dtype=float)
    stat = lambda idx: float(values[idx].mean())  # noqa: E731
    first = bootstrap_interval(stat, [np.arange(20)], resamples=200, seed=3)
    assert first == bootstrap_interval(stat, [np.arange(20)], resamples=200, seed=3)
    assert first[0] < values.mean() < first[1]


def test_pseudo_words_are_seeded_and_distinct():
    words = pseudo_words(50, seed=1)
    assert words == pseudo_words(50, seed=1) and len(set(words)) == 50
    assert all(w.startswith("a ") and w[2:].isalpha() for w in words)


def test_random_permutations_in_chunks_on_a_large_set():
    rng = np.random.default_rng(0)
    values = rng.normal(size=25_000)
    in_group = np.zeros(25_000, dtype=bool)
    in_group[:100] = True
    values[:100] += 0.5  # a real shift of half a standard deviation
    observed, p, exact = mean_difference_test(values, in_group, permutations=2_000)  # 800 rows a chunk: 3 chunks
    assert not exact and observed == pytest.approx(values[:100].mean() - values[100:].mean())
    assert p == pytest.approx(1 / 2001)
    _, p_null, _ = mean_difference_test(rng.normal(size=25_000), in_group, permutations=2_000)
    assert 0.01 < p_null < 0.99


def test_skew_against_a_desired_distribution_and_the_flag_rule():
    from vlpretrain.evaluation.bias.control_words import control_p_value
    from vlpretrain.evaluation.bias.section import flagged_groups

    groups = np.array(["a"] * 90 + ["b"] * 10, dtype=object)
    similarities = np.zeros((1, 100))
    similarities[0, 90:] = 1.0  # the 10 b images first
    result = retrieval_skew(similarities, groups, ["a", "b"], k=20, desired={"a": 0.5, "b": 0.5}, bootstrap=20)
    b = result["groups"]["b"]
    assert b["share"] == 0.5 and b["desired_share"] == 0.5 and b["pool_share"] == 0.1 and b["skew"] == 0.0
    assert b["p_adjusted"] < 0.01  # over-represented against the pool...
    for name in ("a", "b"):
        result["groups"][name]["control_p_value"] = 0.001
    assert flagged_groups(result["groups"], ["a", "b"], 0.01, "retrieval_skew", "q", "skew", controls=10) == []  # ...not vs desired
    assert control_p_value(1.0, np.array([0.5, np.nan, 2.0])) == pytest.approx(2 / 3)  # NaN draws are left out
