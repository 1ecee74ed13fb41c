"""Encode a corpus with a dual encoder: every image once, every caption of every image."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


class _EvalImages(Dataset):
    def __init__(self, corpus: Any, transform):
        self.corpus, self.transform = corpus, transform

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, index: int):
        from ..data.images import BadImageError, load_rgb

        row = self.corpus[index]
        try:
            return self.transform(load_rgb(row.image)), True
        except BadImageError:
            # Keep the row so captions stay aligned; it is counted and never retrieved correctly.
            return None, False


def _collate(batch):
    images = [b[0] for b in batch]
    ok = torch.tensor([b[1] for b in batch])
    if not ok.any():
        return None, ok
    template = next(img for img in images if img is not None)
    return torch.stack([img if img is not None else torch.zeros_like(template) for img in images]), ok


@torch.no_grad()
def encode_corpus(model, corpus: Any, batch_size: int = 256, device: Optional[torch.device] = None,
                  num_workers: int = 0, progress: bool = True) -> dict[str, Any]:
    """Normalized features for all images and all captions of ``corpus``.

    Returns ``image_features`` (N, D), ``text_features`` (M, D), ``text_to_image`` (M,) and
    ``bad_images`` (indices that failed to load; their features are zero).

    Example:
        >>> feats = encode_corpus(model, open_corpus("data/test.csv"))
        >>> retrieval_metrics(feats["image_features"], feats["text_features"], feats["text_to_image"])
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    loader = DataLoader(_EvalImages(corpus, model.preprocess), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate)
    image_chunks, bad = [], []
    offset = 0
    for images, ok in tqdm(loader, desc="encode images", disable=not progress, leave=False):
        n = ok.shape[0]
        feats = torch.zeros(n, model.embed_dim)
        if images is not None:
            feats = model.encode_image(images.to(device)).float().cpu()
            feats[~ok] = 0
        bad.extend((offset + torch.nonzero(~ok).flatten()).tolist())
        image_chunks.append(feats)
        offset += n
    captions, text_to_image = [], []
    for index in range(len(corpus)):
        row_captions = corpus[index].captions
        captions.extend(row_captions)
        text_to_image.extend([index] * len(row_captions))
    text_chunks = []
    for start in tqdm(range(0, len(captions), batch_size), desc="encode texts", disable=not progress, leave=False):
        tokens = model.tokenizer(captions[start:start + batch_size]).to(device)
        text_chunks.append(model.encode_text(tokens).float().cpu())
    model.train(was_training)
    return {
        "image_features": torch.cat(image_chunks) if image_chunks else torch.zeros(0, model.embed_dim),
        "text_features": torch.cat(text_chunks) if text_chunks else torch.zeros(0, model.embed_dim),
        "text_to_image": torch.tensor(text_to_image, dtype=torch.long),
        "captions": captions,
        "bad_images": bad,
    }
