"""Evaluation suites: a YAML list of tasks (data, labels, class names, templates) run in one go,
one JSON per task plus a summary table in markdown and CSV.

Suite format (paths relative to the suite file)::

    name: demo
    tasks:
      - name: emoji-categories
        task: zeroshot                 # zeroshot | linear_probe | knn | retrieval
        data: emoji:test
        label_column: category
        classnames: ../classnames/emoji-categories.txt
        templates: ["an emoji of {c}.", "a {c} emoji."]
        optional: false                # true: skip, with the reason, when the data is not installed
      - name: emoji-retrieval
        task: retrieval                # image-text Recall@k over a captioned corpus
        data: emoji:test
        caption_column: caption
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from ..io import write_csv, write_json, write_text

logger = logging.getLogger(__name__)

_TASK_KEYS = {"name", "task", "data", "train", "label_column", "image_column", "split", "classnames",
              "templates", "k", "k_shot", "optional", "caption_column"}


@dataclass
class SuiteResult:
    results: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _resolve(value: Any, base: Path) -> Any:
    """Relative file paths in a suite are relative to the suite file."""
    if isinstance(value, str) and not value.partition(":")[1] and (base / value).exists():
        return str(base / value)
    if isinstance(value, str) and value.endswith((".txt", ".json", ".csv", ".jsonl", ".parquet", ".tsv")):
        return str(base / value)
    return value


def load_suite(path: Union[str, Path]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: suite file not found")
    suite = yaml.safe_load(path.read_text()) or {}
    tasks = suite.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ValueError(f"{path}: a suite needs a non-empty 'tasks' list")
    for i, task in enumerate(tasks):
        unknown = set(task) - _TASK_KEYS
        if unknown:
            raise ValueError(f"{path}: task {i + 1} has unknown keys {sorted(unknown)} (known: {sorted(_TASK_KEYS)})")
        for key in ("name", "task", "data"):
            if key not in task:
                raise ValueError(f"{path}: task {i + 1} has no '{key}'")
        for key in ("data", "train", "classnames", "templates"):
            if key in task:
                task[key] = _resolve(task[key], path.parent)
    suite.setdefault("name", path.stem)
    return suite


def run_suite(suite_path: Union[str, Path], model, model_name: str, out_dir: Union[str, Path],
              progress: bool = True) -> SuiteResult:
    """Run every task of a suite; writes ``OUT/<task>.json``, ``OUT/summary.md`` and ``OUT/summary.csv``."""
    from ..data.labelled import open_labelled_images
    from ..data.rendered import MissingSourceError
    from .tasks import evaluate_knn, evaluate_linear_probe, evaluate_retrieval, evaluate_zeroshot

    suite = load_suite(suite_path)
    out_dir = Path(out_dir)
    result = SuiteResult()
    for task in suite["tasks"]:
        name, kind = task["name"], task["task"]
        columns = dict(label_column=task.get("label_column", "label"), image_column=task.get("image_column", "image"),
                       split=task.get("split"))
        try:
            if kind == "retrieval":
                from ..config import DataConfig
                from ..data.named import open_named_corpus

                data_cfg = DataConfig(image_column=columns["image_column"],
                                      caption_column=task.get("caption_column", "caption"))
                corpus = open_named_corpus(task["data"], data_cfg, columns["split"])
                report = evaluate_retrieval(model, corpus, progress=progress, model_name=model_name,
                                            dataset_name=task["data"])
            elif kind == "zeroshot":
                data = open_labelled_images(task["data"], **columns)
                report = evaluate_zeroshot(model, data, task.get("classnames"), task.get("templates", "openai_imagenet"),
                                           progress=progress, model_name=model_name,
                                           confusion_png=out_dir / f"{name}.confusion.png")
            elif kind in ("linear_probe", "knn"):
                data = open_labelled_images(task["data"], **columns)
                train = open_labelled_images(task["train"], **columns)
                if kind == "knn":
                    report = evaluate_knn(model, train, data, task.get("classnames"), k=task.get("k", 20),
                                          k_shot=task.get("k_shot"), progress=progress, model_name=model_name)
                else:
                    report = evaluate_linear_probe(model, train, data, task.get("classnames"), k_shot=task.get("k_shot"),
                                                   progress=progress, model_name=model_name)
            else:
                raise ValueError(f"task '{name}': unknown task kind '{kind}' (zeroshot, linear_probe, knn, retrieval)")
        except MissingSourceError as e:
            if not task.get("optional"):
                raise
            result.skipped[name] = str(e)
            logger.warning("skipped %s: %s", name, e)
            print(f"skipped {name}: {e}")
            continue
        report["suite_task"] = name
        write_json(report, out_dir / f"{name}.json")
        result.results[name] = report
        m = report["metrics"]
        if kind == "retrieval":
            print(f"{name}: text->image R@1 {100 * m['image_retrieval_recall@1']:.1f}% "
                  f"(chance {100 * m['chance_image_retrieval_recall@1']:.1f}%), image->text R@1 "
                  f"{100 * m['text_retrieval_recall@1']:.1f}%")
        else:
            print(f"{name}: mean per-class recall {100 * m['mean_per_class_recall']:.1f}% "
                  f"(chance {100 / m['num_classes']:.1f}%), acc1 {100 * m['acc1']:.1f}%")
    write_summary(result, suite["name"], model_name, out_dir)
    return result


def _pct(value: Optional[float]) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def write_summary(result: SuiteResult, suite_name: str, model_name: str, out_dir: Path) -> None:
    # One table for every kind: classification rows leave the retrieval columns empty and back.
    header = ["task", "kind", "dataset", "images", "classes", "acc1", "acc5", "mean_per_class_recall", "chance",
              "template_min", "template_max", "text_to_image_R@1", "text_to_image_R@10", "image_to_text_R@1"]
    rows = []
    for name, report in result.results.items():
        m = report["metrics"]
        if "image_retrieval_recall@1" in m:
            rows.append([name, report["task"], report["dataset"], m["num_images"], "", "", "", "",
                         _pct(m["chance_image_retrieval_recall@1"]), "", "", _pct(m["image_retrieval_recall@1"]),
                         _pct(m.get("image_retrieval_recall@10")), _pct(m["text_retrieval_recall@1"])])
            continue
        spread = m.get("template_spread", {})
        rows.append([name, report["task"], report["dataset"], m["num_samples"], m["num_classes"], _pct(m["acc1"]),
                     _pct(m["acc5"]), _pct(m["mean_per_class_recall"]), _pct(1 / m["num_classes"]),
                     _pct(spread.get("min")), _pct(spread.get("max")), "", "", ""])
    write_csv(out_dir / "summary.csv", header, rows)
    lines = [f"# {suite_name}: {model_name}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    for name, reason in result.skipped.items():
        lines.append(f"\nskipped {name}: {reason}")
    write_text(out_dir / "summary.md", "\n".join(lines) + "\n")
