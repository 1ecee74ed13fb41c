"""Several models on every task of a suite in one call, as CLIP_benchmark's ``eval`` runs models x datasets:
one JSON per (model, data set, task) named from a template, ``skip_existing``, one progress bar per model,
and a failed model or data set named with its reason while the others carry on.

Example:
    >>> models = parse_models(["small=runs/a/final", "runs/b/final"])
    >>> outcome = run_benchmark("eval/suites/demo.yaml", models, "results/{dataset}_{model}_{task}.json")
    >>> print(format_summary(outcome)); outcome.failed
    []
"""

from __future__ import annotations

import logging
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from ..io import is_our_figure, write_json
from ..progress import progress_bar
from .results_table import read_result
from .suite import (CLIP_TASK_NAMES, SuiteResult, load_suite, run_task, summary_header_lines, task_line,
                    write_summary)

__all__ = ["ModelEntry", "BenchmarkOutcome", "TEMPLATE_FIELDS", "parse_models", "read_models_file",
           "model_slug", "file_safe", "run_benchmark", "format_summary"]

logger = logging.getLogger(__name__)

TEMPLATE_FIELDS = ("dataset", "model", "pretrained", "task", "language", "suite", "precision")


@dataclass(frozen=True)
class ModelEntry:
    """A model to evaluate: ``spec`` for ``load_model``, ``name`` for file names and reports."""

    name: str
    spec: str
    alias: bool = False  # named by the user (NAME=SPEC): reports say model=name, pretrained=spec


@dataclass
class BenchmarkOutcome:
    """What a run did, per (model name, data set): written files, files skipped because they existed,
    optional tasks skipped (data not installed) and failures, each with its one-line reason."""

    written: dict[tuple[str, str], Path] = field(default_factory=dict)
    existing: dict[tuple[str, str], Path] = field(default_factory=dict)
    skipped: dict[tuple[str, str], str] = field(default_factory=dict)
    failed: dict[tuple[str, str], str] = field(default_factory=dict)
    reports: dict[tuple[str, str], dict] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)


def model_slug(spec: str) -> str:
    """A file-name-safe name for a model spec: a checkpoint's run folder (``runs/a/final`` -> ``a``), else the
    last path part without suffix, with ``:`` and ``/`` as ``-``.

    Example:
        >>> model_slug("runs/demo-emoji/final"), model_slug("open_clip:ViT-B-32/openai")
        ('demo-emoji', 'open_clip-ViT-B-32-openai')
    """
    path = Path(spec.rstrip("/"))
    if ":" not in spec and path.name == "final" and path.parent.name:
        return path.parent.name
    text = spec if ":" in spec else (path.stem or spec)
    return re.sub(r"[:/\\\s]+", "-", text).strip("-") or "model"


def parse_models(values: Sequence[str]) -> list[ModelEntry]:
    """``--model`` values: ``SPEC`` or ``NAME=SPEC``; two models with the same name are a one-line error.

    Example:
        >>> parse_models(["small=runs/a/final", "runs/b/final"])
        [ModelEntry(name='small', spec='runs/a/final', alias=True), ModelEntry(name='b', spec='runs/b/final', alias=False)]
    """
    entries = []
    for value in values:
        name, sep, spec = value.partition("=")
        if sep and re.fullmatch(r"[\w.+-]+", name) and spec:
            entries.append(ModelEntry(name, spec, True))
        else:
            entries.append(ModelEntry(model_slug(value), value))
    seen: dict[str, str] = {}
    for entry in entries:
        if entry.name in seen:
            raise ValueError(f"--model: {seen[entry.name]} and {entry.spec} are both named '{entry.name}'; "
                             f"name them apart with NAME=SPEC, e.g. --model {entry.name}-2={entry.spec}")
        seen[entry.name] = entry.spec
    if not entries:
        raise ValueError("no model to evaluate: give --model (several times) or --models FILE")
    return entries


def read_models_file(path: Union[str, Path]) -> list[str]:
    """The model values of a ``--models`` file: one ``SPEC`` or ``NAME=SPEC`` per line, ``#`` comments.

    Example:
        >>> read_models_file("models.txt")
        ['small=runs/a/final', 'runs/b/final']
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--models: {path} not found (one model per line: SPEC or NAME=SPEC)")
    lines = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line]


def _check_template(template: str, several_models: bool, several_tasks: bool) -> None:
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    unknown = [n for n in names if n not in TEMPLATE_FIELDS]
    if unknown:
        raise ValueError(f"--output: unknown field {{{unknown[0]}}} in {template!r} (known: "
                         f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)})")
    for needed, several in (("model", several_models), ("dataset", several_tasks)):
        if several and needed not in names:
            raise ValueError(f"--output {template!r} has no {{{needed}}}: every result would go to the same file; "
                             f"add {{{needed}}}, e.g. results/{{dataset}}_{{model}}_{{task}}.json")


# How to rename a template field whose value would be '.' or '..' (a folder, not a file name part).
_RENAME = {"model": "give the model another NAME with --model NAME=SPEC", "dataset": "rename the suite's task",
           "pretrained": "leave {pretrained} out of the template"}


def file_safe(value: str, field: str = "model") -> str:
    """``value`` as one part of a file path: ``/``, ``\\``, ``:`` and spaces as ``_``; ``.`` and ``..`` (which
    would name a folder, or leave the output folder) are a one-line error naming ``field``.

    Example:
        >>> file_safe("open_clip:ViT-B-32/openai")
        'open_clip_ViT-B-32_openai'
    """
    safe = re.sub(r"[/\\:\s]+", "_", str(value)).strip("_")
    if safe in (".", ".."):
        raise ValueError(f"{field} {value!r} cannot be part of a file path ('.' and '..' name folders): "
                         f"{_RENAME.get(field, 'choose another --output template')}")
    return safe


def _output_path(template: str, **fields: str) -> Path:
    return Path(template.format(**{k: file_safe(v, k) for k, v in fields.items()}))


def _fields(entry: ModelEntry, task: dict, suite: str, precision: str) -> dict[str, str]:
    return dict(dataset=task["name"], model=entry.name, pretrained=entry.spec if entry.alias else "",
                task=CLIP_TASK_NAMES.get(task["task"], task["task"]), language="en", suite=suite, precision=precision)


def _refusal(path: Path) -> Optional[str]:
    """Why a result may not be written to ``path`` (a file there that is not one of our results), or None."""
    if not (path.exists() or path.is_symlink()):
        return None
    try:
        read_result(path)
    except (ValueError, OSError) as e:
        return f"{_reason(e)}; not replaced: move it away or choose another --output"
    return None


def _figure_refusal(png: Path, beside_our_result: bool) -> Optional[str]:
    """Why a confusion matrix may not be drawn to ``png`` (a file there that we did not write), or None.
    ``beside_our_result``: one of our results is there under the same name, so the figure was drawn with it
    (figures from before they were marked carry only matplotlib's own mark)."""
    if not (png.exists() or png.is_symlink()) or beside_our_result or is_our_figure(png):
        return None
    return f"{png}: not a figure written by vlpretrain; not replaced: move it away or choose another --out"


def _summary_refusal(folder: Path) -> Optional[str]:
    """Why a model's ``summary.md`` / ``summary.csv`` may not be written in ``folder`` (a file there that is
    not a summary of ours), or None."""
    for name, (line, head) in summary_header_lines().items():
        path = folder / name
        if not (path.exists() or path.is_symlink()):
            continue
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            lines = []
        if len(lines) <= line or lines[line] != head:
            return f"{path}: not a summary written by vlp eval run; not replaced: move it away or choose another --out"
    return None


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    return line if isinstance(error, (ValueError, OSError)) and line else f"{type(error).__name__}: {line}"


def run_benchmark(suite_path: Union[str, Path], models: Sequence[ModelEntry], output: str, *,
                  skip_existing: bool = False, precision: str = "fp32", batch_size: int = 256,
                  recall_k: Optional[Sequence[int]] = None, progress: bool = True,
                  save_clf: Optional[str] = None, load_clf: Optional[str] = None, summary_folders: bool = False,
                  load: Optional[Callable[[str], Any]] = None) -> BenchmarkOutcome:
    """Every task of the suite on every model; each report goes to ``output`` formatted with
    :data:`TEMPLATE_FIELDS` (``{dataset}`` is the suite task's name, ``{task}`` CLIP_benchmark's task name).
    ``save_clf`` / ``load_clf`` are templates too. ``summary_folders``: also write ``summary.md`` / ``.csv``
    and confusion PNGs beside each model's reports (the one-model layout of ``vlp eval run``).

    Example:
        >>> run_benchmark("eval/suites/demo.yaml", parse_models(["runs/a/final"]), "results/{dataset}_{model}.json",
        ...               skip_existing=True, precision="bf16").written
    """
    from ..data.rendered import MissingSourceError
    from ..inference import inference_precision

    if load is None:
        from ..models import load_model as load
    suite = load_suite(suite_path)
    tasks = suite["tasks"]
    for template in (output, save_clf, load_clf):
        if template:
            _check_template(template, len(models) > 1, len(tasks) > 1)
    outcome = BenchmarkOutcome(models=[m.name for m in models], datasets=[t["name"] for t in tasks])
    # every path first: a bad name is refused before any model loads
    fields = {(m.name, t["name"]): _fields(m, t, suite["name"], precision) for m in models for t in tasks}
    paths = {key: _output_path(output, **f) for key, f in fields.items()}
    clfs = {key: {k: str(_output_path(v, **f)) if v else None for k, v in (("save_clf", save_clf),
                                                                           ("load_clf", load_clf))}
            for key, f in fields.items()}
    for entry in models:
        todo = _plan(entry.name, tasks, paths, skip_existing, outcome, summary_folders)
        if todo and summary_folders:
            refusal = _summary_refusal(paths[(entry.name, tasks[0]["name"])].parent)
            if refusal is not None:
                outcome.failed.update({(entry.name, t["name"]): refusal for t in todo})
                print(f"FAILED {entry.name}: {refusal}")
                continue
        if not todo:
            continue
        try:
            model = load(entry.spec)
        except Exception as e:  # noqa: BLE001 - one model that does not load must not stop the others
            for t in todo:
                outcome.failed[(entry.name, t["name"])] = f"model {entry.spec} did not load: {_reason(e)}"
            print(f"FAILED {entry.name}: model {entry.spec} did not load: {_reason(e)}")
            continue
        result = SuiteResult()
        if summary_folders:  # the summary lists the results kept from before too
            kept = {t["name"]: _read_report(paths[(entry.name, t["name"])]) for t in tasks
                    if (entry.name, t["name"]) in outcome.existing}
            result.results.update({name: report for name, report in kept.items() if report is not None})
        bar = progress_bar(todo, desc=entry.name, unit="task", enabled=progress)
        for task in bar:
            key = (entry.name, task["name"])
            path = paths[key]
            bar.set_postfix(dataset=task["name"])
            try:
                with inference_precision(precision):
                    report = run_task(task, model, entry.name if entry.alias else entry.spec, progress,
                                      confusion_png=path.with_suffix(".confusion.png") if summary_folders else None,
                                      batch_size=batch_size, recall_k=recall_k, **clfs[key])
            except MissingSourceError as e:
                if not task.get("optional"):
                    outcome.failed[key] = _reason(e)
                    print(f"FAILED {entry.name} / {task['name']}: {_reason(e)}")
                else:
                    outcome.skipped[key] = result.skipped[task["name"]] = str(e)
                    print(f"skipped {entry.name} / {task['name']}: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - a broken data set is named, the other results still come
                logger.debug("%s on %s failed", entry.name, task["name"], exc_info=True)
                outcome.failed[key] = _reason(e)
                print(f"FAILED {entry.name} / {task['name']}: {_reason(e)}")
                continue
            if entry.alias:
                report["pretrained"] = entry.spec
            report["suite_task"] = task["name"]
            outcome.written[key] = write_json(report, path)
            outcome.reports[key] = result.results[task["name"]] = report
            print(f"{entry.name} / {task_line(task['name'], report)} -> {path}")
        bar.close()
        if summary_folders:
            write_summary(result, suite["name"], entry.spec, paths[(entry.name, tasks[0]["name"])].parent)
        del model  # released before the next model loads: one model in memory at a time
    return outcome


def _plan(name: str, tasks: Sequence[dict], paths: dict[tuple[str, str], Path], skip_existing: bool,
          outcome: BenchmarkOutcome, summary_folders: bool = False) -> list[dict]:
    """The tasks to run for model ``name``: not those whose result exists (``skip_existing``), nor those whose
    path holds a file that is not a result, nor (``summary_folders``) those whose confusion PNG's path holds a
    file we did not write (named as failed: a user's file is never replaced)."""
    todo = []
    for t in tasks:
        key, path = (name, t["name"]), paths[(name, t["name"])]
        if skip_existing and path.is_file():
            outcome.existing[key] = path
            print(f"{name} / {t['name']}: exists, skipped ({path})")
            continue
        refusal = _refusal(path)
        if refusal is None and summary_folders and t["task"] == "zeroshot":  # the one kind that draws a figure
            refusal = _figure_refusal(path.with_suffix(".confusion.png"), beside_our_result=path.exists())
        if refusal is not None:
            outcome.failed[key] = refusal
            print(f"FAILED {name} / {t['name']}: {refusal}")
        else:
            todo.append(t)
    return todo


def _read_report(path: Path) -> Optional[dict]:
    """A kept result, or None (logged) when the file is not one: it stays out of the summary, untouched."""
    try:
        return read_result(path)
    except (OSError, ValueError):
        logger.warning("%s is not an evaluation result; left out of the summary", path)
        return None


def _headline(report: dict) -> str:
    m = report["metrics"]
    if "image_retrieval_recall@1" in m:
        return f"R@1 {100 * m['image_retrieval_recall@1']:.1f}"
    return f"acc1 {100 * m['acc1']:.1f}"


def format_summary(outcome: BenchmarkOutcome) -> str:
    """A markdown table of models against data sets (headline metric, ``exists``, ``skipped`` or ``FAILED``),
    then each failure with its reason.

    Example:
        >>> print(format_summary(outcome))
        | model | emoji-categories | broken |
        ...
    """
    lines = ["| model | " + " | ".join(outcome.datasets) + " |", "|---" * (len(outcome.datasets) + 1) + "|"]
    for name in outcome.models:
        cells = []
        for dataset in outcome.datasets:
            key = (name, dataset)
            cells.append(_headline(outcome.reports[key]) if key in outcome.reports else "exists" if key in outcome.existing
                         else "skipped" if key in outcome.skipped else "FAILED" if key in outcome.failed else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(f"\n{len(outcome.written)} written, {len(outcome.existing)} already there, "
                 f"{len(outcome.skipped)} skipped (data not installed), {len(outcome.failed)} failed")
    lines += [f"failed: {model} / {dataset}: {reason}" for (model, dataset), reason in outcome.failed.items()]
    return "\n".join(lines)
