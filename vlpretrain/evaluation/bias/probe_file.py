"""Probe files: reading a probe YAML (or dict) and checking it, with errors that name the file and key.

A probe file (see ``eval/probes/emoji-skin-tone.yaml``)::

    name: emoji-skin-tone
    data: emoji:all                 # folder of group subfolders, CSV/JSONL/parquet, HF dataset, emoji:SPLIT
    group_column: skin_tone
    groups: [light, medium-light, medium, medium-dark, dark]   # other rows are left out (counted)
    where: {subcategory: [person, person-role]}                 # optional row filter
    templates: ../templates/emoji.txt                           # format strings; their spread = prompt sensitivity
    association:                    # cross-modal WEAT: each group against the rest
      - {name: crime, sensitive: [a criminal, a thief], neutral: [a citizen, a person]}
    harmful_labels: {neutral: [a person, a cook], sensitive: [a criminal, an animal]}
    group_performance: {label_column: subcategory, classnames: ../classnames/emoji-subcategories.txt}
    retrieval_skew: {k: [10, 50], queries: {neutral: [a person], crime: [a criminal]}}

Run settings may sit in the file too: ``alpha``, ``permutations``, ``bootstrap``, ``controls``,
``control_words`` (``pseudo`` or ``vocabulary``, see :mod:`.control_words`) and ``seed``.

Example:
    >>> load_probe("eval/probes/emoji-skin-tone.yaml")["groups"]
    ['light', 'medium-light', 'medium', 'medium-dark', 'dark']
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Union

import yaml

from ..templates import has_placeholder
from .control_words import CONTROL_WORDS

__all__ = ["PROBE_SECTIONS", "load_probe", "check_probe"]

_KEYS = {"name", "description", "data", "image_column", "split", "group_column", "groups", "where", "templates",
         "alpha", "permutations", "bootstrap", "controls", "control_words", "seed", "association", "harmful_labels",
         "group_performance", "retrieval_skew"}
# The probe sections, in the order they run and are reported.
PROBE_SECTIONS = ("association", "harmful_labels", "group_performance", "retrieval_skew")


def _text_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{where}: expected a non-empty list of texts, got {value!r}")
    return [v.strip() for v in value]


def load_probe(path: Union[str, Path]) -> dict:
    """Read and check a probe YAML; relative paths (data, templates, class names) are resolved
    against the file's folder. Errors name the file and the key.

    Example:
        >>> load_probe("eval/probes/emoji-skin-tone.yaml")["groups"]
        ['light', 'medium-light', 'medium', 'medium-dark', 'dark']
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: probe file not found (see eval/probes/ for examples)")
    probe = yaml.safe_load(path.read_text()) or {}
    if not isinstance(probe, dict):
        raise ValueError(f"{path}: a probe file is a YAML mapping")
    return check_probe(probe, path)


def check_probe(probe: dict, path: Union[str, Path] = "probe") -> dict:
    """Check a probe given as a dict (what :func:`load_probe` reads); relative paths are resolved
    against ``path``'s folder, and errors name ``path``. Returns a checked copy.

    Example:
        >>> check_probe({"data": "people.csv", "group_column": "group", "harmful_labels": {...}}, "probes/p.yaml")
    """
    probe = copy.deepcopy(probe)
    path = Path(path)
    if probe.get("_checked"):
        return probe
    unknown = set(probe) - _KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)} (known: {sorted(_KEYS)})")
    for key in ("data", "group_column"):
        if key not in probe:
            raise ValueError(f"{path}: no '{key}'")
    if not any(probe.get(k) for k in PROBE_SECTIONS):
        raise ValueError(f"{path}: no probe to run; add one of {', '.join(PROBE_SECTIONS)}")

    def resolve(value: Any) -> Any:
        # A relative path is relative to the probe file when it exists there (as in suites).
        if isinstance(value, str) and not value.startswith(("emoji:", "noto-emoji:", "tuxpaint:", "hf:")) \
                and not has_placeholder(value) and not Path(value).is_absolute() and (path.parent / value).exists():
            return str((path.parent / value).resolve())
        return value

    probe["data"] = resolve(probe["data"])
    probe.setdefault("name", path.stem)
    probe["templates"] = resolve(probe.get("templates", "simple"))
    tests = probe.get("association") or []
    if isinstance(tests, dict):
        tests = [tests]
    for i, test in enumerate(tests):
        if not isinstance(test, dict) or "sensitive" not in test or "neutral" not in test:
            raise ValueError(f"{path}: association test {i + 1} needs 'sensitive' and 'neutral' text lists")
        test.setdefault("name", f"test{i + 1}")
        test["sensitive"] = _text_list(test["sensitive"], f"{path}: association.{test['name']}.sensitive")
        test["neutral"] = _text_list(test["neutral"], f"{path}: association.{test['name']}.neutral")
    probe["association"] = tests
    if probe.get("harmful_labels"):
        labels = probe["harmful_labels"]
        for key in ("neutral", "sensitive"):
            labels[key] = _text_list(labels.get(key), f"{path}: harmful_labels.{key}")
    if probe.get("group_performance"):
        performance = probe["group_performance"]
        if "label_column" not in performance:
            raise ValueError(f"{path}: group_performance needs a 'label_column'")
        if performance.get("classnames"):
            performance["classnames"] = resolve(performance["classnames"])
    if probe.get("retrieval_skew"):
        skew = probe["retrieval_skew"]
        queries = skew.get("queries")
        if isinstance(queries, list):
            queries = {"queries": queries}
        if not isinstance(queries, dict) or not queries:
            raise ValueError(f"{path}: retrieval_skew needs 'queries' (a list, or named lists)")
        skew["queries"] = {name: _text_list(q, f"{path}: retrieval_skew.queries.{name}") for name, q in queries.items()}
        ks = skew.get("k", [10])
        skew["k"] = [int(k) for k in (ks if isinstance(ks, list) else [ks])]
    for key, low in (("permutations", 1), ("bootstrap", 0), ("controls", 0)):
        if key in probe and (not isinstance(probe[key], int) or probe[key] < low):
            raise ValueError(f"{path}: '{key}' must be an integer of at least {low}, got {probe[key]!r}")
    if probe.get("control_words", "pseudo") not in CONTROL_WORDS:
        raise ValueError(f"{path}: 'control_words' must be one of {list(CONTROL_WORDS)}, got {probe['control_words']!r}")
    if "alpha" in probe and not (isinstance(probe["alpha"], (int, float)) and 0 < probe["alpha"] < 1):
        raise ValueError(f"{path}: 'alpha' must be between 0 and 1, got {probe['alpha']!r}")
    if probe.get("retrieval_skew") and any(k < 1 for k in probe["retrieval_skew"]["k"]):
        raise ValueError(f"{path}: retrieval_skew.k must be at least 1, got {probe['retrieval_skew']['k']}")
    probe.setdefault("source", str(path))
    probe["_checked"] = True
    return probe
