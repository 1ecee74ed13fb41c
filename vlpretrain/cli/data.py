"""``vlp data``: prepare data once. ``vlp data shard SRC --out DIR`` writes resized WebDataset shards."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .options import CORPUS_HELP, add_corpus_options, add_progress_option, corpus_config, console_logging

SHARD_DESCRIPTION = """\
Write a corpus as WebDataset tar shards (img2dataset's layout), each image decoded once, resized and
re-encoded, so training and evaluation stream small files instead of decoding the originals every epoch.

  DIR/00000.tar ...          shard k holds rows [k*S, (k+1)*S) of SRC (S = --shard-size); members per
                             sample, in key order: {key}.jpg|png|webp, {key}.txt (the first caption),
                             {key}.json (key, source, source_path, width, height, original_width,
                             original_height, "captions": [...] when several, extra columns)
  DIR/00000_stats.json ...   written, skipped, and each skipped row with its reason
  DIR/manifest.json          counts, settings, source, and each shard's samples, bytes and SHA-256
  DIR/.shard_state.json      source and settings, written first (a rerun must match them)

Keys are row numbers (000000000, 000000001, ...): the bytes are the same whatever --processes.
Transparent images are composited on white; resizing uses PIL's LANCZOS filter; an image larger than
--max-pixels by its header is skipped without being decoded; corrupt or truncated images are skipped.
Skips are counted and named in the stats, never an error. A killed run, rerun with the same arguments,
keeps the finished shards (tar and stats written) and rewrites the others.

Example:
  vlp data shard pairs.csv --out shards/pairs --image-size 224 --shard-size 10000 --processes 4
  vlp data shard emoji:train --out shards/emoji --max-side 64 --format png --shard-size 1000"""


def add_parser(commands) -> None:
    p = commands.add_parser("data", help="prepare data (write WebDataset shards)",
                            description="Prepare data once: `vlp data shard SRC --out DIR` writes resized shards.")
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    sub.required = True
    s = sub.add_parser("shard", help="write a corpus as resized WebDataset tar shards", description=SHARD_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("src", nargs="?", metavar="SRC", help=CORPUS_HELP)
    add_corpus_options(s, data_help="the corpus, as SRC (either one)", required=False)
    s.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (created; rerun with the same one to resume)")
    # Not an argparse mutually exclusive group: giving both is a one-line error from the writer.
    s.add_argument("--image-size", type=int, metavar="N", default=None,
                   help="resize so the shorter side is N pixels, aspect ratio kept, never enlarged")
    s.add_argument("--max-side", type=int, metavar="N", default=None,
                   help="resize so the longer side is at most N pixels, aspect ratio kept")
    s.add_argument("--shard-size", type=int, metavar="S", default=10_000,
                   help="samples (corpus rows) per tar (default: 10000)")
    s.add_argument("--format", dest="image_format", metavar="jpg|png|webp", default="jpg",
                   help="image encoding in the shards: jpg, png or webp (default: jpg)")
    s.add_argument("--quality", type=int, metavar="Q", default=95,
                   help="JPEG / WebP quality, 1 to 100 (default: 95; png ignores it)")
    s.add_argument("--processes", type=int, metavar="P", default=1,
                   help="writer processes, one shard each at a time (default: 1)")
    s.add_argument("--max-pixels", type=int, metavar="PIXELS", default=None,
                   help="skip (without decoding) images larger than this many pixels by their header "
                        "(default: PIL's limit, 178956970)")
    add_progress_option(s)
    s.set_defaults(run=run_shard)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def run_shard(args) -> int:
    from ..data.named import data_spec, open_named_corpus
    from ..data.shard_format import MANIFEST_NAME
    from ..data.shard_writer import DEFAULT_MAX_PIXELS, ShardSettings, write_shards

    if args.src and args.data and args.src != args.data:
        raise ValueError(f"SRC {args.src!r} and --data {args.data!r}: give the corpus once")
    src = args.src or args.data
    if not src:
        raise ValueError("SRC: name the corpus to shard, e.g. `vlp data shard pairs.csv --out shards/pairs`")
    # Settings first: a typo fails at once, not after a large corpus has been read.
    ShardSettings(shard_size=args.shard_size, image_size=args.image_size, max_side=args.max_side,
                  image_format=args.image_format, quality=args.quality,
                  max_pixels=DEFAULT_MAX_PIXELS if args.max_pixels is None else args.max_pixels).validate()
    data = corpus_config(args)
    started = time.perf_counter()
    with console_logging("vlp data shard"):
        corpus = open_named_corpus(src, data, args.split)
        manifest = write_shards(corpus, args.out, image_size=args.image_size, max_side=args.max_side,
                                shard_size=args.shard_size, image_format=args.image_format, quality=args.quality,
                                processes=args.processes, max_pixels=args.max_pixels,
                                source=data_spec(src, args.split, data), progress=not args.no_progress)
    counts = manifest["counts"]
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    reasons = ", ".join(f"{n} {kind}" for kind, n in sorted(counts["skipped_by_reason"].items()))
    skipped = f"skipped {counts['skipped']}" + (f" ({reasons}; named in *_stats.json)" if reasons else "")
    dropped = (f"; {counts['dropped_when_read']} rows dropped when reading {src} (listed in the manifest)"
               if counts["dropped_when_read"] else "")
    print(f"wrote {counts['written']} of {counts['rows']} rows of {src}, {skipped}{dropped}; "
          f"{manifest['num_shards']} shards, {_size(total_bytes)}, {time.perf_counter() - started:.1f} s")
    print(f"manifest: {Path(args.out) / MANIFEST_NAME}")
    return 0
