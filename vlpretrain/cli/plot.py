"""``vlp plot``: curves of one or several training runs side by side (loss, validation recall, the evaluation
suite during training, the health monitors), from their metrics.jsonl."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
Plot training runs side by side, one colour per run: training loss, validation recall@1, the metrics of
train.eval_suite (zero-shot during training) and the health monitors of train.monitor_every (effective
rank, modality gap, alignment / uniformity), and the logit scale. Panels without data are left out.
Writes FILE.png and the plotted numbers as FILE.json.

  vlp plot runs/demo-emoji runs/slip-emoji --out results/demo-vs-slip.png"""


def add_parser(commands) -> None:
    p = commands.add_parser("plot", help="plot the curves of training runs side by side",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="a run's output folder (holding metrics.jsonl)")
    p.add_argument("--out", required=True, metavar="FILE.png", help="the figure to write (and FILE.json)")
    p.add_argument("--labels", default=None, metavar="A,B,...", help="legend names, one per run (default: folders)")
    p.add_argument("--overwrite", action="store_true", help="replace FILE.png / FILE.json if they exist")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..training.run_plots import plot_runs, run_series

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: give a .png file name (the series go beside it as .json)")
    existing = [p for p in (out, out.with_suffix(".json")) if p.exists()]
    if existing and not args.overwrite:
        raise ValueError(f"{existing[0]} already exists; pass --overwrite to replace it, or choose another --out")
    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(args.runs):
        raise ValueError(f"--labels: {len(labels)} names for {len(args.runs)} runs; give one per run")
    png, data = plot_runs(run_series([Path(r) for r in args.runs], labels), out)
    print(f"written: {png} and {data} ({len(args.runs)} runs)")
    return 0
