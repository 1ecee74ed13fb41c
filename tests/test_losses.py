"""The contrastive loss: equal to open_clip's ClipLoss, and equal across 1 and 2 processes."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.distributed as dist

from vlpretrain.losses import ContrastiveLoss, create_loss
from vlpretrain.models import build_model

from helpers import spawn_gloo, tiny_model_config

GLOBAL_BATCH = 8


def test_equals_open_clip_clip_loss():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(12, 32), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(12, 32), dim=-1)
    scale = torch.tensor(1 / 0.07)
    ours = ContrastiveLoss()(image_features=image, text_features=text, logit_scale=scale)
    reference = open_clip.ClipLoss()(image, text, scale)
    assert set(ours) == {"contrastive_loss"}
    assert torch.allclose(ours["contrastive_loss"], reference, atol=1e-6)


def test_chance_level_for_identical_features():
    # With every embedding equal, each row's softmax is uniform: the loss is log N, not zero.
    image = torch.nn.functional.normalize(torch.ones(10, 8), dim=-1)
    loss = ContrastiveLoss()(image_features=image, text_features=image, logit_scale=torch.tensor(10.0))
    assert loss["contrastive_loss"].item() == pytest.approx(math.log(10), rel=1e-5)


def test_unknown_loss_name_suggests():
    with pytest.raises(ValueError, match="unknown loss 'contrastiv' \\(did you mean 'contrastive'\\?\\)"):
        create_loss("contrastiv")


def _batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator)
    tokens = torch.randint(1, 400, (GLOBAL_BATCH, 16), generator=generator)
    tokens[:, -1] = 49407  # an end-of-text token, where the text tower pools
    return images, tokens


def _loss_and_grads(images, tokens):
    torch.manual_seed(0)
    model = build_model(tiny_model_config())
    loss = ContrastiveLoss()(**model(images, tokens))["contrastive_loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _worker(rank: int, world: int) -> dict:
    images, tokens = _batch()
    local = GLOBAL_BATCH // world
    loss, grads = _loss_and_grads(images[rank * local:(rank + 1) * local], tokens[rank * local:(rank + 1) * local])
    # Data-parallel training averages gradients (and reported losses) over ranks, as DDP does.
    dist.all_reduce(loss)
    loss /= world
    for g in grads.values():
        dist.all_reduce(g)
        g /= world
    return {"loss": loss, "grads": grads}


@pytest.mark.slow
def test_two_processes_equal_one_process_on_concatenated_batch():
    two = spawn_gloo(_worker, 2)
    loss, grads = _loss_and_grads(*_batch())
    assert torch.allclose(two["loss"], loss, atol=1e-5), (two["loss"], loss)
    assert set(two["grads"]) == set(grads) and len(grads) > 10
    for name, grad in grads.items():
        assert torch.allclose(two["grads"][name], grad, atol=1e-5), name
