"""``vlp eval run SUITE --model A --model B`` (models x data sets, CLIP_benchmark's workflow) and
``vlp eval build RESULTS... --out table.csv`` (results merged into one table), plus the options every
eval command shares: ``--precision`` and ``--recall-k``."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Callable

from ..inference_precision import PRECISIONS
from .options import add_progress_option

PRECISION_CHOICES = tuple(PRECISIONS)


def add_precision_option(p: argparse.ArgumentParser) -> None:
    """``--precision``: the precision of every forward (recorded in the result JSON)."""
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="fp32",
                   help="fp32 (default), or autocast to bf16 / fp16 (CLIP_benchmark's 'amp'); written into the JSON")


def add_recall_k_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recall-k", type=parse_recall_k, default=None, metavar="K,K,...",
                   help="retrieval: the k of Recall@k, e.g. 1,5,10,50 (default: 1,5,10)")


def parse_recall_k(text: str) -> tuple[int, ...]:
    """``"1,5,10,50"`` -> (1, 5, 10, 50): positive, distinct, ascending.

    Example:
        >>> parse_recall_k("10,1,5")
        (1, 5, 10)
    """
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers such as 1,5,10, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"each k must be 1 or more, got {text!r}")
    return tuple(values)


def in_precision(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command so all its encoding runs in ``args.precision``."""

    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> int:
        from ..inference import inference_precision

        with inference_precision(getattr(args, "precision", "fp32")):
            return run(args)

    return wrapped


def add_parsers(tasks) -> None:
    """Register ``run`` and ``build`` under ``vlp eval``."""
    r = tasks.add_parser("run", help="run an evaluation suite (eval/suites/*.yaml) on one or several models",
                         description="Run every task of a suite YAML on every model; one JSON per (model, task). "
                                     "With one model and no --output: OUT/<task>.json, summary.md and summary.csv. "
                                     "Optional tasks whose data is not installed are skipped with the reason; a "
                                     "model or data set that fails is named with its reason and the others carry "
                                     "on (exit status 1). Data may be wds:FOLDER (CLIP_benchmark's wds layout).")
    r.add_argument("suite", help="suite YAML, e.g. eval/suites/demo.yaml")
    r.add_argument("--model", action="append", default=[], metavar="[NAME=]SPEC",
                   help="a model (checkpoint folder, recipe, open_clip:ARCH[/TAG], hf:NAME), optionally named; repeat "
                        "for several")
    r.add_argument("--models", default=None, metavar="FILE", help="a text file with one [NAME=]SPEC per line")
    r.add_argument("--out", default=None,
                   help="output folder (default: results/eval/<suite>/<model name>; with several models, "
                        "one subfolder per model)")
    r.add_argument("--output", default=None, metavar="TEMPLATE",
                   help="one file per result instead, e.g. 'results/{dataset}_{model}_{task}.json' (fields: dataset, "
                        "model, pretrained, task, language, suite, precision)")
    r.add_argument("--skip-existing", action="store_true", help="leave results whose file exists alone (not re-run)")
    r.add_argument("--batch-size", type=int, default=256, help="images or texts per forward (default: 256)")
    add_recall_k_option(r)
    add_precision_option(r)
    r.add_argument("--save-clf", default=None, metavar="TEMPLATE",
                   help="zero-shot: save the class weights, e.g. 'clf/{dataset}_{model}.safetensors'")
    r.add_argument("--load-clf", default=None, metavar="TEMPLATE", help="zero-shot: use saved class weights")
    add_progress_option(r)
    r.set_defaults(run=run_models)

    b = tasks.add_parser("build", help="merge result JSONs into one table (CSV / markdown) and a models x data pivot",
                         description="Merge result JSONs (files, folders searched recursively, or glob patterns) "
                                     "into CLIP_benchmark's table: dataset, model, pretrained, task, language, "
                                     "precision and the metric columns; plus a pivot of models against data sets "
                                     "(acc1 for classification, image_retrieval_recall@5 for retrieval, or --metric).")
    b.add_argument("results", nargs="+", help="result JSON files, folders or glob patterns")
    b.add_argument("--out", default=None, help="the table: a .csv (the pivot goes beside it as NAME.pivot.csv) or .md")
    b.add_argument("--markdown", default=None, metavar="FILE", help="also both tables as markdown")
    b.add_argument("--pivot", default=None, metavar="FILE", help="the pivot CSV (default: beside --out)")
    b.add_argument("--metric", default=None, help="the pivot's metric for every cell, e.g. mean_per_class_recall")
    b.add_argument("--overwrite", action="store_true", help="replace --out / --pivot / --markdown if they exist")
    b.set_defaults(run=run_build)


def run_models(args: argparse.Namespace) -> int:
    from ..evaluation.benchmark_run import file_safe, format_summary, parse_models, read_models_file, run_benchmark

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    models = parse_models(list(args.model) + (read_models_file(args.models) if args.models else []))
    if args.output and args.out:
        raise ValueError("give --out (a folder) or --output (a file name template), not both")
    folders = args.output is None
    if args.output:
        template = args.output
    elif len(models) == 1:
        out = args.out or str(Path("results") / "eval" / Path(args.suite).stem / file_safe(models[0].name))
        template = str(Path(out) / "{dataset}.json")
    else:
        template = str(Path(args.out or Path("results") / "eval" / Path(args.suite).stem) / "{model}" / "{dataset}.json")
    outcome = run_benchmark(args.suite, models, template, skip_existing=args.skip_existing, precision=args.precision,
                            batch_size=args.batch_size, recall_k=args.recall_k, progress=not args.no_progress,
                            save_clf=args.save_clf, load_clf=args.load_clf, summary_folders=folders)
    if folders:
        for name in outcome.models:
            done = [p for (m, _), p in outcome.written.items() if m == name]
            if done:
                skipped = sum(1 for (m, _) in outcome.skipped if m == name)
                print(f"written: {done[0].parent}/summary.md ({len(done)} tasks, {skipped} skipped)")
    print(format_summary(outcome))
    return 1 if outcome.failed else 0


def run_build(args: argparse.Namespace) -> int:
    from ..evaluation.results_table import build_results_table

    built = build_results_table(args.results, out=args.out, markdown=args.markdown, pivot=args.pivot,
                                metric=args.metric, overwrite=args.overwrite)
    print(built["markdown"].split("\n\n")[0])
    print(f"{built['results']} results" + (f"; written: {', '.join(map(str, built['written']))}" if built["written"] else ""))
    return 0
