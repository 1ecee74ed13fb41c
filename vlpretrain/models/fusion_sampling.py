"""How the fusion heads' training inputs are drawn: ITM negatives (hard, by similarity, or random; local or
across processes) with false negatives excluded, and the MLM masking rule (15%, 80/10/10, as BERT and ALBEF).

``DualEncoder.forward`` builds the ITM pairs and the masked captions with these, so the model owns them;
the ALBEF loss (:mod:`vlpretrain.losses.albef`) only scores what the model returns.

Example:
    >>> text_for_image, image_for_text = negative_pairs(img_f, txt_f, scale, image_ids, caption_keys(tokens))
    >>> masked, labels = mask_tokens(tokens, mask_id, special_ids, vocab_size, 0.15)
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from ..distributed import all_gather_no_grad, get_rank

__all__ = ["NEGATIVE_MODES", "caption_keys", "false_negative_mask", "sample_hard_negatives", "sample_random_negatives",
           "mask_tokens", "negative_pairs", "global_hard_negative_pairs"]

NEGATIVE_MODES = ("hard", "random")


def false_negative_mask(image_ids: Optional[torch.Tensor], text_keys: Optional[torch.Tensor]) -> torch.Tensor:
    """``(N, N)`` bool: True where item j must never be a negative for item i.

    That is the diagonal (the positive itself), items showing the same image (equal ``image_ids``, e.g.
    several captions of one COCO image) and items with an identical caption (equal ``text_keys``, e.g.
    a hash of each token row). ``None`` for either means "all distinct".

    Example:
        >>> false_negative_mask(torch.tensor([0, 0, 1]), torch.tensor([5, 6, 7]))
        tensor([[ True,  True, False],
                [ True,  True, False],
                [False, False,  True]])
    """
    reference = image_ids if image_ids is not None else text_keys
    if reference is None:
        raise ValueError("false_negative_mask needs image_ids or text_keys (or both)")
    n = reference.shape[0]
    mask = torch.eye(n, dtype=torch.bool, device=reference.device)
    for ids in (image_ids, text_keys):
        if ids is not None:
            ids = ids.reshape(-1)
            if ids.shape[0] != n:
                raise ValueError(f"false_negative_mask: image_ids and text_keys differ in length "
                                 f"({n} vs {ids.shape[0]}); pass one id / key per pair")
            mask |= ids[:, None] == ids[None, :]
    return mask


def _draw(weights: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One multinomial draw per row of non-negative ``weights``; -1 for rows that are all zero."""
    empty = ~(weights > 0).any(dim=1)
    # Draw on the generator's device, so a CPU generator seeded identically on every rank gives
    # identical choices whatever device the features live on.
    device = generator.device if generator is not None else weights.device
    safe = weights.masked_fill(empty[:, None], 1.0).to(device=device, dtype=torch.float32)
    choice = torch.multinomial(safe, 1, generator=generator).squeeze(1).to(weights.device)
    return choice.masked_fill(empty, -1)


def sample_hard_negatives(similarity: torch.Tensor, forbidden: torch.Tensor,
                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per row, one column drawn with probability softmax(similarity) over the allowed columns (ALBEF).

    ``similarity`` is ``(N, M)`` (already scaled, e.g. by the logit scale); ``forbidden`` is ``(N, M)``
    bool (see :func:`false_negative_mask`). Forbidden columns get weight 0, the rest are renormalised.
    A row with no allowed column returns -1: the caller drops that pair.

    Example:
        >>> sim = logit_scale * image_features @ text_features.T
        >>> text_for_image = sample_hard_negatives(sim, false_negative_mask(image_ids, text_keys))
    """
    if similarity.shape != forbidden.shape:
        raise ValueError(f"sample_hard_negatives: similarity {tuple(similarity.shape)} and forbidden "
                         f"{tuple(forbidden.shape)} differ in shape")
    # -inf before the softmax (not zeroing after it), so the allowed entries can't all underflow to 0.
    logits = similarity.detach().float().masked_fill(forbidden, float("-inf"))
    weights = torch.softmax(logits, dim=1).nan_to_num(0.0)  # all -inf rows give NaN: no candidate
    return _draw(weights, generator)


def sample_random_negatives(forbidden: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Per row, one column drawn uniformly among the allowed (not ``forbidden``) ones (FLAVA); -1 if none.

    Example:
        >>> sample_random_negatives(false_negative_mask(torch.arange(4), None))   # never the diagonal
    """
    return _draw((~forbidden).float(), generator)


def mask_tokens(tokens: torch.Tensor, mask_token_id: int, special_token_ids: Iterable[int], vocab_size: int,
                probability: float = 0.15, generator: Optional[torch.Generator] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: each non-special token is chosen with ``probability``; of those 80% become
    ``mask_token_id``, 10% a random non-special token id and 10% stay. Returns ``(masked, labels)``
    with ``labels`` the original id at chosen positions and -100 elsewhere (ignored by the loss).

    ``special_token_ids`` (padding, start / end of text, [CLS], [SEP], the mask token) are never chosen
    and never drawn as random replacements.

    Example:
        >>> masked, labels = mask_tokens(tokens, model.mask_token_id, model.special_token_ids,
        ...                              model.vocab_size, probability=0.15)
    """
    if not 0.0 < probability <= 1.0:
        raise ValueError(f"mask_tokens: probability must be in (0, 1], got {probability}; "
                         f"set model.fusion.mlm_probability to e.g. 0.15")
    special = sorted({int(i) for i in special_token_ids} | {int(mask_token_id)})
    device = generator.device if generator is not None else tokens.device
    ids = tokens.to(device)
    special_t = torch.tensor(special, dtype=ids.dtype, device=device)
    is_special = torch.isin(ids, special_t)

    def coin(p: float) -> torch.Tensor:
        return torch.rand(ids.shape, generator=generator, device=device) < p

    chosen = coin(probability) & ~is_special
    to_mask = chosen & coin(0.8)
    to_random = chosen & ~to_mask & coin(0.5)  # half of the remaining 20%
    # Random replacements come from the non-special ids only.
    allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)
    allowed[special_t[(special_t >= 0) & (special_t < vocab_size)]] = False
    allowed_ids = allowed.nonzero().squeeze(1).to(ids.dtype)
    if allowed_ids.numel() == 0:
        raise ValueError(f"mask_tokens: every id below vocab_size={vocab_size} is special; "
                         f"pass the text tower's vocab_size")
    random_ids = allowed_ids[torch.randint(len(allowed_ids), ids.shape, generator=generator, device=device)]

    masked = torch.where(to_mask, torch.full_like(ids, mask_token_id), ids)
    masked = torch.where(to_random, random_ids, masked)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return masked.to(tokens.device), labels.to(tokens.device)


def negative_pairs(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                   image_ids: Optional[torch.Tensor] = None, text_keys: Optional[torch.Tensor] = None,
                   negatives: str = "hard", generator: Optional[torch.Generator] = None,
                   across_ranks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one negative text per image and one negative image per text for this process's B pairs.

    Returns ``(text_for_image, image_for_text)``, each ``(B,)`` long: indices into the local batch
    (``across_ranks=False``) or into the batch gathered from all processes in rank order
    (``across_ranks=True``, BLIP's ``negative_all_rank``; row i of this rank is global row
    ``rank * B + i``); -1 where no candidate is allowed (drop those pairs). ``negatives`` is
    ``"hard"`` (:func:`sample_hard_negatives` on ``logit_scale * image @ text.T``) or ``"random"``.
    ``image_ids`` / ``text_keys`` (local, ``(B,)``) mark false negatives (:func:`false_negative_mask`).

    With ``across_ranks``, every rank samples the whole global batch and keeps its own rows, so pass a
    ``generator`` seeded identically on every rank (e.g. ``torch.Generator().manual_seed(seed + step)``).

    Example:
        >>> gen = torch.Generator().manual_seed(1234 + step)
        >>> text_for_image, image_for_text = global_hard_negative_pairs(
        ...     out["image_features"], out["text_features"], out["logit_scale"], image_ids, text_keys,
        ...     generator=gen)
        >>> neg_text_tokens = all_gather_with_grad(text_hidden)[text_for_image]
    """
    if negatives not in NEGATIVE_MODES:
        raise ValueError(f"unknown negatives '{negatives}'; set model.fusion.negatives to one of "
                         f"{list(NEGATIVE_MODES)}")
    batch = image_features.shape[0]
    image = image_features.detach().float()
    text = text_features.detach().float()
    if image_ids is None:
        # Distinct per pair and across ranks: the position in the (global) batch.
        image_ids = torch.arange(batch, device=image.device) + (get_rank() * batch if across_ranks else 0)
    if across_ranks:
        image, text = all_gather_no_grad(image), all_gather_no_grad(text)
        image_ids = all_gather_no_grad(image_ids.to(image.device).long())
        if text_keys is not None:
            text_keys = all_gather_no_grad(text_keys.to(image.device).long())
    if text_keys is not None:
        text_keys = text_keys.to(image.device)
    forbidden = false_negative_mask(image_ids.to(image.device), text_keys)
    if negatives == "hard":
        similarity = torch.as_tensor(logit_scale, device=image.device).detach().float() * image @ text.T
        text_for_image = sample_hard_negatives(similarity, forbidden, generator)
        image_for_text = sample_hard_negatives(similarity.T, forbidden.T, generator)
    else:
        text_for_image = sample_random_negatives(forbidden, generator)
        image_for_text = sample_random_negatives(forbidden.T, generator)
    if across_ranks:
        start = get_rank() * batch
        text_for_image, image_for_text = text_for_image[start:start + batch], image_for_text[start:start + batch]
    return text_for_image, image_for_text


def global_hard_negative_pairs(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                               image_ids: Optional[torch.Tensor] = None, text_keys: Optional[torch.Tensor] = None,
                               negatives: str = "hard", generator: Optional[torch.Generator] = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`negative_pairs` over the batch gathered from all processes (``negatives_from: global``).

    Returns global indices (``rank * B + i`` is this rank's row i); index ``all_gather_with_grad(x)``
    with them. Pass a generator seeded identically on every rank.

    Example:
        >>> t4i, i4t = global_hard_negative_pairs(img_f, txt_f, scale, ids, keys,
        ...                                       generator=torch.Generator().manual_seed(seed + step))
    """
    return negative_pairs(image_features, text_features, logit_scale, image_ids, text_keys,
                          negatives=negatives, generator=generator, across_ranks=True)


def caption_keys(tokens: torch.Tensor) -> torch.Tensor:
    """(B,) int64 hash of each token row: equal captions get equal keys, on every process (fixed weights)."""
    weights = torch.randint(1, 2 ** 31 - 1, (tokens.shape[1],), generator=torch.Generator().manual_seed(17))
    # Integer overflow wraps around, which is harmless for a hash.
    return (tokens.long() * weights.to(tokens.device)).sum(1)
