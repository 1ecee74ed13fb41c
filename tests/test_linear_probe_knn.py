"""Linear probe and weighted k-NN on synthetic clustered features."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from vlpretrain.evaluation.knn import knn_classify
from vlpretrain.evaluation.linear_probe import few_shot_indices, fit_linear_probe, linear_probe

NUM_CLASSES, DIM = 5, 64


def clusters(n_per_class: int, seed: int, spread: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters around fixed random centres (centres shared across seeds)."""
    centres = torch.randn(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    feats = centres[labels] + spread * torch.randn(labels.shape[0], DIM, generator=g)
    return feats, labels


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return (scores.argmax(1) == labels).float().mean().item()


def naive_knn(train, train_labels, test, num_classes, k, temperature):
    sims = F.normalize(test, dim=-1) @ F.normalize(train, dim=-1).T
    top, idx = sims.topk(min(k, train.shape[0]), dim=1)
    weights = (top / temperature).exp()
    out = torch.zeros(test.shape[0], num_classes, dtype=test.dtype)
    for i in range(test.shape[0]):
        for w, j in zip(weights[i], idx[i]):
            out[i, train_labels[j]] += w
    return out


# ---------------------------------------------------------------- few_shot_indices

def test_few_shot_exactly_k_per_class_and_deterministic():
    labels = torch.randint(0, 7, (300,), generator=torch.Generator().manual_seed(0))
    a = few_shot_indices(labels, 4, seed=3)
    b = few_shot_indices(labels, 4, seed=3)
    c = few_shot_indices(labels, 4, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.bincount(labels[a], minlength=7).tolist() == [4] * 7
    assert a.unique().numel() == a.numel()


def test_few_shot_none_keeps_all_and_short_class_is_reported():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    assert torch.equal(few_shot_indices(labels, None, seed=0), torch.arange(7))
    with pytest.warns(UserWarning, match="fewer than k=2"):
        idx = few_shot_indices(labels, 2, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [2, 2, 1]


# ---------------------------------------------------------------- linear probe

def test_probe_separable_clusters_high_accuracy_and_small_weight_decay():
    tr_x, tr_y = clusters(40, seed=0)
    te_x, te_y = clusters(40, seed=1)
    out = linear_probe(tr_x, tr_y, te_x, te_y, NUM_CLASSES, epochs=50)
    assert out["logits"].shape == (te_x.shape[0], NUM_CLASSES)
    assert accuracy(out["logits"], te_y) > 0.95
    assert set(out["val_acc_by_weight_decay"]) == {0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1}
    assert out["num_train"] == 200 and out["k_shot"] is None
    # Separable: every small value is perfect on val, and the cross-entropy tie-break prefers weak
    # regularisation over the strongest value in the grid.
    assert out["weight_decay"] <= 1e-3


def test_probe_few_shot_still_works():
    tr_x, tr_y = clusters(40, seed=0)
    te_x, te_y = clusters(40, seed=1)
    out = linear_probe(tr_x, tr_y, te_x, te_y, NUM_CLASSES, k_shot=5, epochs=50)
    assert out["num_train"] == 25 and out["k_shot"] == 5 and out["short_classes"] == {}
    assert accuracy(out["logits"], te_y) > 0.95


def test_probe_shuffled_labels_near_chance():
    tr_x, tr_y = clusters(40, seed=0)
    te_x, te_y = clusters(40, seed=1)
    g = torch.Generator().manual_seed(7)
    out = linear_probe(tr_x, tr_y[torch.randperm(len(tr_y), generator=g)], te_x, te_y, NUM_CLASSES,
                       weight_decays=(0, 1e-3, 1e-1), epochs=50)
    assert accuracy(out["logits"], te_y) < 0.4  # chance is 0.2


def test_probe_on_noise_reports_val_accuracy_per_weight_decay():
    g = torch.Generator().manual_seed(0)
    tr_x, tr_y = torch.randn(150, DIM, generator=g), torch.randint(0, NUM_CLASSES, (150,), generator=g)
    te_x, te_y = torch.randn(150, DIM, generator=g), torch.randint(0, NUM_CLASSES, (150,), generator=g)
    wds = (0, 1e-4, 1e-2, 1e-1)
    out = linear_probe(tr_x, tr_y, te_x, te_y, NUM_CLASSES, weight_decays=wds, epochs=50)
    assert set(out["val_acc_by_weight_decay"]) == {float(w) for w in wds}
    assert all(0.0 <= a <= 1.0 for a in out["val_acc_by_weight_decay"].values())
    assert out["weight_decay"] in out["val_acc_by_weight_decay"]
    # Noise: the over-fitted (wd=0) probe is confidently wrong on val, the heavily regularised one is not.
    assert out["val_loss_by_weight_decay"][0.1] < out["val_loss_by_weight_decay"][0.0]
    assert accuracy(out["logits"], te_y) < 0.4


def test_probe_single_example_classes_stay_in_train_and_fall_back():
    tr_x, tr_y = clusters(3, seed=0)
    te_x, te_y = clusters(10, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # k=1 leaves nothing to validate on: must warn, not crash silently
        with pytest.raises(UserWarning, match="no validation example"):
            linear_probe(tr_x, tr_y, te_x, te_y, NUM_CLASSES, k_shot=1, epochs=20)
    with pytest.warns(UserWarning):
        out = linear_probe(tr_x, tr_y, te_x, te_y, NUM_CLASSES, k_shot=1, weight_decays=(0, 1e-2), epochs=20)
    assert out["weight_decay"] == 1e-2 and out["val_acc_by_weight_decay"] == {} and out["num_train"] == 5


def test_fit_is_deterministic_for_both_optimizers():
    tr_x, tr_y = clusters(20, seed=0)
    for opt in ("lbfgs", "adamw"):
        a = fit_linear_probe(tr_x, tr_y, NUM_CLASSES, 1e-4, epochs=10, seed=3, optimizer=opt)
        b = fit_linear_probe(tr_x, tr_y, NUM_CLASSES, 1e-4, epochs=10, seed=3, optimizer=opt, lr=None)
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    probe = fit_linear_probe(tr_x, tr_y, NUM_CLASSES, 1e-4, epochs=30, lr=1e-2, batch_size=32, optimizer="adamw")
    assert accuracy(probe(F.normalize(tr_x, dim=-1)), tr_y) > 0.95


# ---------------------------------------------------------------- k-NN

def test_knn_separable_high_accuracy_and_shuffled_near_chance():
    tr_x, tr_y = clusters(40, seed=0)
    te_x, te_y = clusters(40, seed=1)
    assert accuracy(knn_classify(tr_x, tr_y, te_x, NUM_CLASSES, k=20), te_y) > 0.95
    shuffled = tr_y[torch.randperm(len(tr_y), generator=torch.Generator().manual_seed(7))]
    assert accuracy(knn_classify(tr_x, shuffled, te_x, NUM_CLASSES, k=20), te_y) < 0.4


def test_knn_matches_naive_and_chunking_does_not_change_results():
    # float64 so a 1e-6 tolerance checks the algorithm, not float32 summation order
    # (scores reach ~1e3, where one float32 ulp is already ~1e-4).
    g = torch.Generator().manual_seed(0)
    tr_x = torch.randn(90, 16, generator=g, dtype=torch.float64)
    tr_y = torch.randint(0, 4, (90,), generator=g)
    te_x = torch.randn(37, 16, generator=g, dtype=torch.float64)
    ref = naive_knn(tr_x, tr_y, te_x, 4, k=10, temperature=0.1)
    full = knn_classify(tr_x, tr_y, te_x, 4, k=10, temperature=0.1, chunk_size=1024)
    assert torch.allclose(full, ref, rtol=1e-6, atol=1e-6)
    for chunk in (1, 5, 16, 36):  # all smaller than N_test = 37
        chunked = knn_classify(tr_x, tr_y, te_x, 4, k=10, temperature=0.1, chunk_size=chunk)
        assert torch.allclose(chunked, ref, rtol=1e-6, atol=1e-6)
        assert torch.equal(chunked.argmax(1), full.argmax(1))
    # float32 inputs give float32 scores, equal up to float32 rounding.
    f32 = knn_classify(tr_x.float(), tr_y, te_x.float(), 4, k=10, temperature=0.1, chunk_size=5)
    assert f32.dtype == torch.float32 and torch.allclose(f32.double(), ref, rtol=1e-5)


def test_knn_k_larger_than_train_is_clamped():
    g = torch.Generator().manual_seed(1)
    tr_x, tr_y = torch.randn(6, 8, generator=g), torch.tensor([0, 1, 1, 2, 2, 2])
    te_x = torch.randn(4, 8, generator=g)
    scores = knn_classify(tr_x, tr_y, te_x, 3, k=50, temperature=0.5, chunk_size=3)
    assert torch.allclose(scores, naive_knn(tr_x, tr_y, te_x, 3, k=6, temperature=0.5), atol=1e-6)
