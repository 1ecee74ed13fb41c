"""Benchmark datasets in CLIP_benchmark's ``wds/`` layout, read from a local folder (``wds:PATH``).

The layout (as the ``clip-benchmark/wds_*`` datasets on the Hugging Face hub are laid out)::

    PATH/
      test/0.tar, test/1.tar, ...     one folder of tar shards per split; test/nshards.txt gives their number
      classnames.txt                  one class name per line; a sample's ``cls`` is its line number (from 0)
      zeroshot_classification_templates.txt   one prompt per line, ``{c}`` for the class name
      dataset_type.txt                optional: ``classification`` (default) or ``retrieval``

A sample is ``{key}.webp | .jpg | .jpeg | .png`` (the image), ``{key}.cls`` (the class number, as text) and/or
``{key}.txt`` (its captions, one per line: retrieval). A sample without an image or a usable ``cls`` is
skipped, counted and named in a warning. Classification images are streamed (read twice: labels first, then
images), never all held in memory; retrieval sets (a few thousand images) are read once into memory.

Example:
    >>> bench = open_wds_benchmark("wds:/data/wds_cifar10")
    >>> bench.classnames[:2], bench.templates[:1], len(bench.shards)
    (['airplane', 'automobile'], ['a photo of a {c}.'], 2)
    >>> data = wds_labelled_images(bench)            # LabelledImages, labels are the class names
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .corpus import CorpusRow
from .labelled import LabelledImages

__all__ = ["WDS_PREFIX", "WdsBenchmark", "is_wds_spec", "open_wds_benchmark", "wds_labelled_images", "wds_corpus",
           "open_benchmark_images", "open_benchmark_corpus"]

logger = logging.getLogger(__name__)

WDS_PREFIX = "wds:"
IMAGE_MEMBERS = ("webp", "png", "jpg", "jpeg")  # CLIP_benchmark's order


def is_wds_spec(spec: Any) -> bool:
    """True for ``wds:PATH`` (a local folder in CLIP_benchmark's wds layout).

    Example:
        >>> is_wds_spec("wds:data/wds_cifar10"), is_wds_spec("emoji:test")
        (True, False)
    """
    return isinstance(spec, str) and spec.startswith(WDS_PREFIX)


@dataclass(frozen=True)
class WdsBenchmark:
    """A wds benchmark folder: its split's shards in order, class names and templates (None when absent)."""

    root: Path
    split: str
    shards: list[Path]
    dataset_type: str
    classnames: Optional[list[str]]
    templates: Optional[list[str]]

    @property
    def name(self) -> str:
        # wds_cifar10 -> cifar10, as CLIP_benchmark names wds/cifar10 in its results
        return re.sub(r"^wds_", "", self.root.name) or str(self.root)


def _lines(path: Path) -> Optional[list[str]]:
    if not path.is_file():
        return None
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _shard_number(path: Path) -> tuple[int, str]:
    return (int(path.stem), "") if path.stem.isdigit() else (1 << 62, path.name)


def open_wds_benchmark(spec: str, split: Optional[str] = None) -> WdsBenchmark:
    """Open ``wds:PATH`` (or a plain folder path) for ``split`` (default ``test``); every problem is one line
    naming the folder or file and the fix.

    Example:
        >>> open_wds_benchmark("wds:/data/wds_flickr30k").dataset_type
        'retrieval'
    """
    root = Path(spec[len(WDS_PREFIX):] if is_wds_spec(spec) else spec)
    split = split or "test"
    if not root.is_dir():
        raise FileNotFoundError(f"{spec}: no such folder (expected CLIP_benchmark's wds layout: "
                                f"{root}/{split}/0.tar, {root}/classnames.txt, ...)")
    folder = root / split
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(f"{folder}: no '{split}' split folder (splits here: {', '.join(found) or 'none'})")
    count_file = folder / "nshards.txt"
    if count_file.is_file():
        text = count_file.read_text().strip()
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"{count_file}: expected a positive number of shards, got {text!r}")
        shards = [folder / f"{i}.tar" for i in range(int(text))]
        missing = [p for p in shards if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: missing ({len(missing)} of the {len(shards)} shards "
                                    f"{count_file} announces are not there)")
    else:
        shards = sorted(folder.glob("*.tar"), key=_shard_number)
        if not shards:
            raise FileNotFoundError(f"{folder}: no .tar shards")
    kind = (_lines(root / "dataset_type.txt") or ["classification"])[0].lower()
    if kind not in ("classification", "retrieval"):
        raise ValueError(f"{root / 'dataset_type.txt'}: dataset type {kind!r} is not supported "
                         f"(classification or retrieval)")
    return WdsBenchmark(root, split, shards, kind, _lines(root / "classnames.txt"),
                        _lines(root / "zeroshot_classification_templates.txt"))


def _samples(bench: WdsBenchmark, on_bad: Callable[[str, str], None]) -> Iterator[tuple[str, dict]]:
    """(source, member dict) of every sample of every shard, in order, with webdataset's tar reader; an
    unreadable tar or tail is one ``on_bad`` call, never an exception."""
    from webdataset.tariterators import tarfile_samples

    for shard in bench.shards:
        errors: list[Exception] = []
        try:
            for sample in tarfile_samples([{"url": str(shard)}], handler=lambda e: errors.append(e) or True):
                yield f"{shard}:{sample.get('__key__', '?')}", sample
        except Exception as e:  # noqa: BLE001 - a tar that cannot be opened at all is one counted skip
            on_bad(str(shard), f"unreadable shard ({type(e).__name__}: {e})")
        for error in errors:
            on_bad(str(shard), f"unreadable tar data ({error})")


def _image_of(sample: dict) -> Optional[bytes]:
    ext = next((e for e in IMAGE_MEMBERS if sample.get(e) is not None), None)
    return None if ext is None else bytes(sample[ext])


def _class_of(sample: dict, bench: WdsBenchmark) -> Any:
    """The sample's label (its class name when classnames.txt exists), or a reason string prefixed '!'."""
    raw = sample.get("cls")
    if raw is None:
        return "!no .cls member"
    text = raw.decode("utf-8", errors="replace").strip() if isinstance(raw, bytes) else str(raw).strip()
    if not text.lstrip("-").isdigit():
        return f"!.cls is {text[:20]!r}, not a class number"
    number = int(text)
    if bench.classnames is None:
        return str(number)
    if not 0 <= number < len(bench.classnames):
        raise ValueError(f"{bench.root}: a sample has class {number}, but classnames.txt lists "
                         f"{len(bench.classnames)} classes; the file and the shards do not belong together")
    return bench.classnames[number]


class _Skips:
    """Counts and names skipped samples (the first in a warning), once per pass."""

    def __init__(self, name: str):
        self.name, self.examples, self.count = name, [], 0

    def __call__(self, source: str, reason: str) -> None:
        self.count += 1
        if len(self.examples) < 20:
            self.examples.append(f"{source}: {reason}")

    def warn(self) -> None:
        if self.count:
            logger.warning("%s: %d samples skipped, e.g. %s", self.name, self.count, self.examples[0])


def _labelled(bench: WdsBenchmark, on_bad: Callable[[str, str], None]) -> Iterator[tuple[str, bytes, str]]:
    for source, sample in _samples(bench, on_bad):
        image, label = _image_of(sample), _class_of(sample, bench)
        if image is None:
            on_bad(source, f"no image member ({'/'.join(IMAGE_MEMBERS)})")
        elif label.startswith("!"):
            on_bad(source, label[1:])
        else:
            yield source, image, label


class _StreamedImages:
    """The images of a classification set, re-read from the shards each time they are iterated (the
    encoder streams them), in the order of :func:`wds_labelled_images`' labels."""

    def __init__(self, bench: WdsBenchmark, count: int):
        self.bench, self.count = bench, count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[bytes]:
        for _, image, _ in _labelled(self.bench, lambda source, reason: None):
            yield image


def wds_labelled_images(bench: WdsBenchmark) -> LabelledImages:
    """The labelled images of a classification set: labels (class names from classnames.txt, else the
    class numbers) read in a first pass; the images stream from the shards when encoded.

    Example:
        >>> data = wds_labelled_images(open_wds_benchmark("wds:/data/wds_cifar10"))
        >>> len(data), data.labels[0]
        (10000, 'cat')
    """
    skips = _Skips(bench.name)
    labels, sources = [], []
    for source, _, label in _labelled(bench, skips):
        labels.append(label)
        sources.append(source)
    skips.warn()
    if not labels:
        raise ValueError(f"{bench.root}/{bench.split}: no usable samples (an image member and a .cls each); "
                         f"{skips.count} skipped" + (f", e.g. {skips.examples[0]}" if skips.examples else ""))
    return LabelledImages(_StreamedImages(bench, len(labels)), labels, sources, bench.name)  # type: ignore[arg-type]


class WdsCorpus(list):
    """A retrieval set in memory: a list of :class:`CorpusRow` (image bytes, captions) with a ``name``."""

    name: str = ""


def wds_corpus(bench: WdsBenchmark) -> WdsCorpus:
    """The image-caption rows of a retrieval set (``txt``: one caption per line), read into memory.

    Example:
        >>> corpus = wds_corpus(open_wds_benchmark("wds:/data/wds_flickr30k"))
        >>> len(corpus), len(corpus[0].captions)
        (1000, 5)
    """
    skips = _Skips(bench.name)
    rows = WdsCorpus()
    rows.name = bench.name
    for source, sample in _samples(bench, skips):
        image, text = _image_of(sample), sample.get("txt")
        captions = [] if text is None else [c.strip() for c in (
            text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)).splitlines() if c.strip()]
        if image is None:
            skips(source, f"no image member ({'/'.join(IMAGE_MEMBERS)})")
        elif not captions:
            skips(source, "no captions (.txt member)")
        else:
            rows.append(CorpusRow(image, captions, source=source))
    skips.warn()
    if not rows:
        raise ValueError(f"{bench.root}/{bench.split}: no usable samples (an image and a .txt each); "
                         f"{skips.count} skipped" + (f", e.g. {skips.examples[0]}" if skips.examples else ""))
    return rows


def open_benchmark_images(spec: str, label_column: str = "label", image_column: str = "image",
                          split: Optional[str] = None) -> tuple[LabelledImages, Optional[list[str]], Optional[list[str]]]:
    """A labelled image set for any classification data spec, with the class names and templates it
    brings (a wds folder's classnames.txt and templates; None for other specs).

    Example:
        >>> data, classnames, templates = open_benchmark_images("wds:/data/wds_cifar10")
    """
    if is_wds_spec(spec):
        bench = open_wds_benchmark(spec, split)
        return wds_labelled_images(bench), bench.classnames, bench.templates
    from .labelled import open_labelled_images

    return open_labelled_images(spec, label_column, image_column, split), None, None


def open_benchmark_corpus(spec: str, data: Any = None, split: Optional[str] = None) -> Any:
    """An image-caption corpus for any retrieval data spec: a wds folder, or what
    :func:`~vlpretrain.data.named.open_named_corpus` opens.

    Example:
        >>> corpus = open_benchmark_corpus("wds:/data/wds_flickr30k")
    """
    if is_wds_spec(spec):
        return wds_corpus(open_wds_benchmark(spec, split))
    from .named import open_named_corpus

    return open_named_corpus(spec, data, split)
