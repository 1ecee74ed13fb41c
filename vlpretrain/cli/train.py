"""``vlp train RECIPE.yaml [key=value ...]``"""

from __future__ import annotations

import argparse

from ..config import all_keys, load_recipe
from ..training.preemption import PREEMPTED_EXIT_CODE


def add_parser(commands) -> None:
    p = commands.add_parser(
        "train", help="train a dual encoder from a YAML recipe",
        description="Train a dual encoder from a YAML recipe. Any recipe key can be overridden on the "
                    "command line as key=value, e.g. train.lr=1e-3 train.epochs=5 data.train=my.csv. "
                    "For several processes: accelerate launch --multi_gpu --num_processes N "
                    "-m vlpretrain.cli.main train RECIPE.yaml (on CPU this uses gloo). "
                    f"SIGTERM or SIGUSR1 (a cluster's pre-emption) finish the current step, write a checkpoint "
                    f"and exit with code {PREEMPTED_EXIT_CODE}; rerun with --resume auto to continue.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="recipe keys:\n  " + "\n  ".join(all_keys()))
    p.add_argument("recipe", help="path to a recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. train.lr=1e-3")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest checkpoint in train.output_dir, or start fresh when there is "
                        "none (--resume, --resume auto, --resume latest), or from the given folder")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..training import train

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    cfg = load_recipe(args.recipe, overrides)
    result = train(cfg)
    if result.preempted:
        print(f"pre-empted after step {result.step}: checkpoint written; rerun with --resume auto")
        return PREEMPTED_EXIT_CODE
    print(f"final model: {result.final_dir}")
    return 0
