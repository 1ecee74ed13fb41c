"""Linear-probe evaluation on precomputed (frozen) features, in pure torch.

The probe is a multinomial logistic regression on L2-normalized features, as in the CLIP paper's
linear-probe protocol: the L2 penalty is chosen on a validation split carved out of the training
set, then the probe is refit on the whole training set with that value.

Example:
    >>> out = linear_probe(train_feats, train_labels, test_feats, test_labels, num_classes=10, k_shot=16)
    >>> accuracy = (out["logits"].argmax(1) == test_labels).float().mean().item()
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def few_shot_indices(labels: torch.Tensor, k: Optional[int], seed: int) -> torch.Tensor:
    """Indices of ``k`` examples per class, drawn deterministically from ``seed``; sorted ascending.

    ``k=None`` keeps every example. A class with fewer than ``k`` examples keeps all it has, and
    those classes are reported with a ``UserWarning`` (a silently unbalanced k-shot set would make
    results look comparable when they are not).

    Example:
        >>> idx = few_shot_indices(torch.tensor([0, 0, 0, 1, 1, 2]), k=2, seed=0)
        >>> torch.bincount(torch.tensor([0, 0, 0, 1, 1, 2])[idx]).tolist()  # class 2 is short (warns)
        [2, 2, 1]
    """
    labels = torch.as_tensor(labels).long().cpu()
    if k is None:
        return torch.arange(labels.shape[0])
    if k <= 0:
        raise ValueError(f"k must be positive or None, got {k}")
    # One permutation of the whole set, then the first k of each class in that order: the draw for
    # a class does not depend on which other classes exist, only on the seed and the label vector.
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(labels.shape[0], generator=generator)
    permuted_labels = labels[perm]
    chosen, short = [], {}
    for cls in torch.unique(labels).tolist():
        members = perm[permuted_labels == cls]
        if members.numel() < k:
            short[cls] = members.numel()
        chosen.append(members[:k])
    if short:
        warnings.warn(f"few_shot_indices: {len(short)} class(es) have fewer than k={k} examples "
                      f"and keep all they have: {short}", UserWarning, stacklevel=2)
    if not chosen:
        return torch.empty(0, dtype=torch.long)
    return torch.cat(chosen).sort().values


def _penalized_loss(model: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, weight_decay: float) -> torch.Tensor:
    # Mean cross-entropy plus wd * ||W||^2 (bias not penalized). The penalty is part of the loss rather
    # than an optimizer option so the chosen weight decay means the same thing for L-BFGS and AdamW.
    loss = F.cross_entropy(model(x), y)
    if weight_decay:
        loss = loss + weight_decay * model.weight.pow(2).sum()
    return loss


def fit_linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, num_classes: int,
                     weight_decay: float, epochs: int = 100, lr: Optional[float] = None,
                     batch_size: int = 256, seed: int = 0, optimizer: str = "lbfgs") -> torch.nn.Linear:
    """Fit a multinomial logistic regression on L2-normalized features; deterministic for a seed.

    ``optimizer="lbfgs"`` (default) runs full-batch L-BFGS with a strong-Wolfe line search for
    ``epochs`` iterations (``lr`` defaults to 1.0; ``batch_size`` is unused). ``optimizer="adamw"``
    runs ``epochs`` passes of mini-batch AdamW (``lr`` defaults to 1e-3) with the L2 penalty in the loss.
    The returned layer expects *unnormalized* features: it normalizes nothing itself, so callers
    apply ``F.normalize(x, dim=-1)`` first (``linear_probe`` does this).

    Example:
        >>> probe = fit_linear_probe(feats, labels, num_classes=10, weight_decay=1e-4)
        >>> preds = probe(F.normalize(test_feats, dim=-1)).argmax(1)
    """
    x = F.normalize(train_features.detach().float(), dim=-1)
    y = torch.as_tensor(train_labels, device=x.device).long()
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} features but {y.shape[0]} labels")
    if x.shape[0] == 0:
        raise ValueError("cannot fit a linear probe on an empty training set")
    model = torch.nn.Linear(x.shape[1], num_classes).to(x.device)
    # Zero init: the problem is convex, so the start does not change the optimum, and zeros make the
    # L-BFGS path independent of the global RNG.
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()

    with torch.enable_grad():
        if optimizer == "lbfgs":
            opt = torch.optim.LBFGS(model.parameters(), lr=1.0 if lr is None else lr, max_iter=epochs,
                                    history_size=10, line_search_fn="strong_wolfe",
                                    tolerance_grad=1e-7, tolerance_change=1e-10)

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = _penalized_loss(model, x, y, weight_decay)
                loss.backward()
                return loss

            opt.step(closure)
        elif optimizer == "adamw":
            # weight_decay=0 in AdamW itself: the (coupled) L2 penalty lives in the loss, see above.
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3 if lr is None else lr, weight_decay=0.0)
            generator = torch.Generator().manual_seed(seed)
            for _ in range(epochs):
                order = torch.randperm(x.shape[0], generator=generator).to(x.device)
                for start in range(0, x.shape[0], batch_size):
                    batch = order[start:start + batch_size]
                    opt.zero_grad()
                    _penalized_loss(model, x[batch], y[batch], weight_decay).backward()
                    opt.step()
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}; use 'lbfgs' or 'adamw'")
    model.requires_grad_(False)
    return model


def _stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train positions, val positions) with ~val_fraction of each class in val.

    A class with n >= 2 examples puts between 1 and n - 1 of them in val, so every class is still
    seen in training; a class with a single example stays in train.
    """
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(labels.shape[0], generator=generator)
    permuted_labels = labels[perm]
    train_parts, val_parts = [], []
    for cls in torch.unique(labels).tolist():
        members = perm[permuted_labels == cls]
        n = members.numel()
        n_val = 0 if n < 2 or val_fraction <= 0 else min(n - 1, max(1, round(n * val_fraction)))
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    train_pos = torch.cat(train_parts).sort().values if train_parts else torch.empty(0, dtype=torch.long)
    val_pos = torch.cat(val_parts).sort().values if val_parts else torch.empty(0, dtype=torch.long)
    return train_pos, val_pos


@torch.no_grad()
def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, k_shot: Optional[int] = None,
                 weight_decays: Sequence[float] = (0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
                 val_fraction: float = 0.2, seed: int = 0, epochs: int = 100) -> dict:
    """Few-shot (or full) linear probe with the weight decay selected on a validation split.

    Steps: take ``k_shot`` examples per class (``None`` = all); hold out a stratified ``val_fraction``
    of them; fit one probe per weight decay and score it on the held-out part; refit on the whole
    (few-shot) training set with the best value; return test logits.

    Selection: highest validation accuracy, ties broken by lower validation cross-entropy, then by
    the larger weight decay (the safer choice when nothing separates them). If no validation example
    can be held out (e.g. 1-shot), the largest weight decay is used and a warning is issued.

    Returns ``{"logits": (N_test, C), "weight_decay", "val_acc_by_weight_decay": {wd: acc},
    "val_loss_by_weight_decay": {wd: ce}, "k_shot", "num_train", "short_classes": {cls: count}}``.
    ``test_labels`` is only checked for length; accuracy is left to the caller.

    Example:
        >>> out = linear_probe(tr_x, tr_y, te_x, te_y, num_classes=5, k_shot=4)
        >>> (out["logits"].argmax(1) == te_y).float().mean(), out["weight_decay"]
    """
    if len(weight_decays) == 0:
        raise ValueError("weight_decays must not be empty")
    train_labels = torch.as_tensor(train_labels).long().cpu()
    if test_labels is not None and len(test_labels) != test_features.shape[0]:
        raise ValueError(f"{test_features.shape[0]} test features but {len(test_labels)} test labels")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shot_idx = few_shot_indices(train_labels, k_shot, seed)
    for w in caught:  # re-emit at the caller's level, and keep the numbers for the result
        warnings.warn(w.message, w.category, stacklevel=3)  # 3: skip the no_grad wrapper
    counts = torch.bincount(train_labels[shot_idx], minlength=num_classes)
    present = torch.unique(train_labels).tolist()
    short_classes = {} if k_shot is None else {c: int(counts[c]) for c in present if counts[c] < k_shot}

    x_all = train_features[shot_idx.to(train_features.device)]
    y_all = train_labels[shot_idx]
    train_pos, val_pos = _stratified_split(y_all, val_fraction, seed)

    val_acc: dict[float, float] = {}
    val_loss: dict[float, float] = {}
    if len(weight_decays) == 1:
        chosen = float(weight_decays[0])
    elif val_pos.numel() == 0:
        chosen = float(max(weight_decays))
        warnings.warn("linear_probe: no validation example could be held out (too few per class); "
                      f"using the largest weight decay {chosen}", UserWarning, stacklevel=3)
    else:
        dev = train_features.device
        x_tr, y_tr = x_all[train_pos.to(dev)], y_all[train_pos]
        x_val = F.normalize(x_all[val_pos.to(dev)].float(), dim=-1)
        y_val = y_all[val_pos].to(dev)
        for wd in weight_decays:
            probe = fit_linear_probe(x_tr, y_tr, num_classes, float(wd), epochs=epochs, seed=seed)
            logits = probe(x_val)
            val_acc[float(wd)] = (logits.argmax(1) == y_val).float().mean().item()
            val_loss[float(wd)] = F.cross_entropy(logits, y_val).item()
        chosen = max(val_acc, key=lambda wd: (val_acc[wd], -_finite(val_loss[wd]), wd))

    probe = fit_linear_probe(x_all, y_all, num_classes, chosen, epochs=epochs, seed=seed)
    logits = probe(F.normalize(test_features.float(), dim=-1))
    return {
        "logits": logits,
        "weight_decay": chosen,
        "val_acc_by_weight_decay": val_acc,
        "val_loss_by_weight_decay": val_loss,
        "k_shot": k_shot,
        "num_train": int(shot_idx.numel()),
        "short_classes": short_classes,
    }


def _finite(value: float) -> float:
    # A diverged fit (inf/nan loss) must lose ties, not win them through nan comparisons.
    return value if math.isfinite(value) else float("inf")
