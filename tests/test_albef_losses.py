"""ALBEF's objective: negative samplers, BERT masking, ITC with queue / soft targets, ITM / MLM terms,
and the 2-process run with globally sampled negatives equal to one process on the whole batch."""

from __future__ import annotations

import dataclasses
import math

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.stats import chi2

from vlpretrain.config import LossConfig
from vlpretrain.distributed import all_gather_with_grad
from vlpretrain.losses import AlbefLoss, ContrastiveLoss, create_loss
from vlpretrain.losses.albef import distill_alpha_at
from vlpretrain.models.fusion_sampling import (false_negative_mask, global_hard_negative_pairs, mask_tokens,
                                               negative_pairs, sample_hard_negatives, sample_random_negatives)

from helpers import spawn_gloo

DRAWS = 20000


def _features(n: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _assert_frequencies(choices: torch.Tensor, expected: torch.Tensor) -> None:
    """Per-cell counts within 5 binomial sd of the expectation, and a chi-square test at p = 1e-4."""
    counts = torch.bincount(choices, minlength=len(expected)).double()
    expected = expected.double() * len(choices)
    sd = (expected * (1 - expected / len(choices))).sqrt()
    assert ((counts - expected).abs() <= 5 * sd + 1e-9).all(), (counts, expected)
    allowed = expected > 0
    assert (counts[~allowed] == 0).all()
    statistic = (((counts - expected)[allowed]) ** 2 / expected[allowed]).sum().item()
    assert statistic < chi2.ppf(1 - 1e-4, int(allowed.sum()) - 1), statistic


# ---- false negatives and samplers ---------------------------------------------------------------------
def test_false_negative_mask_marks_diagonal_same_image_and_identical_caption():
    mask = false_negative_mask(torch.tensor([0, 0, 1, 2]), torch.tensor([7, 8, 9, 7]))
    expected = torch.tensor([[1, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert torch.equal(false_negative_mask(torch.arange(3), None), torch.eye(3, dtype=torch.bool))


def test_hard_negatives_never_forbidden():
    image_ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])
    text_keys = torch.tensor([10, 11, 12, 13, 14, 15, 16, 12])  # rows 2 and 7: the same caption
    forbidden = false_negative_mask(image_ids, text_keys)
    similarity = 10 * _features(8) @ _features(8, seed=1).T
    similarity.fill_diagonal_(50.0)  # the positive would dominate if it were not excluded
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        choice = sample_hard_negatives(similarity, forbidden, generator)
        assert not forbidden[torch.arange(8), choice].any()
        choice = sample_random_negatives(forbidden, generator)
        assert not forbidden[torch.arange(8), choice].any()


def test_hard_negatives_follow_softmax_weights():
    similarity = torch.tensor([[3.0, 1.0, 0.0, -1.0, 2.0, 0.5]])
    forbidden = torch.tensor([[True, False, False, False, False, True]])
    choices = sample_hard_negatives(similarity.expand(DRAWS, -1), forbidden.expand(DRAWS, -1),
                                    torch.Generator().manual_seed(0))
    expected = torch.softmax(similarity[0].masked_fill(forbidden[0], float("-inf")), dim=0)
    _assert_frequencies(choices, expected)


def test_hard_negatives_survive_extreme_similarities():
    # Softmax-then-zero would underflow every allowed weight to 0 here; masking before the softmax does not.
    similarity = torch.tensor([[1000.0, -1000.0, -1000.0]])
    forbidden = torch.tensor([[True, False, False]])
    choices = sample_hard_negatives(similarity.expand(1000, -1), forbidden.expand(1000, -1))
    assert set(choices.tolist()) <= {1, 2}


def test_random_negatives_uniform_over_allowed():
    forbidden = torch.tensor([[False, True, False, False, True, False]])
    choices = sample_random_negatives(forbidden.expand(DRAWS, -1), torch.Generator().manual_seed(0))
    _assert_frequencies(choices, torch.tensor([0.25, 0, 0.25, 0.25, 0, 0.25]))


def test_row_without_candidates_returns_minus_one():
    forbidden = false_negative_mask(torch.tensor([0, 0, 1]), None)
    forbidden[2, 0] = forbidden[2, 1] = True
    assert sample_hard_negatives(torch.zeros(3, 3), forbidden)[2].item() == -1
    assert sample_random_negatives(forbidden)[2].item() == -1
    assert sample_random_negatives(forbidden)[:2].tolist() == [2, 2]  # rows 0 and 1 share an image: only 2 left


def test_negative_pairs_local_and_global_agree_in_one_process():
    image, text = _features(6), _features(6, seed=1)
    ids, keys = torch.tensor([0, 0, 1, 2, 3, 4]), torch.tensor([5, 6, 7, 8, 9, 5])
    local = negative_pairs(image, text, torch.tensor(10.0), ids, keys, generator=torch.Generator().manual_seed(3))
    world = global_hard_negative_pairs(image, text, torch.tensor(10.0), ids, keys,
                                       generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(local, world))
    forbidden = false_negative_mask(ids, keys)
    assert not forbidden[torch.arange(6), local[0]].any() and not forbidden[local[1], torch.arange(6)].any()
    with pytest.raises(ValueError, match=r"^unknown negatives 'hardest'; set model.fusion.negatives to one of "
                                         r"\['hard', 'random'\]$"):
        negative_pairs(image, text, torch.tensor(10.0), negatives="hardest")


# ---- masking ----------------------------------------------------------------------------------------
def test_mask_tokens_rates_and_specials():
    pad, sot, eot, mask_id, vocab = 0, 1, 2, 3, 500
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, vocab, (4000, 32), generator=generator)
    tokens[:, 0], tokens[:, 20], tokens[:, 21:] = sot, eot, pad
    masked, labels = mask_tokens(tokens, mask_id, {pad, sot, eot}, vocab, 0.15, generator)

    special = torch.isin(tokens, torch.tensor([pad, sot, eot]))
    chosen = labels != -100
    assert not (chosen & special).any()
    assert torch.equal(masked[special], tokens[special]) and torch.equal(masked[~chosen], tokens[~chosen])
    assert torch.equal(labels[chosen], tokens[chosen])

    def check_rate(hits: torch.Tensor, n: int, p: float) -> None:
        sd = math.sqrt(p * (1 - p) / n)
        assert abs(hits.sum().item() / n - p) < 5 * sd, (hits.sum().item() / n, p)

    n_candidates, n_chosen = int((~special).sum()), int(chosen.sum())
    check_rate(chosen[~special], n_candidates, 0.15)
    to_mask = chosen & (masked == mask_id)
    # A random replacement that happens to draw the original id counts as kept (p = 0.1 / 496).
    to_random = chosen & (masked != mask_id) & (masked != tokens)
    check_rate(to_mask[chosen], n_chosen, 0.8)
    check_rate(to_random[chosen], n_chosen, 0.1 * (1 - 1 / (vocab - 4)))
    replacements = masked[to_random]
    assert not torch.isin(replacements, torch.tensor([pad, sot, eot, mask_id])).any()
    assert (replacements < vocab).all() and (replacements >= 0).all()


def test_mask_tokens_rejects_bad_probability():
    with pytest.raises(ValueError, match=r"^mask_tokens: probability must be in \(0, 1\], got 1.5; "
                                         r"set model.fusion.mlm_probability to e.g. 0.15$"):
        mask_tokens(torch.ones(2, 4, dtype=torch.long), 3, {0}, 10, probability=1.5)


# ---- ITC -------------------------------------------------------------------------------------------
def test_itc_without_queue_or_distillation_equals_contrastive_and_clip_loss():
    image, text, scale = _features(12), _features(12, seed=1), torch.tensor(1 / 0.07)
    for loss_fn in (AlbefLoss(), AlbefLoss(queue_size=8, momentum=0.995)):  # an empty queue adds nothing
        itc = loss_fn(image_features=image, text_features=text, logit_scale=scale)
        assert set(itc) == {"itc_loss"}
        assert torch.equal(itc["itc_loss"], ContrastiveLoss()(image, text, scale)["contrastive_loss"])
        assert torch.allclose(itc["itc_loss"], open_clip.ClipLoss()(image, text, scale), atol=1e-6)
    weighted = AlbefLoss(itc_weight=0.5)(image_features=image, text_features=text, logit_scale=scale)
    assert torch.allclose(weighted["itc_loss"], 0.5 * open_clip.ClipLoss()(image, text, scale))


def _rows(values: list[float], dim: int = 4) -> torch.Tensor:
    return torch.tensor(values)[:, None].expand(-1, dim).clone()


def test_queue_is_fifo_and_checkpointable():
    loss_fn = AlbefLoss(queue_size=5, momentum=0.9)
    loss_fn.dequeue_and_enqueue(_rows([0, 1]), _rows([10, 11]))
    image, text = loss_fn.queued_features()
    assert image[:, 0].tolist() == [0, 1] and text[:, 0].tolist() == [10, 11]
    loss_fn.dequeue_and_enqueue(_rows([2, 3]), _rows([12, 13]))
    loss_fn.dequeue_and_enqueue(_rows([4, 5]), _rows([14, 15]))  # 6 pushed: 0 is evicted
    image, text = loss_fn.queued_features()
    assert image[:, 0].tolist() == [1, 2, 3, 4, 5] and text[:, 0].tolist() == [11, 12, 13, 14, 15]
    assert int(loss_fn.queue_ptr) == 1 and int(loss_fn.queue_count) == 5

    restored = AlbefLoss(queue_size=5, momentum=0.9)  # feature width unknown until the checkpoint is loaded
    restored.load_state_dict(loss_fn.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.queued_features(), loss_fn.queued_features()))
    restored.dequeue_and_enqueue(_rows([6]), _rows([16]))
    assert restored.queued_features()[0][:, 0].tolist() == [2, 3, 4, 5, 6]

    loss_fn.dequeue_and_enqueue(_rows(list(range(20, 27))), _rows(list(range(30, 37))))  # more than it holds
    assert loss_fn.queued_features()[0][:, 0].tolist() == [22, 23, 24, 25, 26]

    with pytest.raises(ValueError, match=r"^the checkpoint's ITC queue holds 5 entries but loss.queue_size is 6; "
                                         r"resume with loss.queue_size=5$"):
        AlbefLoss(queue_size=6, momentum=0.9).load_state_dict(loss_fn.state_dict())


def _hand_itc(image, text, scale, columns_text, columns_image, target_image, target_text):
    log_image = torch.log_softmax(scale * image @ columns_text.T, dim=1)
    log_text = torch.log_softmax(scale * text @ columns_image.T, dim=1)
    return (-(target_image * log_image).sum(1).mean() - (target_text * log_text).sum(1).mean()) / 2


def test_queue_features_are_extra_negatives():
    image, text, scale = _features(4), _features(4, seed=1), torch.tensor(10.0)
    queue_image, queue_text = _features(3, seed=2), _features(3, seed=3)
    loss_fn = AlbefLoss(queue_size=3, momentum=0.9)
    loss_fn.dequeue_and_enqueue(queue_image, queue_text)
    itc = loss_fn(image_features=image, text_features=text, logit_scale=scale)["itc_loss"]
    one_hot = torch.eye(4, 7)
    expected = _hand_itc(image, text, scale, torch.cat([text, queue_text]), torch.cat([image, queue_image]),
                         one_hot, one_hot)
    assert torch.allclose(itc, expected, atol=1e-6)


def test_soft_targets_at_alpha_one_equal_hand_computation():
    image, text, scale = _features(4), _features(4, seed=1), torch.tensor(10.0)
    m_image, m_text = _features(4, seed=4), _features(4, seed=5)
    queue_image, queue_text = _features(2, seed=2), _features(2, seed=3)
    loss_fn = AlbefLoss(queue_size=2, momentum=0.9)
    loss_fn.dequeue_and_enqueue(queue_image, queue_text)
    itc = loss_fn(image_features=image, text_features=text, logit_scale=scale, momentum_image_features=m_image,
                  momentum_text_features=m_text, alpha=1.0)["itc_loss"]
    target_image = torch.softmax(scale * m_image @ torch.cat([m_text, queue_text]).T, dim=1)
    target_text = torch.softmax(scale * m_text @ torch.cat([m_image, queue_image]).T, dim=1)
    expected = _hand_itc(image, text, scale, torch.cat([text, queue_text]), torch.cat([image, queue_image]),
                         target_image, target_text)
    assert torch.allclose(itc, expected, atol=1e-6)

    # alpha 0.5 without a queue: half soft, half one-hot.
    plain = AlbefLoss()(image_features=image, text_features=text, logit_scale=scale, momentum_image_features=m_image,
                        momentum_text_features=m_text, alpha=0.5)["itc_loss"]
    soft_image = 0.5 * torch.softmax(scale * m_image @ m_text.T, dim=1) + 0.5 * torch.eye(4)
    soft_text = 0.5 * torch.softmax(scale * m_text @ m_image.T, dim=1) + 0.5 * torch.eye(4)
    assert torch.allclose(plain, _hand_itc(image, text, scale, text, image, soft_image, soft_text), atol=1e-6)


def test_itm_and_mlm_terms_and_accuracies():
    itm_logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    itm_labels = torch.tensor([1, 0, 0])
    mlm_logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    mlm_labels = torch.tensor([[-100, 2, -100], [4, -100, -100]])
    out = AlbefLoss(itm_weight=2.0, mlm_weight=0.5)(
        image_features=_features(2), text_features=_features(2, seed=1), logit_scale=torch.tensor(10.0),
        itm_logits=itm_logits, itm_labels=itm_labels, mlm_logits=mlm_logits, mlm_labels=mlm_labels)
    assert set(out) == {"itc_loss", "itm_loss", "itm_accuracy", "mlm_loss", "mlm_accuracy"}
    assert torch.allclose(out["itm_loss"], 2.0 * F.cross_entropy(itm_logits, itm_labels))
    assert out["itm_accuracy"].item() == pytest.approx(2 / 3)
    picked = mlm_logits[[0, 1], [1, 0]]
    assert torch.allclose(out["mlm_loss"], 0.5 * F.cross_entropy(picked, torch.tensor([2, 4])))
    assert out["mlm_accuracy"].item() == pytest.approx(((picked.argmax(1) == torch.tensor([2, 4])).float().mean()))
    assert not out["itm_accuracy"].requires_grad

    # Nothing masked: a zero loss, not NaN, that still reaches the head.
    empty = AlbefLoss()(image_features=_features(2), text_features=_features(2, seed=1),
                        logit_scale=torch.tensor(10.0), mlm_logits=mlm_logits, mlm_labels=torch.full((2, 3), -100))
    assert empty["mlm_loss"].item() == 0.0 and empty["mlm_accuracy"].item() == 0.0
    empty["mlm_loss"].backward()
    assert torch.equal(mlm_logits.grad, torch.zeros_like(mlm_logits))


def test_config_errors():
    with pytest.raises(ValueError, match=r"^loss.queue_size=16 needs loss.momentum \(the queue holds momentum-model "
                                         r"features\); set loss.momentum=0.995 or loss.queue_size=0$"):
        AlbefLoss(queue_size=16)
    with pytest.raises(ValueError, match=r"^loss.momentum must be in \(0, 1\) \(e.g. 0.995\), or null for no "
                                         r"momentum model; got 1.0$"):
        AlbefLoss(momentum=1.0)
    with pytest.raises(ValueError, match=r"^loss.distill_alpha must be in \[0, 1\], got 2.0$"):
        AlbefLoss(distill_alpha=2.0)
    with pytest.raises(ValueError, match=r"^AlbefLoss: alpha > 0 needs momentum_image_features and "
                                         r"momentum_text_features; set loss.momentum \(e.g. 0.995\) to train "
                                         r"with a momentum model$"):
        AlbefLoss()(image_features=_features(2), text_features=_features(2), logit_scale=torch.tensor(1.0), alpha=0.4)


def test_create_loss_from_loss_config_and_alpha_ramp():
    cfg = LossConfig(name="albef", momentum=0.995, queue_size=32)
    kwargs = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("name", "weight", "ssl_weight", "ssl_temperature")}
    loss_fn = create_loss("albef", **kwargs)
    assert isinstance(loss_fn, AlbefLoss) and loss_fn.queue_size == 32 and loss_fn.momentum == 0.995
    assert [distill_alpha_at(s, 0.4, 100) for s in (0, 50, 100, 500)] == pytest.approx([0.0, 0.2, 0.4, 0.4])
    assert distill_alpha_at(0, 0.4, None) == 0.4 and distill_alpha_at(0, 0.4, 0) == 0.4


# ---- 2 processes with global negatives == 1 process ------------------------------------------------
GLOBAL_BATCH, DIM = 8, 8
IMAGE_IDS = torch.tensor([0, 1, 2, 3, 3, 4, 5, 6])          # rows 3 and 4 (ranks 0 and 1) share an image
TEXT_KEYS = torch.tensor([10, 11, 12, 13, 14, 15, 10, 17])  # rows 0 and 6 (ranks 0 and 1) share a caption


def _inputs():
    generator = torch.Generator().manual_seed(7)
    raw = {name: torch.randn(GLOBAL_BATCH, DIM, generator=generator)
           for name in ("image", "text", "m_image", "m_text", "q_image", "q_text")}
    torch.manual_seed(0)
    head = torch.nn.Linear(3 * DIM, 2)  # a stand-in for the fusion encoder + ITM head
    return raw, head


def _step(raw: dict, head: torch.nn.Module, lo: int, hi: int, distill: bool):
    """One rank's (or the single process's) ITC + ITM losses for rows lo:hi, with gradients."""
    image_leaf = raw["image"][lo:hi].clone().requires_grad_()
    text_leaf = raw["text"][lo:hi].clone().requires_grad_()
    image, text = F.normalize(image_leaf, dim=-1), F.normalize(text_leaf, dim=-1)
    scale = torch.tensor(10.0)
    loss_fn = AlbefLoss(queue_size=16 if distill else 0, momentum=0.9 if distill else None)
    kwargs = {}
    if distill:  # a queue filled by an earlier step, then soft targets
        loss_fn.dequeue_and_enqueue(F.normalize(raw["q_image"][lo:hi], dim=-1),
                                    F.normalize(raw["q_text"][lo:hi], dim=-1))
        kwargs = dict(momentum_image_features=F.normalize(raw["m_image"][lo:hi], dim=-1),
                      momentum_text_features=F.normalize(raw["m_text"][lo:hi], dim=-1), alpha=0.4)
    text_for_image, image_for_text = global_hard_negative_pairs(
        image, text, scale, IMAGE_IDS[lo:hi], TEXT_KEYS[lo:hi], generator=torch.Generator().manual_seed(99))
    assert (text_for_image >= 0).all() and (image_for_text >= 0).all()
    all_image, all_text = all_gather_with_grad(image), all_gather_with_grad(text)
    pair_image = torch.cat([image, image, all_image[image_for_text]])
    pair_text = torch.cat([text, all_text[text_for_image], text])
    itm_logits = head(torch.cat([pair_image * pair_text, pair_image, pair_text], dim=1))
    itm_labels = torch.cat([torch.ones(hi - lo), torch.zeros(2 * (hi - lo))]).long()
    losses = loss_fn(image_features=image, text_features=text, logit_scale=scale, itm_logits=itm_logits,
                     itm_labels=itm_labels, **kwargs)
    sum(v for k, v in losses.items() if k.endswith("_loss")).backward()
    return {"itc": losses["itc_loss"].detach(), "itm": losses["itm_loss"].detach(),
            "image_grad": image_leaf.grad, "text_grad": text_leaf.grad,
            "head_grad": torch.cat([p.grad.flatten() for p in head.parameters()]),
            "negatives": torch.cat([text_for_image, image_for_text])}


def _worker(rank: int, world: int) -> dict:
    results = {}
    local = GLOBAL_BATCH // world
    for distill in (False, True):
        raw, head = _inputs()
        out = _step(raw, head, rank * local, (rank + 1) * local, distill)
        # Data-parallel training averages losses and parameter gradients over ranks; feature
        # gradients already hold every rank's contribution (the gather's backward sums them).
        for key in ("itc", "itm", "head_grad"):
            dist.all_reduce(out[key])
            out[key] /= world
        for key in ("image_grad", "text_grad", "negatives"):
            parts = [torch.empty_like(out[key]) for _ in range(world)]
            dist.all_gather(parts, out[key])
            out[key] = torch.stack(parts)
        for key in ("image_grad", "text_grad"):
            out[key] = out[key].flatten(0, 1) / world
        results[distill] = out
    return results


@pytest.mark.slow
def test_two_processes_with_global_negatives_equal_one_process():
    two = spawn_gloo(_worker, 2)
    for distill in (False, True):
        raw, head = _inputs()
        one = _step(raw, head, 0, GLOBAL_BATCH, distill)
        half = GLOBAL_BATCH // 2
        # Each rank sampled the whole global batch with the same seed and kept its own rows.
        negatives = one["negatives"].view(2, GLOBAL_BATCH)
        assert torch.equal(two[distill]["negatives"][:, :half].flatten(), negatives[0]), distill
        assert torch.equal(two[distill]["negatives"][:, half:].flatten(), negatives[1]), distill
        for key in ("itc", "itm", "head_grad", "image_grad", "text_grad"):
            assert torch.allclose(two[distill][key], one[key], atol=1e-5), (distill, key, two[distill][key], one[key])
