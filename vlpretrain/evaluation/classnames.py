"""Class names for classification: which labels exist, and the readable names prompts use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union


def load_classnames(spec: Union[None, str, Sequence[str], dict]) -> Optional[dict[str, str]]:
    """``{label: readable name}`` from a list, a dict, a comma-separated string, or a file
    (``.json`` list or dict, or text with one label per line, optionally ``label<TAB>readable name``)."""
    if spec is None:
        return None
    if isinstance(spec, dict):
        return {str(k): str(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return {str(c): str(c) for c in spec}
    path = Path(spec)
    if path.is_file():
        if path.suffix.lower() == ".json":
            return load_classnames(json.loads(path.read_text()))
        names = {}
        for line in path.read_text().splitlines():
            if line.strip():
                label, _, readable = line.partition("\t")
                names[label.strip()] = (readable or label).strip()
        return names
    if path.suffix.lower() in (".json", ".txt"):
        raise FileNotFoundError(f"--classnames: file {spec} not found")
    return {c.strip(): c.strip() for c in str(spec).split(",") if c.strip()}


def match_labels(labels: Sequence[str], classnames: Optional[dict[str, str]], where: str) -> tuple[list[str], list[str], list[int]]:
    """(label keys, readable names, index of each sample's label). Every label must be a class (an
    error names the ones that are not); classes without images stay in as candidates, and per-class
    metrics skip them."""
    present = sorted(set(labels))
    if classnames is None:
        classnames = {label: label for label in present}
    keys = list(classnames)
    unknown = [label for label in present if label not in classnames]
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ValueError(f"{where}: labels {shown} are not among the {len(keys)} class names (mismatched label names?)")
    index = {k: i for i, k in enumerate(keys)}
    return keys, [classnames[k] for k in keys], [index[label] for label in labels]
