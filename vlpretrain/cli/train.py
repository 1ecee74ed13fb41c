"""``vlp train RECIPE.yaml [key=value ...]``"""

from __future__ import annotations

import argparse

from ..config import all_keys, load_recipe


def add_parser(commands) -> None:
    p = commands.add_parser(
        "train", help="train a dual encoder from a YAML recipe",
        description="Train a dual encoder from a YAML recipe. Any recipe key can be overridden on the "
                    "command line as key=value, e.g. train.lr=1e-3 train.epochs=5 data.train=my.csv. "
                    "For several processes: accelerate launch --multi_gpu --num_processes N "
                    "-m vlpretrain.cli.main train RECIPE.yaml (on CPU this uses gloo).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="recipe keys:\n  " + "\n  ".join(all_keys()))
    p.add_argument("recipe", help="path to a recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. train.lr=1e-3")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest checkpoint in train.output_dir (or from the given folder)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..training import train

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    cfg = load_recipe(args.recipe, overrides)
    result = train(cfg)
    print(f"final model: {result.final_dir}")
    return 0
