"""Rank / world helpers and an all-gather that carries gradients.

``accelerator.gather()`` detaches, which would drop the gradient of every negative that lives on
another rank: contrastive losses call :func:`all_gather_with_grad` instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) along dim 0 over all ranks, keeping autograd.

    The backward pass sums the incoming gradients over ranks and hands each rank the slice of its
    own rows (a reduce-scatter), so each rank's local loss sends gradient to every rank's features.
    """
    world = get_world_size()
    if world == 1:
        return tensor
    from torch.distributed._functional_collectives import all_gather_tensor_autograd

    return all_gather_tensor_autograd(tensor.contiguous(), gather_dim=0, group=dist.group.WORLD)


@torch.no_grad()
def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All-gather without gradient (for metrics and momentum queues)."""
    world = get_world_size()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)
