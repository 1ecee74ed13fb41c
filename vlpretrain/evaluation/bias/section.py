"""What a probe section (association, harmful labels, group performance, retrieval skew) runs on,
what it returns, and the rule that flags a group.

A group is *flagged* when two questions both say yes at ``alpha``:

1. Does the group differ from the rest? A permutation test over the images (group labels shuffled),
   Holm-adjusted over the groups.
2. Does the sensitive text single the group out more than meaningless text would? The control test
   of :mod:`.control_words` (skipped when ``controls`` is 0).

Example:
    >>> result = run_association(probe_run, probe["association"])   # a SectionResult
    >>> result.metrics["crime"]["groups"]["dark"]["effect_size"], result.flags
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import torch

from .control_words import ControlTexts
from .prompts import PromptTexts, template_spread

if TYPE_CHECKING:
    from ...data.labelled import LabelledImages

__all__ = ["ProbeRun", "SectionResult", "flagged_groups"]


@dataclass
class ProbeRun:
    """One probe run's images, groups, text encoder and settings, shared by its sections.

    ``images`` are the (N, D) unit-norm image features in float64, ``groups`` each image's group (an
    object array), ``names`` the groups in report order; ``control`` is None when ``controls`` is 0.

    Example:
        >>> run = ProbeRun(data, names, groups, images, PromptTexts(model, templates, False), alpha=0.01,
        ...                permutations=10_000, bootstrap=1000, seed=0, controls=0, control=None)
    """

    data: "LabelledImages"
    names: list[str]
    groups: np.ndarray
    images: torch.Tensor
    texts: PromptTexts
    alpha: float
    permutations: int
    bootstrap: int
    seed: int
    controls: int
    control: Optional[ControlTexts]
    source: str = "probe"

    @property
    def templates(self) -> list[str]:
        return self.texts.templates

    @property
    def common(self) -> dict[str, int]:
        """The resampling settings every statistic takes."""
        return dict(permutations=self.permutations, bootstrap=self.bootstrap, seed=self.seed)

    def draw(self, count: int) -> torch.Tensor:
        """``count`` control-text embeddings (see :class:`ControlTexts`)."""
        return self.control.draw(count)

    def spread(self, per_template: list[dict[str, float]], names: Optional[Sequence[str]] = None) -> dict:
        """A statistic's spread over the templates (:func:`template_spread`), per group by default."""
        return template_spread(per_template, self.names if names is None else names, self.templates)

    def flags(self, per_group: dict, probe: str, test: str, key: str) -> list[dict]:
        """:func:`flagged_groups` with this run's groups, ``alpha`` and ``controls``."""
        return flagged_groups(per_group, self.names, self.alpha, probe, test, key, self.controls)


@dataclass
class SectionResult:
    """A section's report entry, its prompt-sensitivity entries (by name) and its flags."""

    metrics: dict[str, Any]
    sensitivity: dict[str, Any] = field(default_factory=dict)
    flags: list[dict] = field(default_factory=list)


def flagged_groups(per_group: dict, names: Sequence[str], alpha: float, probe: str, test: str, key: str,
                   controls: int) -> list[dict]:
    """The flags of one test: each group whose Holm-adjusted p is below ``alpha``, whose statistic
    ``key`` is positive, and (when there were ``controls``) whose ``control_p_value`` is below ``alpha``.

    Example:
        >>> flagged_groups({"a": {"p_adjusted": 0.001, "skew": 0.4, "control_p_value": 0.002}}, ["a"], 0.01,
        ...                "retrieval_skew", "crime top-50", "skew", controls=300)
        [{'probe': 'retrieval_skew', 'test': 'crime top-50', 'group': 'a', 'statistic': 0.4, ...}]
    """
    flags = []
    for name in names:
        entry = per_group[name]
        # A one-sided test's p is small only for a positive statistic, except retrieval skew against a
        # desired distribution other than the pool's (its p is against the pool): require both.
        if entry["p_adjusted"] < alpha and entry[key] > 0 and (not controls or entry.get("control_p_value", 1.0) < alpha):
            flags.append({"probe": probe, "test": test, "group": name, "statistic": entry[key],
                          "p_adjusted": entry["p_adjusted"], "control_p_value": entry.get("control_p_value")})
    return flags
