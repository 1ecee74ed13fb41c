"""Probe texts through the probe's templates, and how much a statistic moves with the template.

Each text is embedded as zero-shot class weights are (CLIP's prompt ensembling: the mean of its
normalized template embeddings), and once per template; a statistic computed per template gives
its spread over the templates, the report's prompt sensitivity.

Example:
    >>> texts = PromptTexts(model, ["a photo of {}.", "an image of {}."], progress=False)
    >>> mean, per_template = texts.both(["a criminal", "a person"])
    >>> mean.shape, per_template.shape
    (torch.Size([2, 512]), torch.Size([2, 2, 512]))
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["PromptTexts", "template_spread"]


class PromptTexts:
    """Text embeddings of prompt lists through ``templates``: the template-mean embedding of each
    text and one per template (both on CPU).

    Example:
        >>> PromptTexts(model, ["{}."], progress=False).mean(["a cook"]).shape
        torch.Size([1, 512])
    """

    def __init__(self, model, templates: list[str], progress: bool):
        self.model, self.templates, self.progress = model, templates, progress

    def classifier(self, texts: Sequence[str]):
        # ZeroShotClassifier already does the template ensembling (and keeps the per-template weights).
        from ..zeroshot import ZeroShotClassifier

        return ZeroShotClassifier(self.model, list(texts), templates=self.templates, progress=self.progress)

    def mean(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), D) template-mean embeddings."""
        return self.classifier(texts).weights.T.cpu()

    def both(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, D) template-mean embeddings and (T, n, D) per-template ones."""
        classifier = self.classifier(texts)
        return classifier.weights.T.cpu(), classifier.per_template_weights().transpose(1, 2).cpu()


def template_spread(per_template: list[dict[str, float]], names: Sequence[str], templates: list[str]) -> dict:
    """``{"per_template": {template: {group: value}}, "spread": {group: {min, max, std}}}``; values
    that are not finite are left out of the spread.

    Example:
        >>> template_spread([{"a": 0.1}, {"a": 0.3}], ["a"], ["{}.", "a photo of {}."])["spread"]["a"]
        {'min': 0.1, 'max': 0.3, 'std': 0.1}
    """
    out = {"per_template": {t: values for t, values in zip(templates, per_template)}, "spread": {}}
    for name in names:
        column = np.array([values[name] for values in per_template], dtype=np.float64)
        finite = column[np.isfinite(column)]
        out["spread"][name] = {"min": float(finite.min()) if len(finite) else float("nan"),
                               "max": float(finite.max()) if len(finite) else float("nan"),
                               "std": float(finite.std()) if len(finite) else float("nan")}
    return out
