"""Result JSONs merged into one table, as ``clip_benchmark build`` merges them: one row per result with
CLIP_benchmark's columns, and a pivot of models against data sets (one headline metric per task).

Example:
    >>> reports = read_results(["results/"])
    >>> header, rows = results_rows(reports)
    >>> header[:6]
    ['dataset', 'model', 'pretrained', 'task', 'language', 'precision']
    >>> print(markdown_table(*pivot_rows(reports)))
"""

from __future__ import annotations

import glob
import logging
import math
import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..io import read_json, write_csv, write_text

__all__ = ["ID_COLUMNS", "PIVOT_METRICS", "RESULT_KEYS", "read_result", "read_results", "results_rows", "pivot_rows",
           "markdown_table", "build_results_table"]

logger = logging.getLogger(__name__)

ID_COLUMNS = ["dataset", "model", "pretrained", "task", "language", "precision"]
# CLIP_benchmark's metric names, in its order; recall@k columns follow for every k found.
BASE_METRICS = ["acc1", "acc5", "mean_per_class_recall", "mean_average_precision"]
_RECALL = re.compile(r"^(image|text)_retrieval_recall@(\d+)$")
# The pivot's one number per (model, data set): what CLIP_benchmark's published tables show.
PIVOT_METRICS = {"zeroshot_classification": "acc1", "linear_probe": "acc1", "knn": "acc1",
                 "zeroshot_retrieval": "image_retrieval_recall@5"}
# What every result JSON of ours holds (``metrics`` an object): the one test of "is this a result".
RESULT_KEYS = ("dataset", "metrics", "model", "task")


def read_result(path: Union[str, Path]) -> dict:
    """The evaluation result JSON at ``path``; a file that is not JSON, or not a result, is a one-line
    ValueError naming it (an unreadable path an OSError).

    Example:
        >>> read_result("results/eval/demo/demo-emoji/emoji-categories.json")["metrics"]["acc1"]
        0.62
    """
    data = read_json(path)
    if not (isinstance(data, dict) and set(RESULT_KEYS) <= set(data) and isinstance(data["metrics"], dict)):
        raise ValueError(f"{path}: not an evaluation result (needs {', '.join(RESULT_KEYS)})")
    return data


def read_results(specs: Sequence[Union[str, Path]]) -> list[tuple[Path, dict]]:
    """The result JSONs that files, folders (searched recursively) and glob patterns name, in order. A file
    named directly must be a result (one-line error otherwise); other JSONs found in folders are skipped.

    Example:
        >>> [path.name for path, _ in read_results(["results/run1", "extra.json"])]
    """
    found: list[tuple[Path, bool]] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found += [(p, False) for p in sorted(path.rglob("*.json"))]
        elif path.is_file():
            found.append((path, True))
        else:
            matches = sorted(glob.glob(str(spec), recursive=True))
            if not matches:
                raise FileNotFoundError(f"{spec}: no such result file or folder, and no file matches it")
            found += [(Path(m), False) for m in matches if Path(m).is_file()]
    results, ignored = [], 0
    for path, named in dict.fromkeys(found):
        try:
            data = read_result(path)
        except ValueError:
            if named:
                raise
            ignored += 1
            continue
        results.append((path, data))
    if ignored:
        logger.warning("%d JSON files that are not evaluation results were left out", ignored)
    if not results:
        raise ValueError(f"no evaluation results in {', '.join(map(str, specs))}")
    return results


def _number(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""  # as pandas writes NaN (CLIP_benchmark's acc5 below 5 classes)
    return value


def results_rows(results: Sequence[tuple[Path, dict]]) -> tuple[list[str], list[list[Any]]]:
    """CLIP_benchmark's long table: :data:`ID_COLUMNS`, then the metrics any result has (acc1, acc5,
    mean_per_class_recall, image_retrieval_recall@k, text_retrieval_recall@k for each k), empty where absent.
    ``dataset`` is a suite's task name where the result has one (``suite_task``).

    Example:
        >>> header, rows = results_rows(read_results(["results/"]))
    """
    present = {name for _, r in results for name in r["metrics"]}
    recalls = sorted((n for n in present if _RECALL.match(n)),
                     key=lambda n: (_RECALL.match(n).group(1) == "text", int(_RECALL.match(n).group(2))))
    metrics = [n for n in BASE_METRICS if n in present] + recalls
    header = ID_COLUMNS + metrics
    rows = [[_dataset(r) if c == "dataset" else r.get(c, "") for c in ID_COLUMNS]
            + [_number(r["metrics"].get(n)) for n in metrics] for _, r in results]
    return header, rows


def _dataset(report: dict) -> str:
    # A suite may evaluate one data set twice (other labels): its task name tells the results apart, and
    # it is what {dataset} put in the file name.
    return report.get("suite_task") or report["dataset"]


def pivot_rows(results: Sequence[tuple[Path, dict]], metric: Optional[str] = None) -> tuple[list[str], list[list[Any]]]:
    """Models (rows) against data sets (columns, ``dataset (metric)``): ``metric`` for every cell, or each
    task's :data:`PIVOT_METRICS`. A later result for the same model and data set replaces an earlier one
    (with a warning naming both files).

    Example:
        >>> header, rows = pivot_rows(read_results(["results/"]))
        >>> header
        ['model', 'emoji-categories (acc1)', 'emoji-retrieval (image_retrieval_recall@5)']
    """
    columns: dict[tuple[str, str], str] = {}
    cells: dict[tuple[str, tuple[str, str]], Any] = {}
    origin: dict[tuple[str, tuple[str, str]], Path] = {}
    models: list[str] = []
    weights: dict[str, set] = {}
    for _, r in results:
        weights.setdefault(r["model"], set()).add(r.get("pretrained") or "")
    for path, r in results:
        name = metric or PIVOT_METRICS.get(r["task"], "acc1")
        column = (_dataset(r), r["task"])
        columns.setdefault(column, f"{_dataset(r)} ({name})")
        # CLIP_benchmark's "model pretrained" where one model name comes with several weights
        model = r["model"] if len(weights[r["model"]]) == 1 else f"{r['model']} {r.get('pretrained') or ''}".strip()
        if model not in models:
            models.append(model)
        if (model, column) in origin:
            logger.warning("%s replaces %s in the pivot (same model, data set and task)", path, origin[(model, column)])
        origin[(model, column)] = path
        cells[(model, column)] = _number(r["metrics"].get(name))
    header = ["model"] + list(columns.values())
    return header, [[model] + [cells.get((model, c), "") for c in columns] for model in models]


def _cell(value: Any, percent: bool) -> str:
    if isinstance(value, float):
        return f"{100 * value:.1f}" if percent else f"{value:.4g}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], percent: bool = True) -> str:
    """A markdown table; metric values as percentages with one decimal (``percent``).

    Example:
        >>> print(markdown_table(["model", "acc1"], [["a", 0.5]]))
        | model | acc1 |
        |---|---|
        | a | 50.0 |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v, percent) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def build_results_table(specs: Sequence[Union[str, Path]], out: Optional[Union[str, Path]] = None,
                        markdown: Optional[Union[str, Path]] = None, pivot: Optional[Union[str, Path]] = None,
                        metric: Optional[str] = None, overwrite: bool = False) -> dict[str, Any]:
    """Merge results into ``out`` (a CSV, or markdown when it ends in ``.md``), the pivot into ``pivot`` (CSV;
    default beside a CSV ``out``: ``NAME.pivot.csv``) and both tables into ``markdown``. Returns the tables
    and the paths written. A file already there is a one-line error, and nothing is written, unless
    ``overwrite``.

    Example:
        >>> build_results_table(["results/"], out="results/table.csv", markdown="results/table.md")["written"]
        [PosixPath('results/table.csv'), PosixPath('results/table.pivot.csv'), PosixPath('results/table.md')]
    """
    if out is not None and Path(out).suffix.lower() == ".md":
        markdown, out = out, None
    if out is not None:
        pivot = pivot or Path(out).with_suffix(".pivot.csv")
    targets = [(name, Path(path)) for name, path in (("--out", out), ("--pivot", pivot), ("--markdown", markdown))
               if path is not None]
    # checked before reading anything, so a refusal leaves every file as it was (as `vlp plot` does)
    for name, path in targets:
        if path.is_dir():
            raise ValueError(f"{name} {path}: is a folder; give a file name")
    existing = [(name, path) for name, path in targets if path.exists()]
    if existing and not overwrite:
        name, path = existing[0]
        raise ValueError(f"{path} already exists; pass --overwrite to replace it, or choose another {name}")
    results = read_results(specs)
    long_table, pivot_table = results_rows(results), pivot_rows(results, metric)
    text = (f"{markdown_table(*pivot_table)}\n\n{markdown_table(*long_table)}\n")
    written = []
    if out is not None:
        written.append(write_csv(out, *long_table))
    if pivot is not None:
        written.append(write_csv(pivot, *pivot_table))
    if markdown is not None:
        written.append(write_text(markdown, text))
    return {"rows": long_table, "pivot": pivot_table, "markdown": text, "written": written, "results": len(results)}
