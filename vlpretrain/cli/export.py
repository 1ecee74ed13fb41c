"""``vlp export``: convert a model into an open_clip or transformers folder that loads without vlpretrain."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Convert a model (a checkpoint folder, a recipe .yaml, open_clip:ARCH[/TAG] or hf:NAME) into a folder
that its library loads on its own:

  --format open_clip  open_clip's hub layout: open_clip_config.json + open_clip_model.safetensors, and
                      the config.json and tokenizer files of a Hugging Face text tower. Works for every
                      model built on open_clip (ViT, timm, Hugging Face towers). Load it with
                        open_clip.create_model_and_transforms("local-dir:OUT")
                        open_clip.get_tokenizer("local-dir:OUT")
                      A Hugging Face text tower from a local folder is pointed at OUT by absolute path:
                      after moving OUT, update text_cfg.hf_model_name in open_clip_config.json.
  --format hf         a transformers CLIPModel (config.json + model.safetensors), CLIPTokenizer files and
                      a CLIPImageProcessor config, for models with open_clip's ViT image tower and text
                      transformer (timm or Hugging Face towers, attentional pooling and the like have no
                      CLIPModel equivalent: use --format open_clip). A model loaded from hf:NAME is saved
                      back in its own transformers format. Load it with
                        transformers.CLIPModel.from_pretrained("OUT")  (or AutoModel)
                        transformers.CLIPProcessor.from_pretrained("OUT")  (pad text to the context length
                        with padding="max_length" for the same token ids as vlpretrain)

OUT is written in a temporary folder beside it and moved into place when complete, so a failed export
leaves an older one intact. An existing OUT is replaced only when it is empty or a previous export (it
holds vlp_export.json); any other folder needs --force.

Example:
  vlp export runs/demo-emoji/final --format hf --out exports/demo-emoji-hf"""


def add_parser(commands) -> None:
    p = commands.add_parser("export", help="convert a model into an open_clip or transformers (HF CLIP) folder",
                            description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", metavar="CKPT",
                   help="the model: checkpoint folder, recipe .yaml, open_clip:ARCH[/TAG] or hf:NAME")
    p.add_argument("--format", required=True, choices=("open_clip", "hf"),
                   help="open_clip (any open_clip-based model) or hf (transformers CLIPModel)")
    p.add_argument("--out", required=True, metavar="OUT", help="output folder (replaced atomically)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT even when it is a non-empty folder that is not a previous export")
    p.set_defaults(run=run)


def run(args) -> int:
    import os

    from ..export import export_model, load_line

    path = export_model(args.ckpt, args.format, args.out, force=args.force)
    files = ", ".join(sorted(name for name in os.listdir(path) if not name.startswith(".")))
    print(f"wrote {path} (--format {args.format}): {files}")
    print("load it with:")
    print(f"  {load_line(path)}")
    return 0
