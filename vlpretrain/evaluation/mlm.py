"""Masked-token accuracy of a fusion model's MLM head on a captioned corpus: each caption masked by
BERT's rule (seeded, so every run masks the same tokens), read with its own image."""

from __future__ import annotations

from typing import Sequence

import torch


@torch.no_grad()
def masked_token_accuracy(model, corpus, captions: Sequence[str], text_to_image: torch.Tensor,
                          batch_size: int = 64, seed: int = 0, progress: bool = True) -> dict[str, float]:
    """``{"mlm_accuracy", "mlm_masked_tokens"}``: the fraction of masked caption tokens the MLM head
    predicts exactly (argmax), with ``model.fusion.settings.mlm_probability`` of the tokens masked.
    ``captions[i]`` belongs to corpus row ``text_to_image[i]``; undecodable images are skipped.

    Example:
        >>> feats = encode_corpus(model, corpus)
        >>> masked_token_accuracy(model, corpus, feats["captions"], feats["text_to_image"])["mlm_accuracy"]
    """
    from ..progress import progress_bar

    from ..models.fusion_sampling import mask_tokens
    from ..models.tower_tokens import text_features_and_tokens
    from ..inference import corpus_image_loader, eval_mode

    settings = model.fusion.settings
    load_images = corpus_image_loader(corpus, model.preprocess)
    generator = torch.Generator().manual_seed(seed)
    correct, total = 0, 0
    device = next(model.parameters()).device
    with eval_mode(model):
        for start in progress_bar(range(0, len(captions), batch_size), desc="mlm", enabled=progress):
            rows = [int(r) for r in text_to_image[start:start + batch_size]]
            images, ok = load_images(rows)
            tokens = model.tokenizer(list(captions[start:start + batch_size]))
            masked, labels = mask_tokens(tokens, model.mask_token_id, model.special_token_ids, model.vocab_size,
                                         settings.mlm_probability, generator=generator)
            labels[~ok.bool()] = -100
            chosen = labels != -100
            if not chosen.any():
                continue
            image_tokens = model.encode_image_tokens(images.to(device))
            _, hidden, padding = text_features_and_tokens(model.clip, masked.to(device), pooled=False)
            logits = model.fusion.mlm_logits(hidden, padding, image_tokens, positions=chosen.to(device))
            correct += int((logits.argmax(-1).cpu() == labels[chosen]).sum())
            total += int(chosen.sum())
    return {"mlm_accuracy": correct / total if total else float("nan"), "mlm_masked_tokens": total}
