"""The images of a bias probe: the probe's data read with each image's group, filtered by ``where``
and narrowed to ``groups`` (what is left out is counted, by reason).

Example:
    >>> data, names, dropped = load_group_images(load_probe("eval/probes/emoji-skin-tone.yaml"))
    >>> names, dropped["other groups"]
    (['light', 'medium-light', 'medium', 'medium-dark', 'dark'], ...)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ...data.labelled import LabelledImages

__all__ = ["load_group_images"]


def load_group_images(probe: dict) -> tuple["LabelledImages", list[str], dict[str, int]]:
    """The probe's images with their group (``labels``) and other columns (``extras``), after the
    ``where`` filter and the ``groups`` selection. Returns ``(LabelledImages, group_names, dropped_counts)``.

    Example:
        >>> data, names, dropped = load_group_images(load_probe("eval/probes/emoji-skin-tone.yaml"))
    """
    from ...data.corpus_dispatch import open_corpus
    from ...data.table_corpus import TABLE_EXTENSIONS
    from ...data.labelled import LabelledImages, open_labelled_images

    spec, column = probe["data"], probe["group_column"]
    where = f"{probe.get('source', 'probe')}: data {spec}"
    path = Path(spec)
    if path.is_file() and path.suffix.lower() in TABLE_EXTENSIONS or spec.startswith("hf:") or \
            (path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json",
                                                                 "metadata.jsonl", "metadata.csv"))):
        # Tables and datasets: the group column is read as the "caption" so the reader's checks and
        # messages apply; every other column stays available (filters, labels).
        try:
            corpus = open_corpus(spec, split=probe.get("split"), image_column=probe.get("image_column", "image"),
                                 caption_column=column)
        except ValueError as e:
            raise ValueError(str(e).replace("set caption_column=", "set group_column=")) from None
        rows = [corpus[i] for i in range(len(corpus))]
        extras: dict[str, list] = {}
        for row in rows:
            for key, value in row.extras.items():
                extras.setdefault(key, []).append(value)
        data = LabelledImages([r.image for r in rows], [str(r.captions[0]) for r in rows], [r.source for r in rows],
                              path.stem if path.is_file() else spec.removeprefix("hf:").rstrip("/").split("/")[-1], extras)
    else:
        data = open_labelled_images(spec, label_column=column, image_column=probe.get("image_column", "image"),
                                    split=probe.get("split"))
    keep = np.ones(len(data), dtype=bool)
    dropped: dict[str, int] = {}
    for key, allowed in (probe.get("where") or {}).items():
        values = data.labels if key == column else data.extras.get(key)
        if values is None:
            raise ValueError(f"{where}: 'where' names column '{key}', which the data does not have "
                             f"(columns: {sorted(data.extras)})")
        allowed = {str(a) for a in (allowed if isinstance(allowed, list) else [allowed])}
        match = np.array([str(v) in allowed for v in values])
        dropped[f"where {key}"] = int((keep & ~match).sum())
        keep &= match
    available = sorted(set(np.asarray(data.labels, dtype=object)[keep].tolist()))
    names = [str(g) for g in probe.get("groups") or available]
    in_groups = np.array([g in names for g in data.labels])
    dropped["other groups"] = int((keep & ~in_groups).sum())
    keep &= in_groups
    labels = np.asarray(data.labels, dtype=object)[keep]
    for name in names:
        count = int(np.sum(labels == name))
        if count < 2:
            raise ValueError(f"{where}: group '{name}' has {'no images' if not count else 'one image'} "
                             f"(groups found: {available or 'none'}); a group needs at least 2; fix 'groups' or 'where'")
    if len(names) < 2:
        raise ValueError(f"{where}: a bias probe needs at least 2 groups, found {names}")
    index = np.flatnonzero(keep)
    subset = LabelledImages([data.images[i] for i in index], [data.labels[i] for i in index],
                            [data.sources[i] for i in index], data.name,
                            {k: [v[i] for i in index] for k, v in data.extras.items()})
    return subset, names, dropped
