"""Prompt templates for zero-shot classification: named sets, lists, per-class prompts, files.

A *template* is a format string with one class-name slot, written ``{}`` or ``{c}``
("a photo of a {}."). Per-class prompts (CuPL style) are already-written sentences, one list per
class name, used as they are.

Example:
    >>> load_templates("openai_imagenet_7")[0]
    'itap of a {}.'
    >>> render_template("a photo of a {c}.", "goldfish")
    'a photo of a goldfish.'
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

__all__ = ["TEMPLATE_SETS", "TemplateSpec", "load_templates", "render_template", "has_placeholder"]

# Matches the class-name slot of a template; "{}" (str.format style) and "{c}" are both accepted.
_PLACEHOLDER = re.compile(r"\{c?\}")


def _as_format_strings(lambdas: Iterable[Callable[[str], str]]) -> list[str]:
    # open_clip ships the prompts as lambdas (f-strings); calling them with "{}" turns each into the
    # equivalent format string, so the wording stays exactly OpenAI's without retyping 80 lines.
    return [template("{}") for template in lambdas]


TEMPLATE_SETS: dict[str, list[str]] = {
    # The 80 prompts of OpenAI's ImageNet zero-shot notebook (CLIP paper, open_clip, CLIP_benchmark).
    "openai_imagenet": _as_format_strings(OPENAI_IMAGENET_TEMPLATES),
    # The 7 of those 80 that the notebook found to do nearly as well.
    "openai_imagenet_7": _as_format_strings(SIMPLE_IMAGENET_TEMPLATES),
    "simple": ["a photo of a {}."],
}

TemplateSpec = Union[str, os.PathLike, Sequence[Union[str, Callable[[str], str]]], Mapping[str, Sequence[str]]]


def has_placeholder(template: str) -> bool:
    """True if ``template`` has a class-name slot (``{}`` or ``{c}``)."""
    return bool(_PLACEHOLDER.search(template))


def render_template(template: str, classname: str) -> str:
    """Fill every ``{}`` / ``{c}`` of ``template`` with ``classname``.

    Equal to ``template.format(classname)`` for ordinary templates, but a class name or template
    holding other braces ("{x}", JSON-ish text) cannot break it.

    Example:
        >>> render_template("a photo of a {}.", "cat")
        'a photo of a cat.'
    """
    return _PLACEHOLDER.sub(lambda _: classname, template)


def load_templates(spec: TemplateSpec, classnames: Optional[Sequence[str]] = None) -> Union[list[str], dict[str, list[str]]]:
    """Resolve a template spec into a list of format strings, or a per-class prompt dict.

    ``spec`` may be:

    * a set name from :data:`TEMPLATE_SETS` (``"openai_imagenet"``, ``"openai_imagenet_7"``, ``"simple"``);
    * one template string or a list of them, with ``{}`` or ``{c}`` for the class name (callables
      such as open_clip's lambdas are converted by calling them with ``"{}"``);
    * a dict ``{classname: [prompt, ...]}`` of finished prompts (CuPL style);
    * a path to a ``.json`` file (a list of templates or such a dict) or a text file with one
      template per line (blank lines are skipped).

    With ``classnames``, a per-class dict must cover every class (extra keys are ignored, so one
    file can serve subsets of a label set); the returned dict then holds those classes, in order.

    Raises:
        ValueError: unknown set name, a template without a class-name slot, an empty list, a
            per-class dict that misses classes or has an empty prompt list.

    Example:
        >>> load_templates("simple")
        ['a photo of a {}.']
        >>> load_templates({"cat": ["a cat, small and furry."], "dog": ["a dog."]}, ["cat", "dog"])
        {'cat': ['a cat, small and furry.'], 'dog': ['a dog.']}
    """
    if isinstance(spec, os.PathLike):
        return load_templates(_read_template_file(Path(spec)), classnames)
    if isinstance(spec, str):
        if spec in TEMPLATE_SETS:
            return list(TEMPLATE_SETS[spec])
        if has_placeholder(spec) and not os.path.isfile(spec):
            return _check_templates([spec])
        if os.path.isfile(spec) or Path(spec).suffix.lower() in (".json", ".txt") or os.sep in spec:
            return load_templates(_read_template_file(Path(spec)), classnames)
        raise ValueError(_unknown_set_message(spec))
    if isinstance(spec, Mapping):
        return _check_per_class(spec, classnames)
    if isinstance(spec, Sequence):
        return _check_templates([t("{}") if callable(t) else t for t in spec])
    raise TypeError(f"templates: expected a set name, a list of templates, a per-class dict or a file path, "
                    f"got {type(spec).__name__}")


def _unknown_set_message(name: str) -> str:
    known = ", ".join(TEMPLATE_SETS)
    close = difflib.get_close_matches(name, list(TEMPLATE_SETS), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown template set '{name}'; known sets: {known}{hint}"


def _read_template_file(path: Path) -> Union[list, dict]:
    if not path.is_file():
        raise ValueError(f"template file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, (list, dict)):
            raise ValueError(f"{path}: expected a JSON list of templates or a {{classname: [prompts]}} object, "
                             f"got {type(data).__name__}")
        return data
    return [line.strip() for line in text.splitlines() if line.strip()]


def _check_templates(templates: list) -> list[str]:
    if not templates:
        raise ValueError("templates: the list is empty; give at least one template such as 'a photo of a {}.'")
    for template in templates:
        if not isinstance(template, str):
            raise ValueError(f"templates: expected strings, got {type(template).__name__} ({template!r})")
        if not has_placeholder(template):
            raise ValueError(f"template {template!r} has no class-name slot; write '{{}}' or '{{c}}' where the class name goes")
    return list(templates)


def _check_per_class(prompts: Mapping, classnames: Optional[Sequence[str]]) -> dict[str, list[str]]:
    if not prompts:
        raise ValueError("templates: the per-class prompt dict is empty")
    if classnames is not None:
        missing = [c for c in classnames if c not in prompts]
        if missing:
            shown = ", ".join(repr(c) for c in missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
            raise ValueError(f"per-class prompts are missing {len(missing)} of {len(classnames)} classes: {shown}")
        keys = list(classnames)
    else:
        keys = list(prompts)
    out: dict[str, list[str]] = {}
    for name in keys:
        value = prompts[name]
        # A bare string would otherwise be iterated character by character.
        value = [value] if isinstance(value, str) else list(value)
        if not value or not all(isinstance(p, str) and p for p in value):
            raise ValueError(f"per-class prompts for {name!r} must be a non-empty list of non-empty strings")
        out[str(name)] = value
    return out
