"""``vlp embed``: encode a corpus into a folder of embedding shards (resumable, multi-process)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .options import (add_batch_options, add_corpus_options, add_model_option, add_progress_option, console_logging,
                      corpus_config)

DESCRIPTION = """\
Encode every image and every caption of a corpus with a model's eval preprocessing, into OUT:

  OUT/image/000000.npy ...      (rows, D) unit-norm embeddings; undecodable images are zero rows
  OUT/text/000000.npy ...       (captions, D), the captions of the shard's rows in row order
  OUT/meta/000000.parquet ...   row, image, captions, ok, and the corpus's extra columns
  OUT/text_meta/000000.parquet  row, caption
  OUT/manifest.json             model signature, dim, dtype, counts; written when all shards are done

An interrupted export resumes from its finished shards when rerun with the same arguments; a finished
one is left as it is. OUT holding an export of another model or other arguments is an error, and so is
a second `vlp embed` into an OUT that one is writing (the processes of one launch share it).

From WebDataset shards (DATA: a shard folder, its manifest.json or "shards/{00000..00099}.tar") the
samples are streamed, never listed: embedding shard k holds input shard k's samples (--shard-size is
unused), meta's image column is each sample's original path from its .json (else shard.tar:key), the
.json's fields are its extra columns, and bad samples are skipped and named in manifest.json's "input".

Several processes (GPUs, or gloo processes on a CPU-only machine), shard k encoded by process k % N:
  accelerate launch --multi_gpu --num_processes N -m vlpretrain.cli.main embed --model M --data D --out OUT"""


def add_parser(commands) -> None:
    p = commands.add_parser("embed", help="export image and text embeddings of a corpus as .npy shards",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_option(p)
    add_corpus_options(p)
    p.add_argument("--out", required=True, help="output folder (created; rerun with the same one to resume)")
    p.add_argument("--modality", choices=("image", "text", "both"), default="both",
                   help="which embeddings to export (default: both)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="storage type of the embeddings (default: float16)")
    p.add_argument("--shard-size", type=int, default=10_000,
                   help="corpus rows per shard (default: 10000; unused for WebDataset shards: one per input shard)")
    add_batch_options(p, workers=4, what="per export process")
    add_progress_option(p)
    p.set_defaults(run=run)


def run(args) -> int:
    import torch
    from accelerate import Accelerator

    from ..models import load_model
    from ..retrieval.embedding_set import MANIFEST_NAME
    from ..retrieval.embeddings import export_embeddings
    from ..data.named import data_spec, open_named_corpus

    data = corpus_config(args)
    modalities = ("image", "text") if args.modality == "both" else (args.modality,)
    # cpu=True when there is no GPU is what lets `accelerate launch` run gloo processes on a CPU box.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    with console_logging("vlp embed" if accelerator.is_main_process else f"vlp embed [rank {accelerator.process_index}]",
                         logging.INFO if accelerator.is_main_process else logging.WARNING):
        # The main process first: opening emoji:SPLIT builds the demo corpus once, not once per process.
        with accelerator.main_process_first():
            corpus = open_named_corpus(args.data, data, args.split)
        model = load_model(args.model)
        was_finished = (Path(args.out) / MANIFEST_NAME).is_file()
        emb = export_embeddings(model, corpus, args.out, spec=str(args.model), data_spec=data_spec(args.data, args.split, data),
                                modalities=modalities, dtype=args.dtype, shard_size=args.shard_size,
                                batch_size=args.batch_size, num_workers=args.num_workers,
                                progress=not args.no_progress, accelerator=accelerator)
    if accelerator.is_main_process:
        c = emb.counts
        parts = ([f"{c['image']} images ({c['bad_images']} bad)"] if "image" in emb.modalities else []) + \
                ([f"{c['text']} captions"] if "text" in emb.modalities else [])
        prefix = "already finished, nothing to do: " if was_finished else ""
        skipped = emb.manifest.get("input", {}).get("skipped_samples")
        parts += [f"{skipped} bad samples skipped"] if skipped else []
        print(f"{prefix}embedded {c['rows']} rows of {args.data}: {', '.join(parts)}; dim {emb.dim}, "
              f"{emb.manifest['dtype']}, {emb.num_shards} shards in {emb.path}")
    return 0
