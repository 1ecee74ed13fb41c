"""Running a bias probe file on a model: which group-annotated images, which texts, which probes.

The probe file is read and checked by :mod:`.probe_file`, its images by :mod:`.group_images`; each
section runs in the module of its statistic (:func:`.association.run_association`,
:func:`.harmful_labels.run_harmful_labels`, :func:`.group_performance.run_group_performance`,
:func:`.retrieval_skew.run_retrieval_skew`) on one shared :class:`.section.ProbeRun`.

Two questions decide whether a group is *flagged* (both at ``alpha``, default 0.01):

1. Does the group differ from the rest? A permutation test over the images (group labels shuffled),
   Holm-adjusted over the groups.
2. Does the sensitive text single the group out more than meaningless text would? A model that
   encodes the group attribute (skin tone is in every caption) separates the groups along almost any
   text direction, so with enough images test 1 flags even words the model never learnt. The control
   test replaces the sensitive texts with pronounceable pseudo-words ("a bakil") drawn at random
   (``control_words: pseudo``, the default) or with real whole words of the model's own tokenizer
   vocabulary ("a harvest"; ``control_words: vocabulary``: one token each, as most sensitive words
   are, where a pseudo-word takes two or three), ``controls`` times, and compares the observed
   statistic with the largest any group reaches under those draws (family-wise over the groups):
   ``control_p_value = (1 + #draws >= observed) / (1 + draws)``.

Example:
    >>> report = run_bias_probe(model, "eval/probes/emoji-skin-tone.yaml", model_name="demo-emoji")
    >>> [f["group"] for f in report["metrics"]["flags"]]
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from ...inference import encode_images, eval_mode
from ..tasks import report as task_report
from ..templates import load_templates
from .association import run_association
from .control_words import CONTROL_WORDS, DEFAULT_CONTROLS, ControlTexts
from .group_images import load_group_images
from .group_performance import run_group_performance
from .harmful_labels import run_harmful_labels
from .probe_file import check_probe, load_probe
from .prompts import PromptTexts
from .retrieval_skew import run_retrieval_skew
from .section import ProbeRun, SectionResult
from .stats import DEFAULT_BOOTSTRAP, DEFAULT_PERMUTATIONS

logger = logging.getLogger(__name__)

__all__ = ["run_bias_probe", "SECTION_RUNNERS"]

# The probe sections in the order they run and are reported (their control draws share one generator).
SECTION_RUNNERS: dict[str, Callable[[ProbeRun, Any], SectionResult]] = {
    "association": run_association,
    "harmful_labels": run_harmful_labels,
    "group_performance": run_group_performance,
    "retrieval_skew": run_retrieval_skew,
}


def _settings(probe: dict, permutations: Optional[int], bootstrap: Optional[int], controls: Optional[int],
              seed: Optional[int], control_words: Optional[str]) -> dict[str, Any]:
    """The run settings: the arguments where given, else the probe file's, else the defaults."""
    control_words = control_words if control_words is not None else probe.get("control_words", "pseudo")
    if control_words not in CONTROL_WORDS:
        raise ValueError(f"control_words must be one of {list(CONTROL_WORDS)}, got {control_words!r}")
    return {"alpha": float(probe.get("alpha", 0.01)),
            "permutations": int(permutations if permutations is not None else probe.get("permutations", DEFAULT_PERMUTATIONS)),
            "bootstrap": int(bootstrap if bootstrap is not None else probe.get("bootstrap", DEFAULT_BOOTSTRAP)),
            "controls": int(controls if controls is not None else probe.get("controls", DEFAULT_CONTROLS)),
            "control_words": control_words,
            "seed": int(seed if seed is not None else probe.get("seed", 0))}


def _templates(probe: dict) -> list[str]:
    templates = load_templates(probe.get("templates", "simple"))
    if isinstance(templates, dict):
        raise ValueError(f"{probe.get('source', 'probe')}: templates must be format strings with {{}} "
                         f"(per-class prompts have no template axis for prompt sensitivity)")
    return templates


def run_bias_probe(model, probe: Union[str, Path, dict], model_name: str = "", progress: bool = True,
                   permutations: Optional[int] = None, bootstrap: Optional[int] = None,
                   controls: Optional[int] = None, seed: Optional[int] = None,
                   control_words: Optional[str] = None) -> dict:
    """Run every probe of a probe file on ``model``; returns a CLIP_benchmark-shaped report
    (``task: "bias"``) whose ``metrics`` hold one section per probe, ``prompt_sensitivity`` and
    ``flags`` (the groups flagged, with the evidence). Arguments given override the probe file's
    settings.

    Example:
        >>> report = run_bias_probe(vlpretrain.load_model("runs/demo-emoji/final"), "eval/probes/emoji-skin-tone.yaml")
        >>> report["metrics"]["association"]["crime"]["groups"]["dark"]["effect_size"]
    """
    probe = check_probe(probe) if isinstance(probe, dict) else load_probe(probe)
    settings = _settings(probe, permutations, bootstrap, controls, seed, control_words)
    templates = _templates(probe)
    data, names, dropped = load_group_images(probe)
    for reason, count in dropped.items():
        if count:
            logger.info("%s: left out %d images (%s)", probe["name"], count, reason)
    groups = np.asarray(data.labels, dtype=object)
    metrics: dict[str, Any] = {"groups": names, "images": len(data), "group_sizes":
                               {n: int(np.sum(groups == n)) for n in names}, "left_out": dropped,
                               "templates": templates,
                               **{k: settings[k] for k in ("alpha", "permutations", "bootstrap", "controls", "control_words")}}
    # One eval-mode block for every encoding of the run (images, probe texts, control words).
    with eval_mode(model):
        images = encode_images(model, data.images, progress=progress).double()  # (N, D), unit norm
        texts = PromptTexts(model, templates, progress)
        control = ControlTexts(probe, texts.mean, model.tokenizer, settings["controls"], settings["control_words"],
                               settings["seed"]) if settings["controls"] else None
        run = ProbeRun(data, names, groups, images, texts, settings["alpha"], settings["permutations"],
                       settings["bootstrap"], settings["seed"], settings["controls"], control,
                       probe.get("source", "probe"))
        sensitivity: dict[str, Any] = {}
        flags: list[dict] = []
        for key, run_section in SECTION_RUNNERS.items():
            if probe.get(key):
                section = run_section(run, probe[key])
                metrics[key] = section.metrics
                sensitivity.update(section.sensitivity)
                flags += section.flags
        metrics["prompt_sensitivity"] = sensitivity
        metrics["flags"] = flags
    return task_report(dataset=data.name, model=model_name, task="bias", metrics=_finite_or_none(metrics),
                       probe=probe["name"], probe_file=probe.get("source", ""))


def _finite_or_none(value: Any) -> Any:
    """NaN and +-inf (a skew of a group absent from the top k, an effect size without spread) become
    None, so report.json is strict JSON."""
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value
