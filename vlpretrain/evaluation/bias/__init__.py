"""Bias probes: cross-modal association tests, harmful-label rates, per-group performance gaps,
retrieval skew and prompt sensitivity, each with permutation p-values and bootstrap intervals.

Example:
    >>> from vlpretrain.evaluation.bias import run_bias_probe, write_bias_report
    >>> report = run_bias_probe(model, "eval/probes/emoji-skin-tone.yaml", model_name="demo-emoji")
    >>> write_bias_report(report, "results/bias/emoji-skin-tone/demo-emoji")
"""

from .association import association_scores, association_test, effect_size
from .control_words import pseudo_words
from .group_performance import group_performance
from .harmful_labels import harmful_label_rates
from .probe import run_bias_probe
from .probe_file import load_probe
from .report import write_bias_report
from .retrieval_skew import max_skew_at_k, ndkl_at_k, retrieval_skew

__all__ = ["association_scores", "association_test", "effect_size", "group_performance", "harmful_label_rates",
           "load_probe", "pseudo_words", "run_bias_probe", "write_bias_report", "max_skew_at_k", "ndkl_at_k",
           "retrieval_skew"]
