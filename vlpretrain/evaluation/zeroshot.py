"""Zero-shot image classification with a dual encoder: class names + prompts -> a linear classifier.

Each class is represented by the mean of the unit-norm text embeddings of its prompts, renormalized
(OpenAI's prompt ensembling, as ``open_clip.build_zero_shot_classifier``); an image is scored by
``100 * image_features @ weights``, the fixed logit scale of CLIP's and open_clip's zero-shot eval.

Example:
    >>> clf = ZeroShotClassifier(model, ["cat", "dog", "red heart"], templates="openai_imagenet_7")
    >>> labels, scores = clf.predict(["pet.jpg", "heart.png"])
    >>> labels
    ['cat', 'red heart']
"""

from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..inference import ImagesLike, encode_images, encode_texts
from .templates import TemplateSpec, load_templates, render_template

__all__ = ["ZeroShotClassifier", "ZEROSHOT_LOGIT_SCALE"]

# CLIP's zero-shot eval multiplies cosine similarities by 100 (its clamped maximum logit scale), not
# by the model's learned scale, so numbers are comparable across checkpoints; open_clip does the same.
ZEROSHOT_LOGIT_SCALE = 100.0


class ZeroShotClassifier:
    """A zero-shot classifier over ``classnames``, built once from a dual encoder and prompt templates.

    Args:
        model: a :class:`~vlpretrain.models.DualEncoder` (anything with ``encode_image``,
            ``encode_text``, ``tokenizer`` and ``preprocess``).
        classnames: the labels, in class-index order.
        templates: anything :func:`~vlpretrain.evaluation.templates.load_templates` accepts: a set
            name (default: OpenAI's 80 ImageNet prompts), format strings, a per-class prompt dict
            or a file.
        batch_size: prompts per text forward and images per image forward.
        device: where to run; the model's device by default (the model is not moved).
        progress: show tqdm bars for long jobs.
        weights: (D, C) class weights to use as they are (e.g. from
            :func:`~vlpretrain.evaluation.clf_store.load_classifier`) instead of encoding the prompts.

    Attributes:
        weights: (D, C) float32 class embeddings, unit norm per column, on ``device``.

    Example:
        >>> clf = ZeroShotClassifier(model, ["cat", "dog"], templates=["a photo of a {}.", "a {c} toy."])
        >>> clf.predict_proba([pil_image]).shape
        torch.Size([1, 2])
    """

    def __init__(self, model, classnames: Sequence[str], templates: TemplateSpec = "openai_imagenet",
                 batch_size: int = 256, device: Optional[Union[str, torch.device]] = None, progress: bool = True,
                 weights: Optional[torch.Tensor] = None):
        self.classnames = _check_classnames(classnames)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.templates = load_templates(templates, self.classnames)
        self.batch_size = int(batch_size)
        self.progress = progress
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        self._per_template: Optional[torch.Tensor] = None
        self.loaded = weights is not None  # class weights given (a saved classifier), not encoded from prompts
        if weights is not None and tuple(weights.shape) != (model.embed_dim, self.num_classes):
            raise ValueError(f"class weights must be (embed_dim {model.embed_dim}, {self.num_classes} classes), "
                             f"got shape {tuple(weights.shape)}")
        self.weights = weights.float().to(self.device) if weights is not None else self._build_weights()

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def per_class_prompts(self) -> bool:
        """True when the templates are finished per-class prompts rather than format strings."""
        return isinstance(self.templates, dict)

    # -- text side ---------------------------------------------------------------------------

    def prompts_for(self, classname: str) -> list[str]:
        """The prompts that make up ``classname``'s class embedding."""
        if isinstance(self.templates, dict):
            return list(self.templates[classname])
        return [render_template(t, classname) for t in self.templates]

    def _encode_prompts(self, prompts: list[str], desc: str) -> torch.Tensor:
        """(len(prompts), D) unit-norm float32 text features on ``device``, ``batch_size`` prompts per forward."""
        return encode_texts(self.model, prompts, self.batch_size, self.device, self.progress, desc).to(self.device)

    def _build_weights(self) -> torch.Tensor:
        # All prompts of all classes are flattened and encoded batch_size at a time (a batch may span
        # classes, or split one), then averaged per class: many prompts per forward whatever the
        # number of templates, and per-class dicts with uneven prompt counts need no special case.
        if not isinstance(self.templates, dict):
            # Format-string templates: encode each (template, class) prompt once; the class weights
            # and the per-template weights (for prompt sensitivity) both come from these features.
            per_template = self.per_template_weights()  # (T, D, C), unit-norm columns
            return F.normalize(per_template.mean(0), dim=0).contiguous()
        prompts, owner = [], []
        for index, name in enumerate(self.classnames):
            class_prompts = self.prompts_for(name)
            prompts.extend(class_prompts)
            owner.extend([index] * len(class_prompts))
        features = self._encode_prompts(prompts, desc="zero-shot class weights")
        owner_t = torch.tensor(owner, device=features.device)
        sums = torch.zeros(self.num_classes, features.shape[1], device=features.device).index_add_(0, owner_t, features)
        counts = torch.bincount(owner_t, minlength=self.num_classes).to(features.dtype)
        means = sums / counts[:, None]
        return F.normalize(means, dim=-1).T.contiguous()

    def per_template_weights(self) -> torch.Tensor:
        """(T, D, C) class embeddings from each template alone, for per-template accuracy.

        Computed on first call and cached. Only for format-string templates: per-class prompt
        dicts have no shared template axis.

        Example:
            >>> feats = clf.encode_images(images)
            >>> per_template_logits = 100 * torch.einsum("nd,tdc->tnc", feats, clf.per_template_weights())
        """
        if isinstance(self.templates, dict):
            raise ValueError("per_template_weights() needs format-string templates; these are per-class prompts")
        if self._per_template is None:
            num_templates = len(self.templates)
            # Template-major order so the reshape below gives (T, C, D) directly.
            prompts = [render_template(t, c) for t in self.templates for c in self.classnames]
            features = self._encode_prompts(prompts, desc="per-template class weights")
            self._per_template = features.reshape(num_templates, self.num_classes, -1).transpose(1, 2).contiguous()
        return self._per_template

    # -- image side --------------------------------------------------------------------------

    def encode_images(self, images: ImagesLike) -> torch.Tensor:
        """(N, D) unit-norm float32 image features on CPU; see :func:`vlpretrain.inference.encode_images`.

        Example:
            >>> clf.encode_images(["a.png", "b.jpg"]).shape
            torch.Size([2, 16])
        """
        features = encode_images(self.model, images, self.batch_size, self.device, progress=self.progress)
        return features if len(features) else torch.zeros(0, self.weights.shape[0])

    # -- scores ------------------------------------------------------------------------------

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """(N, C) ``100 * image_features @ weights``, on the features' device.

        ``image_features`` should be unit norm, as :meth:`encode_images` returns them.

        Example:
            >>> clf.logits(clf.encode_images(images)).argmax(-1)
        """
        if image_features.dim() != 2 or image_features.shape[1] != self.weights.shape[0]:
            raise ValueError(f"image_features must be (N, {self.weights.shape[0]}), got shape {tuple(image_features.shape)}")
        weights = self.weights.to(image_features.device)
        return ZEROSHOT_LOGIT_SCALE * image_features.float() @ weights

    def predict_proba(self, images: ImagesLike) -> torch.Tensor:
        """(N, C) softmax class probabilities on CPU, for any input :meth:`encode_images` takes.

        Example:
            >>> clf.predict_proba(["cat.jpg"]).sum(-1)
            tensor([1.])
        """
        return self.logits(self.encode_images(images)).softmax(dim=-1).cpu()

    def predict(self, images: ImagesLike, top_k: int = 1) -> tuple[Union[list[str], list[list[str]]], torch.Tensor]:
        """Predicted labels and their probabilities, best first.

        With ``top_k=1``: (``[label, ...]``, (N,) probabilities). With ``top_k > 1``:
        (``[[best, second, ...], ...]``, (N, top_k) probabilities, descending).

        Example:
            >>> labels, scores = clf.predict(["cat.jpg"], top_k=2)
            >>> labels, scores
            ([['cat', 'dog']], tensor([[0.91, 0.07]]))
        """
        if not 1 <= top_k <= self.num_classes:
            raise ValueError(f"top_k must be between 1 and the number of classes ({self.num_classes}), got {top_k}")
        probs = self.predict_proba(images)
        scores, indices = probs.topk(top_k, dim=-1)
        labels = [[self.classnames[i] for i in row] for row in indices.tolist()]
        if top_k == 1:
            return [row[0] for row in labels], scores[:, 0]
        return labels, scores


def _check_classnames(classnames: Sequence[str]) -> list[str]:
    if isinstance(classnames, str):
        raise ValueError(f"classnames must be a list of names, got the single string {classnames!r}")
    names = list(classnames)
    if not names:
        raise ValueError("classnames is empty; give at least one class name")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise ValueError(f"classnames must be non-empty strings, got {bad[:5]!r}")
    duplicates = [f"{name!r} (x{count})" for name, count in Counter(names).items() if count > 1]
    if duplicates:
        raise ValueError(f"duplicate classnames: {', '.join(duplicates)}")
    return names
