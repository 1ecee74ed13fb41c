"""``vlp wise-ft``: WiSE-FT weight interpolation between a zero-shot model and its fine-tune."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
WiSE-FT (Wortsman et al., 2022): mix the weights of a zero-shot model (alpha 0) and a fine-tune of it
(alpha 1), theta = (1 - alpha) * zeroshot + alpha * finetuned, tensor by tensor. Both must be the same
architecture. A model is a checkpoint folder, a recipe .yaml, open_clip:ARCH/TAG, open_clip:ARCH@FILE
or hf:NAME.

One alpha: write the interpolated checkpoint folder (load it with vlpretrain.load_model, or pass it
to vlp eval / vlp embed):

  vlp wise-ft --zeroshot open_clip:ViT-B-32/laion2b_s34b_b79k --finetuned runs/ft/final \\
      --alpha 0.5 --out runs/ft/wise-0.5

A sweep: run an evaluation suite at each alpha; writes DIR/alpha_<a>/ (the suite's reports, plus the
checkpoint with --keep-checkpoints), DIR/wise_ft.json, wise_ft.md and wise_ft.csv (rows alpha,
columns tasks: mean per-class recall for classification, Recall@1 for retrieval) and wise_ft.png
(metric against alpha, one line per task, dashed chance levels):

  vlp wise-ft --zeroshot A --finetuned B --sweep 0,0.25,0.5,0.75,1 \\
      --suite eval/suites/demo.yaml --out results/wise-ft"""


def add_parser(commands) -> None:
    p = commands.add_parser("wise-ft", help="mix a zero-shot model and its fine-tune (WiSE-FT), or sweep alpha",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zeroshot", required=True, metavar="MODEL", help="the model before fine-tuning (alpha 0)")
    p.add_argument("--finetuned", required=True, metavar="MODEL", help="the fine-tuned model (alpha 1)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--alpha", type=float, metavar="A",
                      help="one mixing weight in [0, 1]: write the interpolated checkpoint to --out")
    mode.add_argument("--sweep", metavar="A,B,...",
                      help="comma-separated alphas in [0, 1], e.g. 0,0.25,0.5,0.75,1: evaluate each with --suite")
    p.add_argument("--suite", default=None, metavar="SUITE",
                   help="evaluation suite YAML for --sweep, e.g. eval/suites/demo.yaml")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="checkpoint folder to write (--alpha), or the sweep's output folder (--sweep)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="--sweep: also save each interpolated checkpoint in DIR/alpha_<a>/")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def parse_alphas(text: str) -> list[float]:
    """``"0,0.25,1"`` -> ``[0.0, 0.25, 1.0]``; a bad entry is a one-line ValueError."""
    values = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            values.append(float(item))
        except ValueError:
            raise ValueError(f"--sweep: '{item}' is not a number (e.g. --sweep 0,0.25,0.5,0.75,1)") from None
    if not values:
        raise ValueError("--sweep: no alphas given (e.g. --sweep 0,0.25,0.5,0.75,1)")
    return values


def run(args) -> int:
    from ..io import check_replaceable
    from ..models.dual_encoder import CONFIG_NAME
    from ..evaluation.wise_ft import wise_ft_sweep
    from ..models.weight_interpolation import check_alpha, interpolate_weights

    if args.alpha is not None:
        if args.suite or args.keep_checkpoints:
            raise ValueError("--suite and --keep-checkpoints go with --sweep; --alpha writes one checkpoint to --out")
        check_alpha(args.alpha)
        out = Path(args.out)
        # save_pretrained replaces the folder: never a folder that holds something else.
        check_replaceable(out, [CONFIG_NAME], "vlpretrain checkpoint folder", "choose a new folder", name=f"--out {out}")
        model = interpolate_weights(args.zeroshot, args.finetuned, args.alpha)
        model.save_pretrained(out)
        print(f"written: {out} (alpha {args.alpha:g}: {1 - args.alpha:g} x {args.zeroshot} + "
              f"{args.alpha:g} x {args.finetuned})")
        return 0

    if not args.suite:
        raise ValueError("--sweep needs --suite (an evaluation suite YAML, e.g. eval/suites/demo.yaml)")
    # The sweep writes summaries, figures and alpha_* folders there: never into a folder of someone else's.
    check_replaceable(args.out, ["wise_ft.json"], "wise-ft sweep folder", "choose a new folder",
                      name=f"--out {args.out}")
    summary = wise_ft_sweep(args.zeroshot, args.finetuned, parse_alphas(args.sweep), args.suite, args.out,
                            keep_checkpoints=args.keep_checkpoints, progress=not args.no_progress)
    for task, best in summary["best"].items():
        metric = summary["tasks"][task]["metric"]
        print(f"{task}: best alpha {best['alpha']:g} ({metric} {100 * best['value']:.1f}%)")
    print(f"written: {Path(args.out) / 'wise_ft.md'} (and wise_ft.json, wise_ft.csv, wise_ft.png)")
    return 0
