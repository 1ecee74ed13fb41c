#!/usr/bin/env python
"""Train and evaluate one recipe over several seeds; report the mean and standard deviation.

Run-to-run noise on the emoji test split is several points of R@1, so one run per setting cannot tell
settings apart. For each seed this trains the recipe (with ``train.seed=S`` and ``train.output_dir=OUT/seed_S``
added to the overrides), scores test retrieval (Recall@1 / @10 in both directions, ``--retrieval-data``) and
zero-shot balanced accuracy (mean per-class recall of ``--zeroshot-task`` in ``--suite``), and writes
``OUT/seed_S/seed_result.json``; then ``OUT/seeds.json`` holds every metric's per-seed values, mean and
sample standard deviation (n - 1), and ``OUT/seeds.md`` the same as a table row.

    python tools/seeds.py --recipe recipes/demo-emoji.yaml --seeds 0,1,2 --out runs/seeds/demo

Equal wall-clock (``--minutes M``): a short probe run (``--probe-steps`` steps, no validation) measures this
recipe's seconds per optimizer step here, and every seed then trains ``train.max_steps = M * 60 / that``
steps, the schedule spread over the whole budget (validation and evaluation time not counted):

    python tools/seeds.py --recipe recipes/slip-emoji.yaml --seeds 0,1,2 --minutes 6 --out runs/seeds/slip

Several settings in one table (``--out`` a markdown file, the summaries beside it as JSON):

    python tools/seeds.py --combine runs/seeds/demo runs/seeds/slip --out results/seeds_table.md
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

# The repository's package, when this runs from a checkout without an install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlpretrain.io import write_json, write_text  # noqa: E402

RETRIEVAL_KEYS = ("image_retrieval_recall@1", "image_retrieval_recall@10", "text_retrieval_recall@1",
                  "text_retrieval_recall@10")


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; a bad or repeated entry is a one-line ValueError."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds {text!r}: give distinct non-negative integers, e.g. 0,1,2")
    return seeds


def train_seconds(run_dir: Path) -> float:
    """Seconds from the start of training to its last logged step (metrics.jsonl's ``elapsed_s``)."""
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "split" not in r and "elapsed_s" in r]
    return steps[-1]["elapsed_s"] if steps else float("nan")


def seconds_per_step(recipe: str, overrides: Sequence[str], out: Path, probe_steps: int) -> float:
    """Seconds per optimizer step of ``recipe`` here, from a ``probe_steps``-step run (its first 20% left out)."""
    from vlpretrain.config import load_recipe
    from vlpretrain.training import train

    cfg = load_recipe(recipe, [*overrides, f"train.output_dir={out}", f"train.max_steps={probe_steps}",
                               "train.validate_every_epoch=false", "train.overwrite=true", "train.log_every=1",
                               "train.eval_suite=null", "train.checkpoint_every=null"])
    train(cfg)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "split" not in r]
    skip = max(1, len(steps) // 5)
    first, last = steps[skip - 1], steps[-1]
    return (last["elapsed_s"] - first["elapsed_s"]) / max(last["step"] - first["step"], 1)


def run_seed(recipe: str, overrides: Sequence[str], seed: int, out: Path, retrieval_data: str,
             suite: Optional[str], zeroshot_task: Optional[str]) -> dict:
    """Train ``recipe`` with ``seed`` into ``out``, evaluate it, write ``out/seed_result.json``; returns it."""
    from vlpretrain.config import load_recipe
    from vlpretrain.data.named import open_named_corpus
    from vlpretrain.evaluation.suite import load_suite, run_task
    from vlpretrain.evaluation.tasks import evaluate_retrieval
    from vlpretrain.models import load_model
    from vlpretrain.training import train

    cfg = load_recipe(recipe, [*overrides, f"train.seed={seed}", f"train.output_dir={out}", "train.overwrite=true"])
    result = train(cfg)
    model = load_model(result.final_dir)
    retrieval = evaluate_retrieval(model, open_named_corpus(retrieval_data, cfg.data), progress=False,
                                   model_name=Path(recipe).stem, dataset_name=retrieval_data)["metrics"]
    metrics = {f"test_{key}": retrieval[key] for key in RETRIEVAL_KEYS}
    if suite and zeroshot_task:
        tasks = {task["name"]: task for task in load_suite(suite)["tasks"]}
        if zeroshot_task not in tasks:
            raise ValueError(f"--zeroshot-task {zeroshot_task}: not a task of {suite} ({', '.join(tasks)})")
        report = run_task(tasks[zeroshot_task], model, Path(recipe).stem, progress=False)
        metrics["zeroshot_balanced_accuracy"] = report["metrics"]["mean_per_class_recall"]
    record = {"seed": seed, "recipe": recipe, "overrides": list(overrides), "steps": result.step,
              "train_seconds": train_seconds(out), "metrics": metrics}
    write_json(record, out / "seed_result.json")
    return record


def summarize(per_seed: list[dict]) -> dict[str, dict]:
    """``{metric: {"values", "mean", "std"}}`` over the seeds (std: sample standard deviation, 0 for one seed).

    Example: ``summarize([{"metrics": {"a": 0.1}}, {"metrics": {"a": 0.3}}])["a"]["mean"]`` -> 0.2
    """
    out = {}
    for name in per_seed[0]["metrics"]:
        values = [r["metrics"][name] for r in per_seed]
        out[name] = {"values": values, "mean": statistics.fmean(values),
                     "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def table_row(label: str, summary: dict[str, dict], n: int) -> str:
    """One markdown row: ``label | n | R@1 t->i | R@10 t->i | R@1 i->t | R@10 i->t | zero-shot``, mean ± std in %."""
    keys = [f"test_{k}" for k in RETRIEVAL_KEYS] + ["zeroshot_balanced_accuracy"]
    cells = [f"{100 * summary[k]['mean']:.1f} ± {100 * summary[k]['std']:.1f}" if k in summary else "" for k in keys]
    return f"| {label} | {n} | " + " | ".join(cells) + " |"


TABLE_HEADER = ("| setting | seeds | text->image R@1 | text->image R@10 | image->text R@1 | image->text R@10 | "
                "zero-shot category bal. acc. |\n|---|---|---|---|---|---|---|")


def combine(folders: Sequence[Path], out: Path) -> str:
    """One table of several settings' ``seeds.json`` (each folder a ``--out`` of this tool), written to ``out``
    (markdown) and ``out`` with ``.json`` (every setting's summary); returns the table.

    Example: ``combine([Path("runs/seeds/demo"), Path("runs/seeds/slip")], Path("results/seeds_table.md"))``
    """
    settings = []
    for folder in folders:
        path = Path(folder) / "seeds.json"
        if not path.is_file():
            raise ValueError(f"{folder}: no seeds.json; run tools/seeds.py --out {folder} first")
        settings.append(json.loads(path.read_text()))
    rows = [table_row(s["label"], s["metrics"], len(s["seeds"])) for s in settings]
    table = TABLE_HEADER + "\n" + "\n".join(rows) + "\n"
    write_text(out, table)
    write_json(settings, out.with_suffix(".json"))
    return table


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help="recipe YAML, e.g. recipes/demo-emoji.yaml")
    parser.add_argument("--combine", nargs="+", metavar="FOLDER", default=None,
                        help="instead of training: one table of these --out folders' seeds.json, written to --out "
                             "(a .md file; the settings' summaries beside it as .json)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--out", required=True, help="output folder: OUT/seed_S/ runs, OUT/seeds.json")
    parser.add_argument("--label", default=None, help="the setting's name in seeds.md (default: the recipe's)")
    parser.add_argument("--retrieval-data", default="emoji:test", help="test retrieval corpus (default emoji:test)")
    parser.add_argument("--suite", default="eval/suites/demo.yaml", help="suite holding the zero-shot task")
    parser.add_argument("--zeroshot-task", default="emoji-categories", help="its task name ('' for none)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="equal wall-clock: train each seed this many minutes (steps from a probe run)")
    parser.add_argument("--probe-steps", type=int, default=30, help="steps of the --minutes probe (default 30)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier OUT/seeds.json")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. loss.name=slip")
    args = parser.parse_args(argv)
    if args.combine:
        try:
            print(combine([Path(f) for f in args.combine], Path(args.out)), end="")
        except ValueError as e:
            print(f"seeds: error: {e}", file=sys.stderr)
            return 2
        print(f"written: {args.out}")
        return 0
    if not args.recipe:
        parser.error("--recipe is required (or --combine)")
    try:
        seeds = parse_seeds(args.seeds)
        out = Path(args.out)
        if (out / "seeds.json").exists() and not args.overwrite:
            raise ValueError(f"{out / 'seeds.json'} already exists; pass --overwrite or choose another --out")
        overrides = list(args.overrides)
        seconds = None
        if args.minutes is not None:
            seconds = seconds_per_step(args.recipe, overrides, out / "probe", args.probe_steps)
            steps = max(1, math.floor(args.minutes * 60 / seconds))
            print(f"{args.recipe}: {seconds:.3f} s per step here: {steps} steps in {args.minutes:g} minutes")
            overrides.append(f"train.max_steps={steps}")
        per_seed = [run_seed(args.recipe, overrides, seed, out / f"seed_{seed}", args.retrieval_data,
                             args.suite or None, args.zeroshot_task or None) for seed in seeds]
    except (ValueError, OSError) as e:
        print(f"seeds: error: {e}", file=sys.stderr)
        return 2
    summary = summarize(per_seed)
    label = args.label or Path(args.recipe).stem
    command = "python tools/seeds.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    write_json({"recipe": args.recipe, "label": label, "overrides": overrides, "seeds": seeds, "command": command,
                "seconds_per_step": seconds, "metrics": summary}, out / "seeds.json")
    row = table_row(label, summary, len(seeds))
    write_text(out / "seeds.md", TABLE_HEADER + "\n" + row + "\n")
    print(TABLE_HEADER + "\n" + row)
    print(f"written: {out / 'seeds.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
