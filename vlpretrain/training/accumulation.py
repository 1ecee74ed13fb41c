"""Feature-cache gradient accumulation (``train.accum_freq: K``): one optimizer step over K micro-batches
whose loss sees all K x B pairs as negatives, at the memory of one micro-batch's graph.

Plain gradient accumulation would sum K losses over B pairs each, so every row would see only B - 1
negatives. Here (open_clip's ``--accum-freq``; GradCache, Gao et al. 2021, caches the feature gradients
instead) the K micro-batches are first encoded without gradients and their features kept; then each
micro-batch j is encoded again with gradients and the loss is taken over all K micro-batches' features,
micro-batch j's fresh ones in place of its cached ones, and backpropagated. Summed over j, the gradients
of the towers are those of one batch of K x B; across processes the loss's own all-gather adds the
other processes' K x B rows, as it does without accumulation.

Two details make the sum exact, beyond open_clip's version:

- each micro-batch's random state (dropout, patch dropout) is saved before its first forward and
  restored before its second, so the recomputed features are the cached ones;
- the logit scale and bias enter each of the K losses, so their gradient would count K times; each
  loss sees them with 1/K of the gradient (same value), so they get exactly the big batch's gradient.

Example:
    >>> for batches in grouped(loader, cfg.train.accum_freq):
    ...     loss, terms = accumulate_gradients(forward, loss_fn, batches, total=weighted_sum)
    ...     optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, ContextManager, Iterable, Iterator, Optional

import torch

from ..config import ConfigError, RecipeConfig
from .profiling import phase

logger = logging.getLogger("vlpretrain.train")

# Per-sample outputs of the model: cached, then concatenated over the K micro-batches.
PER_SAMPLE = ("image_features", "text_features")
# Shared outputs (one value for the whole batch): taken fresh from each gradient forward.
SHARED = ("logit_scale", "logit_bias")


def check_accumulation(cfg: RecipeConfig) -> None:
    """Refuse ``train.accum_freq > 1`` with an objective that needs the whole batch in one forward.

    Example:
        >>> cfg.train.accum_freq, cfg.loss.name = 2, "albef"
        >>> check_accumulation(cfg)
        Traceback (most recent call last):
        ConfigError: train.accum_freq > 1 is not available with loss.name=albef (...); use accum_freq: 1
    """
    if cfg.train.accum_freq > 1 and cfg.loss.name == "albef":
        raise ConfigError("train.accum_freq > 1 is not available with loss.name=albef (its ITM hard negatives "
                          "and momentum queue need the whole batch in one forward); use accum_freq: 1")
    if cfg.train.accum_freq > 1 and cfg.loss.name in ("slip", "milnce"):
        raise ConfigError(f"train.accum_freq > 1 is not available with loss.name={cfg.loss.name} (its second image "
                          f"views / caption bags are not cached across micro-batches); use accum_freq: 1")


def optimizer_steps(micro_batches: int, accum_freq: int) -> int:
    """Optimizer steps in an epoch of ``micro_batches`` loader batches per process; the last
    ``micro_batches % accum_freq`` of each epoch (an incomplete group) are not trained on.

    Example:
        >>> optimizer_steps(7, 2)
        3
    """
    steps = micro_batches // accum_freq
    if steps == 0:
        raise ValueError(f"train.accum_freq: {accum_freq} micro-batches make one optimizer step, but an epoch "
                         f"holds only {micro_batches} per process: lower train.accum_freq or train.batch_size")
    if micro_batches % accum_freq:
        logger.info("train.accum_freq=%d: the last %d of the %d micro-batches of each epoch (an incomplete "
                    "step) are not trained on", accum_freq, micro_batches % accum_freq, micro_batches)
    return steps


def grouped(batches: Iterable[dict], k: int) -> Iterator[list[dict]]:
    """Consecutive groups of ``k`` batches, each yielded as soon as its last batch arrives (with ``k=1``
    each batch alone, fetched exactly when it was without grouping); an incomplete last group is dropped.

    Example:
        >>> [len(g) for g in grouped(range(7), 3)]
        [3, 3]
    """
    group: list[dict] = []
    for batch in batches:
        group.append(batch)
        if len(group) == k:
            yield group
            group = []


def accumulate_gradients(forward: Callable[[dict], dict], loss_fn: Callable[..., dict], batches: list[dict],
                         total: Callable[[dict], torch.Tensor],
                         backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
                         no_sync: Callable[[], ContextManager] = contextlib.nullcontext,
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Add to the parameters' ``.grad`` the gradient of ``total(loss_fn(...))`` over the concatenation of
    ``batches`` (K micro-batches), computed one micro-batch graph at a time; the optimizer step is the
    caller's. ``forward(batch)`` returns the model's output dict; ``backward`` is e.g. Accelerate's
    (loss scaling); ``no_sync()`` is entered around all but the last micro-batch's forward and backward
    (DDP then reduces the gradients once, at the last one).

    Returns the loss and its terms, averaged over the K losses (each is the loss of the whole K x B batch),
    detached. Torch's random state ends as after K plain forwards.

    Example:
        >>> loss, terms = accumulate_gradients(lambda b: model(b["image"], b["tokens"]), ContrastiveLoss(),
        ...                                    [batch_a, batch_b], total=lambda t: t["contrastive_loss"])
    """
    k = len(batches)
    states, cached = [], {key: [] for key in PER_SAMPLE}
    with torch.no_grad(), phase("forward"):
        for batch in batches:
            states.append(rng_state())
            out = forward(batch)
            for key in PER_SAMPLE:
                cached[key].append(out[key].detach())
    end_state = rng_state()
    losses, terms_list = [], []
    for j, batch in enumerate(batches):
        restore_rng(states[j])  # the same dropout / patch-dropout draws as the cached forward
        with no_sync() if j < k - 1 else contextlib.nullcontext():
            with phase("forward"):
                out = forward(batch)
                inputs = {key: torch.cat(cached[key][:j] + [out[key]] + cached[key][j + 1:]) for key in PER_SAMPLE}
                inputs.update({key: _one_kth_gradient(out[key], k) for key in SHARED if out.get(key) is not None})
                terms = loss_fn(**inputs)
                loss = total(terms)
            with phase("backward"):
                backward(loss)
        losses.append(loss.detach())
        terms_list.append({name: value.detach() for name, value in terms.items()})
        del out, inputs, terms, loss  # free micro-batch j's graph before the next one is built
    restore_rng(end_state)
    mean_terms = {name: torch.stack([t[name] for t in terms_list]).mean() for name in terms_list[-1]}
    return torch.stack(losses).mean(), mean_terms


def _one_kth_gradient(value: torch.Tensor, k: int) -> torch.Tensor:
    """``value`` unchanged (bit for bit), with 1/k of the gradient flowing back through it: each of the
    K losses then adds 1/K of the big batch's gradient to the logit scale / bias, K losses add all of it."""
    return value.detach() + (value - value.detach()) / k


def rng_state() -> tuple[torch.Tensor, Optional[list[torch.Tensor]]]:
    """Torch's global random state: the CPU generator's and, once CUDA is in use, every GPU's.

    Example: ``state = rng_state(); ...; restore_rng(state)``
    """
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def restore_rng(state: tuple[torch.Tensor, Optional[list[torch.Tensor]]]) -> None:
    """Set torch's global random state back to what :func:`rng_state` returned.

    Example: ``restore_rng(state)``
    """
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
