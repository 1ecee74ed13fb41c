"""``vlp``: the command-line front of vlpretrain. Each subcommand parses, then calls the library."""

from __future__ import annotations

import argparse
import sys

from . import demo, embed, eval as eval_cli, index, train
from . import wise_ft
from . import export
from . import data as data_cli
from . import plot


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlp",
        description="CLIP-style vision-language pretraining: train dual encoders, evaluate, index.",
        epilog="Run 'vlp COMMAND --help' for the options of each command.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    train.add_parser(commands)
    demo.add_parser(commands)
    eval_cli.add_parser(commands)
    embed.add_parser(commands)
    index.add_parser(commands)
    wise_ft.add_parser(commands)
    export.add_parser(commands)
    data_cli.add_parser(commands)
    plot.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from pickle import UnpicklingError

    from safetensors import SafetensorError

    from ..data.images import BadImageError

    try:
        return int(args.run(args) or 0)
    except (ValueError, OSError, BadImageError, UnpicklingError, SafetensorError) as e:
        # Configuration, data and disk errors (missing files, full disk) and refused or unreadable files
        # are the user's to fix: one line (a library's many-line message, e.g. YAML's, joined into it).
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        print(f"vlp {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
