"""The one batched encoding path: images and texts to unit-norm features, and ITM pair scores.

Zero-shot classification, linear probe, k-NN, retrieval evaluation, bias probes, embedding export,
index search and the trainer's validation all encode through here, so each rule is kept once:

- the model runs in eval mode without gradients, and gets its previous mode back afterwards (a
  training loop can validate mid-epoch);
- features are normalized in float32 (a half-precision model's features are upcast first) and
  returned on the CPU; inputs are moved to the model's device and cast to its dtype;
- an image may be a path, encoded bytes, a PIL image, a preprocessed tensor or a corpus row;
  undecodable images either raise :class:`~vlpretrain.data.images.BadImageError` naming the file
  (``on_bad_image="raise"``) or become zero rows flagged in ``ok`` and counted
  (``on_bad_image="zero"``), so captions stay aligned with their images;
- long jobs show a progress bar;
- forwards run in the precision :func:`inference_precision` sets (fp32 unless a command asks for bf16 / fp16).

Example:
    >>> from vlpretrain.inference import encode_images, encode_texts
    >>> image_features = encode_images(model, ["cat.jpg", "dog.png"])      # (2, D), unit norm
    >>> text_features = encode_texts(model, ["a cat", "a dog"])
    >>> (image_features @ text_features.T).argmax(1)
    tensor([0, 1])
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .inference_precision import PRECISIONS, current_precision, inference_precision, precision_autocast
from .progress import progress_bar

__all__ = [
    "eval_mode", "encode_images", "encode_texts", "encode_image_rows", "encode_corpus", "image_feature_batches",
    "ImageItems", "collate_images", "load_image", "EncodedImages",
    "itm_pair_scores", "itm_rerank", "combined_scores", "model_logit_scale", "corpus_image_loader",
    "RERANK_SCORES", "BAD_IMAGE_SCORE", "PRECISIONS", "inference_precision", "current_precision",
]

ImagesLike = Union[torch.Tensor, Any, Sequence[Any], Iterable[Any]]
DeviceLike = Optional[Union[str, torch.device]]

# Score of a pair whose image could not be loaded: below every probability, so it sinks.
BAD_IMAGE_SCORE = -1.0
# How a re-ranker may order candidates: the ITM match probability alone (ALBEF), or that probability
# times the contrastive softmax (see combined_scores).
RERANK_SCORES = ("itm", "itm+itc")


# ----------------------------------------------------------------------------- mode and device


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode (no dropout, frozen batch-norm statistics), no gradients and the :func:`inference_precision`
    in force; the caller's mode back after.

    Example:
        >>> with eval_mode(model):
        ...     features = model.encode_image(batch)
        >>> model.training          # unchanged when the block exits, even on an error
        True
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), precision_autocast(model):
            yield model
    finally:
        model.train(was_training)


def _device_and_dtype(model: torch.nn.Module, device: DeviceLike) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return (torch.device(device) if device is not None else param.device), param.dtype


# ----------------------------------------------------------------------------- texts


def encode_texts(model, texts: Sequence[str], batch_size: int = 256, device: DeviceLike = None,
                 progress: bool = False, desc: str = "encode texts") -> torch.Tensor:
    """(M, D) unit-norm float32 text features on CPU, ``batch_size`` texts per forward.

    Example:
        >>> encode_texts(model, ["a red heart", "a frog"]).shape
        torch.Size([2, 256])
    """
    texts = list(texts)
    device, _ = _device_and_dtype(model, device)
    chunks = []
    starts = range(0, len(texts), batch_size)
    with eval_mode(model):
        for start in progress_bar(starts, desc=desc, enabled=progress and len(starts) > 1, leave=False):
            tokens = model.tokenizer(texts[start:start + batch_size]).to(device)
            chunks.append(F.normalize(model.encode_text(tokens, normalize=False).float(), dim=-1).cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, model.embed_dim)


# ----------------------------------------------------------------------------- images


def _is_single_image(x: Any) -> bool:
    from PIL import Image

    return isinstance(x, (Image.Image, str, bytes, bytearray, os.PathLike))


def load_image(preprocess: Callable, item: Any) -> torch.Tensor:
    """One preprocessed image from a path, encoded bytes, a PIL image, a corpus row (its ``.image``) or a
    tensor (returned as it is).

    Raises:
        vlpretrain.data.BadImageError: the image cannot be decoded (the message names it).

    Example:
        >>> load_image(model.preprocess, "cat.jpg").shape
        torch.Size([3, 64, 64])
    """
    from .data.images import load_rgb

    if hasattr(item, "image") and not _is_single_image(item):
        item = item.image  # a CorpusRow
    if isinstance(item, torch.Tensor):
        return item
    return preprocess(load_rgb(item))


class ImageItems(Dataset):
    """Preprocessed images of a sequence (a list, a corpus, a tensor), for a ``DataLoader``.

    Each item is ``{"index", "image", "error", **describe(index, item)}``. With ``on_bad_image="zero"``
    an undecodable image gives ``image=None`` and its error message; with ``"raise"`` it raises.
    ``decode=False`` skips decoding (``image=None``, no error): metadata only.

    Example:
        >>> loader = DataLoader(ImageItems(corpus, model.preprocess), batch_size=64, collate_fn=collate_images)
    """

    def __init__(self, items: Any, preprocess: Callable, on_bad_image: str = "raise", decode: bool = True,
                 describe: Optional[Callable[[int, Any], dict[str, Any]]] = None):
        if on_bad_image not in ("raise", "zero"):
            raise ValueError(f"on_bad_image must be 'raise' or 'zero', got {on_bad_image!r}")
        self.items, self.preprocess, self.on_bad_image = items, preprocess, on_bad_image
        self.decode, self.describe = decode, describe

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.load(index, self.items[index])

    def load(self, index: int, item: Any) -> dict[str, Any]:
        from .data.images import BadImageError

        image, error = None, None
        if self.decode:
            try:
                image = load_image(self.preprocess, item)
            except BadImageError as e:
                if self.on_bad_image == "raise":
                    raise
                error = str(e)  # the row is kept (zero vector, ok=False) so captions stay aligned
        extra = self.describe(index, item) if self.describe is not None else {}
        return {"index": index, "image": image, "error": error, **extra}


class _StreamedImageItems(IterableDataset):
    """:class:`ImageItems` over an iterable without ``len`` / ``[]`` (a generator): read once, in order."""

    def __init__(self, items: Iterable[Any], loader: ImageItems):
        self.items, self.loader = items, loader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index, item in enumerate(self.items):
            yield self.loader.load(index, item)


def collate_images(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch of :class:`ImageItems` items: every key as a list, ``images`` stacked (zeros where an image
    failed; None when none decoded) and ``ok`` (B,) bool (False where decoding failed).

    Example:
        >>> batch = collate_images([items[0], items[1]])
        >>> batch["images"].shape, batch["ok"]
        (torch.Size([2, 3, 64, 64]), tensor([True, False]))
    """
    batch = {key: [item[key] for item in items] for key in items[0]}
    batch["ok"] = torch.tensor([item["error"] is None for item in items], dtype=torch.bool)
    decoded = [item["image"] for item in items if item["image"] is not None]
    batch["images"] = None
    if decoded:
        batch["images"] = torch.stack([item["image"] if item["image"] is not None else torch.zeros_like(decoded[0])
                                       for item in items])
    return batch


def _image_dataset(images: ImagesLike, preprocess: Callable, on_bad_image: str, decode: bool,
                   describe: Optional[Callable]) -> Dataset:
    if getattr(images, "yields_image_items", False):  # already ImageItems.load items (shard_feature_batches)
        return images
    if isinstance(images, torch.Tensor):
        if not images.is_floating_point():
            raise TypeError(f"image tensor must be float and already preprocessed (model.preprocess), got {images.dtype}")
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4:
            raise ValueError(f"image tensor must be (N, 3, H, W) or (3, H, W), got shape {tuple(images.shape)}")
    elif _is_single_image(images):
        images = [images]
    loader = ImageItems(images, preprocess, on_bad_image, decode, describe)
    # Index when possible: corpora support len() and [] but need not be iterable.
    if hasattr(images, "__len__") and hasattr(images, "__getitem__"):
        return loader
    return _StreamedImageItems(images, loader)


def image_feature_batches(model, images: ImagesLike, batch_size: int = 256, device: DeviceLike = None,
                          num_workers: int = 0, progress: bool = False, on_bad_image: str = "raise",
                          decode: bool = True, describe: Optional[Callable[[int, Any], dict[str, Any]]] = None,
                          batch_sampler: Optional[Iterable[list[int]]] = None,
                          desc: str = "encode images") -> Iterator[dict[str, Any]]:
    """Batches of :func:`collate_images` with ``features`` added: (B, D) unit-norm float32 on CPU, zero
    rows where ``ok`` is False (or every row zero when ``decode=False``).

    The model is in eval mode without gradients while the generator runs. ``batch_sampler`` (lists of
    indices) replaces ``batch_size`` batching, e.g. to keep batches inside export shards.

    Example:
        >>> for batch in image_feature_batches(model, corpus, on_bad_image="zero", num_workers=2):
        ...     save(batch["features"], batch["ok"], batch["index"])
    """
    device, dtype = _device_and_dtype(model, device)
    dataset = _image_dataset(images, model.preprocess, on_bad_image, decode, describe)
    if batch_sampler is not None:
        batch_sampler = list(batch_sampler)
        total = sum(len(b) for b in batch_sampler)
        loader = DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate_images)
    else:
        total = len(dataset) if hasattr(dataset, "__len__") else None
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_images)
    bar = progress_bar(total=total, desc=desc, unit="img", leave=False,
                       enabled=progress and (total is None or total > batch_size))
    try:
        for batch in loader:
            with eval_mode(model):
                features = torch.zeros(len(batch["ok"]), model.embed_dim)
                if batch["images"] is not None:
                    encoded = model.encode_image(batch["images"].to(device=device, dtype=dtype), normalize=False)
                    features = F.normalize(encoded.float(), dim=-1).cpu()
                    features[~batch["ok"]] = 0
            batch["features"] = features
            bar.update(len(batch["ok"]))
            yield batch
    finally:
        bar.close()


def encode_images(model, images: ImagesLike, batch_size: int = 256, device: DeviceLike = None,
                  num_workers: int = 0, progress: bool = True) -> torch.Tensor:
    """(N, D) unit-norm float32 image features on CPU, in input order.

    ``images`` is a float tensor already preprocessed ((N, 3, H, W), or one (3, H, W) image), a
    PIL image or path, or any sequence / iterable (a list, an ``ImageCaptionCorpus``) whose items
    are PIL images, paths, encoded bytes or rows with an ``.image`` attribute. Files are decoded
    with :func:`vlpretrain.data.load_rgb` and ``model.preprocess``.

    Raises:
        vlpretrain.data.BadImageError: an image cannot be read (the message names it).

    Example:
        >>> encode_images(model, ["a.png", "b.jpg"]).shape
        torch.Size([2, 16])
    """
    chunks = [batch["features"] for batch in image_feature_batches(
        model, images, batch_size, device, num_workers, progress, on_bad_image="raise")]
    return torch.cat(chunks) if chunks else torch.zeros(0, model.embed_dim)


class EncodedImages(NamedTuple):
    """Features of images that may fail to decode: ``features`` (N, D), zero rows where ``ok`` (N,) is
    False; ``errors`` holds each failed image's message (None where it loaded)."""

    features: torch.Tensor
    ok: torch.Tensor
    errors: list[Optional[str]]

    @property
    def bad_indices(self) -> list[int]:
        return torch.nonzero(~self.ok).flatten().tolist()


def encode_image_rows(model, images: ImagesLike, batch_size: int = 256, device: DeviceLike = None,
                      num_workers: int = 0, progress: bool = True) -> EncodedImages:
    """Like :func:`encode_images`, but an undecodable image gives a zero row flagged in ``ok`` instead of
    an error, so the rows stay aligned with their captions.

    Example:
        >>> encoded = encode_image_rows(model, corpus)
        >>> encoded.features.shape, encoded.bad_indices
        (torch.Size([380, 256]), [])
    """
    features, ok, errors = [], [], []
    for batch in image_feature_batches(model, images, batch_size, device, num_workers, progress, on_bad_image="zero"):
        features.append(batch["features"])
        ok.append(batch["ok"])
        errors.extend(batch["error"])
    if not features:
        return EncodedImages(torch.zeros(0, model.embed_dim), torch.zeros(0, dtype=torch.bool), [])
    return EncodedImages(torch.cat(features), torch.cat(ok), errors)


def encode_corpus(model, corpus: Any, batch_size: int = 256, device: DeviceLike = None, num_workers: int = 0,
                  progress: bool = True) -> dict[str, Any]:
    """Normalized features for all images and all captions of ``corpus``.

    Returns ``image_features`` (N, D), ``text_features`` (M, D), ``text_to_image`` (M,), ``captions``
    (M strings) and ``bad_images`` (indices that failed to load; their features are zero). Shards
    (a :class:`~vlpretrain.data.shard_corpus.ShardCorpus`) are streamed: ``captions`` is None there and
    ``skipped`` names the bad samples.

    Example:
        >>> feats = encode_corpus(model, open_corpus("data/test.csv"))
        >>> retrieval_metrics(feats["image_features"], feats["text_features"], feats["text_to_image"])
    """
    from .data.shard_corpus import ShardCorpus

    if isinstance(corpus, ShardCorpus):  # streamed, never listed: see inference_shards
        from .inference_shards import encode_shard_corpus

        return encode_shard_corpus(model, corpus, batch_size, num_workers, progress)
    images = encode_image_rows(model, corpus, batch_size, device, num_workers, progress)
    captions, text_to_image = [], []
    for index in range(len(corpus)):
        row_captions = corpus[index].captions
        captions.extend(row_captions)
        text_to_image.extend([index] * len(row_captions))
    return {
        "image_features": images.features,
        "text_features": encode_texts(model, captions, batch_size, device, progress),
        "text_to_image": torch.tensor(text_to_image, dtype=torch.long),
        "captions": captions,
        "bad_images": images.bad_indices,
    }


# ----------------------------------------------------------------------------- ITM pair scores


ImageSource = Union[torch.Tensor, Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]]
TextsLike = Union[torch.Tensor, Sequence[str]]


def corpus_image_loader(corpus: Any, transform: Callable) -> Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]:
    """A loader for :func:`itm_pair_scores`: rows of ``corpus`` (or any sequence of images) as
    preprocessed images, undecodable ones as zeros flagged in ``ok``.

    Example:
        >>> images, ok = corpus_image_loader(corpus, model.preprocess)([0, 5])
    """
    dataset = ImageItems(corpus, transform, on_bad_image="zero")

    def load(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = collate_images([dataset[i] for i in indices])
        images = batch["images"]
        if images is None:  # nothing decodable: any image size will do, every pair scores BAD_IMAGE_SCORE
            size = _image_size(transform)
            images = torch.zeros(len(indices), 3, size, size)
        return images, batch["ok"]

    return load


def _image_size(transform: Callable, default: int = 224) -> int:
    for step in getattr(transform, "transforms", []):
        size = getattr(step, "size", None)
        if isinstance(size, int):
            return size
        if isinstance(size, (tuple, list)) and size:
            return int(size[0])
    return default


def _image_tokens(model, images: ImageSource, indices: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Image tokens of ``indices`` and a bool mask of the images that loaded."""
    if callable(images) and not isinstance(images, torch.Tensor):
        batch, ok = images(indices)
    else:
        batch, ok = images[indices], torch.ones(len(indices), dtype=torch.bool)
    batch = batch.to(device)
    if batch.ndim == 4:  # preprocessed images: encoded here, once per image
        batch = model.encode_image_tokens(batch)
    return batch, ok.bool()


def itm_pair_scores(model, images: ImageSource, texts: TextsLike, pairs: torch.Tensor, batch_size: int = 64,
                    progress: bool = False) -> torch.Tensor:
    """ITM match probability of each ``(image index, text index)`` row of ``pairs`` (P, 2) -> (P,).

    ``images``: image tokens (N, L, D), preprocessed images (N, 3, H, W), or a function mapping a list
    of image indices to ``(images (n, 3, H, W), ok (n,) bool)`` (loads lazily, e.g.
    :func:`corpus_image_loader`; pairs with a failed image score ``BAD_IMAGE_SCORE``). ``texts``: token
    ids (M, T) or M strings. Each image is encoded once.

    Example:
        >>> itm_pair_scores(model, images, ["a red heart", "a frog"], torch.tensor([[0, 0], [0, 1]]))
    """
    device = next(model.parameters()).device
    pairs = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2)
    scores = torch.full((len(pairs),), BAD_IMAGE_SCORE)
    if len(pairs) == 0:
        return scores
    with eval_mode(model):
        order = torch.argsort(pairs[:, 0], stable=True)
        unique_images = torch.unique(pairs[:, 0]).tolist()
        chunks = [unique_images[i:i + batch_size] for i in range(0, len(unique_images), batch_size)]
        for chunk in progress_bar(chunks, desc="ITM re-ranking", enabled=progress, leave=False):
            tokens, ok = _image_tokens(model, images, chunk, device)
            where = {image: row for row, image in enumerate(chunk)}
            in_chunk = order[torch.isin(pairs[order, 0], torch.tensor(chunk))]
            for start in range(0, len(in_chunk), batch_size):
                ids = in_chunk[start:start + batch_size]
                rows = torch.tensor([where[int(i)] for i in pairs[ids, 0]])
                text_ids = pairs[ids, 1]
                if isinstance(texts, torch.Tensor):
                    text_tokens = texts[text_ids]
                else:
                    text_tokens = model.tokenizer([texts[int(j)] for j in text_ids])
                value = model.itm_scores(tokens[rows.to(device)], text_tokens.to(device)).float().cpu()
                scores[ids] = torch.where(ok[rows], value, torch.full_like(value, BAD_IMAGE_SCORE))
    return scores


def itm_rerank(model, image_tokens_or_images: ImageSource, texts: TextsLike, candidates: torch.Tensor,
               query: str = "text", batch_size: int = 64, progress: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-sort each query's candidates by ITM score, best first (ties keep the given order).

    ``query="text"``: row q of ``candidates`` (Q, K) holds image indices for caption ``texts[q]``;
    ``query="image"``: it holds text indices for image q. Returns ``(order, scores)``, both (Q, K):
    the candidates re-sorted and their ITM match probabilities.

    Example:
        >>> top = (text_features @ image_features.T).topk(16).indices      # (Q, 16) by embedding
        >>> reranked, scores = itm_rerank(model, images, captions, top)
    """
    if query not in ("text", "image"):
        raise ValueError(f"itm_rerank: query must be 'text' or 'image', got {query!r}")
    candidates = torch.as_tensor(candidates, dtype=torch.long)
    queries = torch.arange(candidates.shape[0])[:, None].expand_as(candidates)
    if query == "text":
        pairs = torch.stack([candidates.reshape(-1), queries.reshape(-1)], 1)
    else:
        pairs = torch.stack([queries.reshape(-1), candidates.reshape(-1)], 1)
    scores = itm_pair_scores(model, image_tokens_or_images, texts, pairs, batch_size, progress).view_as(candidates)
    scores, position = scores.sort(dim=1, descending=True, stable=True)
    return candidates.gather(1, position), scores


def combined_scores(itm_probability: torch.Tensor, similarity: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """``log p_itm(match) + logit_scale * cosine``: the product of the ITM head's match probability and
    the contrastive softmax over the candidates (its normaliser is the same for every candidate of one
    query, so it drops out of the ranking). A confident ITM head overrides the embedding order; one
    near its prior leaves it almost unchanged. Pairs with an unreadable image (``BAD_IMAGE_SCORE``) sink.

    Example:
        >>> combined_scores(torch.tensor([0.9, 0.5]), torch.tensor([0.20, 0.25]), logit_scale=20.0)
        tensor([3.8946, 4.3069])
    """
    bad = itm_probability < 0
    value = torch.log(itm_probability.clamp_min(1e-12)) + float(logit_scale) * similarity
    return value.masked_fill(bad, float("-inf"))


def model_logit_scale(model) -> float:
    """The contrastive temperature's inverse (``exp(logit_scale)``) a model scores with.

    Example:
        >>> model_logit_scale(model)     # 1 / 0.07 at initialisation
        14.285...
    """
    scale = getattr(model, "logit_scale", None)
    if scale is None:
        raise ValueError("itm+itc re-ranking needs the model's contrastive logit_scale; this model has none")
    return float(torch.as_tensor(scale).detach().float().exp())
