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
from typing import Any, Optional, Sequence, Union

import yaml

from ..io import write_csv, write_json, write_text

logger = logging.getLogger(__name__)

_TASK_KEYS = {"name", "task", "data", "train", "label_column", "image_column", "split", "classnames",
              "templates", "k", "k_shot", "optional", "caption_column", "recall_k"}


@dataclass
class SuiteResult:
    results: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _resolve(value: Any, base: Path) -> Any:
    """Relative file paths in a suite are relative to the suite file (also after ``wds:``)."""
    if isinstance(value, str) and value.startswith("wds:") and (base / value[4:]).is_dir():
        return "wds:" + str(base / value[4:])
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


CLIP_TASK_NAMES = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval",
                   "linear_probe": "linear_probe", "knn": "knn"}


def run_task(task: dict, model, model_name: str, progress: bool = True,
             confusion_png: Optional[Union[str, Path]] = None, batch_size: int = 256,
             recall_k: Optional[Sequence[int]] = None, save_clf: Optional[Union[str, Path]] = None,
             load_clf: Optional[Union[str, Path]] = None) -> dict:
    """One task of a suite (as :func:`load_suite` returns it) on ``model``: its report, not written.
    ``recall_k`` (retrieval) overrides the task's ``recall_k`` (default 1, 5, 10); ``save_clf`` /
    ``load_clf`` (zero-shot) save or load the class weights. A ``wds:PATH`` data set brings its own class
    names and templates, used when the task names none.

    Example:
        >>> run_task({"name": "cifar", "task": "zeroshot", "data": "wds:/data/wds_cifar10"}, model, "demo")["metrics"]["acc1"]
    """
    from ..data.wds_benchmark import open_benchmark_corpus, open_benchmark_images
    from .tasks import evaluate_knn, evaluate_linear_probe, evaluate_retrieval, evaluate_zeroshot

    name, kind = task["name"], task["task"]
    columns = dict(label_column=task.get("label_column", "label"), image_column=task.get("image_column", "image"),
                   split=task.get("split"))
    if kind == "retrieval":
        from ..config import DataConfig

        data_cfg = DataConfig(image_column=columns["image_column"], caption_column=task.get("caption_column", "caption"))
        corpus = open_benchmark_corpus(task["data"], data_cfg, columns["split"])
        return evaluate_retrieval(model, corpus, batch_size, progress=progress, model_name=model_name,
                                  dataset_name=task["data"], ks=tuple(recall_k or task.get("recall_k") or (1, 5, 10)))
    if kind == "zeroshot":
        data, classnames, templates = open_benchmark_images(task["data"], **columns)
        return evaluate_zeroshot(model, data, task.get("classnames", classnames),
                                 task.get("templates", templates or "openai_imagenet"), batch_size,
                                 progress=progress, model_name=model_name, confusion_png=confusion_png,
                                 save_clf=save_clf, load_clf=load_clf)
    if kind in ("linear_probe", "knn"):
        data, classnames, _ = open_benchmark_images(task["data"], **columns)
        # A wds folder holds both splits: the probe fits on its train split (CLIP_benchmark's linear probe).
        train_split = "train" if str(task["train"]).startswith("wds:") else columns["split"]
        train, _, _ = open_benchmark_images(task["train"], **{**columns, "split": train_split})
        if kind == "knn":
            return evaluate_knn(model, train, data, task.get("classnames", classnames), k=task.get("k", 20),
                                k_shot=task.get("k_shot"), batch_size=batch_size, progress=progress,
                                model_name=model_name)
        return evaluate_linear_probe(model, train, data, task.get("classnames", classnames), k_shot=task.get("k_shot"),
                                     batch_size=batch_size, progress=progress, model_name=model_name)
    raise ValueError(f"task '{name}': unknown task kind '{kind}' (zeroshot, linear_probe, knn, retrieval)")


def task_line(name: str, report: dict) -> str:
    """The one line a suite prints for a finished task."""
    m = report["metrics"]
    if "image_retrieval_recall@1" in m:
        return (f"{name}: text->image R@1 {100 * m['image_retrieval_recall@1']:.1f}% "
                f"(chance {100 * m['chance_image_retrieval_recall@1']:.1f}%), image->text R@1 "
                f"{100 * m['text_retrieval_recall@1']:.1f}%")
    return (f"{name}: mean per-class recall {100 * m['mean_per_class_recall']:.1f}% "
            f"(chance {100 / m['num_classes']:.1f}%), acc1 {100 * m['acc1']:.1f}%")


def run_suite(suite_path: Union[str, Path], model, model_name: str, out_dir: Union[str, Path],
              progress: bool = True) -> SuiteResult:
    """Run every task of a suite; writes ``OUT/<task>.json``, ``OUT/summary.md`` and ``OUT/summary.csv``."""
    from ..data.rendered import MissingSourceError

    suite = load_suite(suite_path)
    out_dir = Path(out_dir)
    result = SuiteResult()
    for task in suite["tasks"]:
        name = task["name"]
        try:
            report = run_task(task, model, model_name, progress, confusion_png=out_dir / f"{name}.confusion.png")
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
        print(task_line(name, report))
    write_summary(result, suite["name"], model_name, out_dir)
    return result


def _pct(value: Optional[float]) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


# The columns of summary.csv / summary.md: one table for every kind, classification rows leave the
# retrieval columns empty and back.
SUMMARY_HEADER = ["task", "kind", "dataset", "images", "classes", "acc1", "acc5", "mean_per_class_recall", "chance",
                  "template_min", "template_max", "text_to_image_R@1", "text_to_image_R@10", "image_to_text_R@1"]


def summary_header_lines() -> dict[str, tuple[int, str]]:
    """Where each summary file's header is (line index) and what it reads: how a rerun knows they are ours."""
    return {"summary.csv": (0, ",".join(SUMMARY_HEADER)), "summary.md": (2, "| " + " | ".join(SUMMARY_HEADER) + " |")}


def write_summary(result: SuiteResult, suite_name: str, model_name: str, out_dir: Path) -> None:
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
    write_csv(out_dir / "summary.csv", SUMMARY_HEADER, rows)
    markdown_header = summary_header_lines()["summary.md"][1]
    lines = [f"# {suite_name}: {model_name}", "", markdown_header, "|" + "---|" * len(SUMMARY_HEADER)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    for name, reason in result.skipped.items():
        lines.append(f"\nskipped {name}: {reason}")
    write_text(out_dir / "summary.md", "\n".join(lines) + "\n")
