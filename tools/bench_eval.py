#!/usr/bin/env python
"""Zero-shot evaluation speed: ``vlp eval zeroshot`` (``evaluate_zeroshot``) against CLIP_benchmark 1.6.2's
``clip_benchmark.metrics.zeroshot_classification.evaluate``, in one run, on the same model, images, class
names, templates, batch size and precision.

Both sides are timed from the decoded-nothing state to the metrics: class weights from the prompts, every
image read, decoded and preprocessed with ``model.preprocess`` in the main process (no loader workers on
either side), encoded, scored. CLIP_benchmark gets a ``DataLoader`` over the same images; its ``amp`` is
autocast to the same dtype as our ``--precision`` (``torch.set_autocast_dtype``). Reported: images/s of each
(the best of ``--repeats``, the two sides alternating), their ratio (ours / theirs; above 1 is faster), and both acc1 (equal in fp32).

    .venv/bin/pip install --no-deps clip_benchmark==1.6.2      # once; its metrics need scikit-learn (installed)
    python tools/bench_eval.py --model runs/lit-minilm-emoji/final             # writes results/bench_eval.json
    python tools/bench_eval.py --model M --data wds:/data/wds_cifar10 --precision bf16 --device cuda
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

INSTALL = ".venv/bin/pip install --no-deps clip_benchmark==1.6.2"


def _timed_interleaved(runs: list[Callable[[], dict]], repeats: int) -> list[tuple[float, dict]]:
    """Best time and last result of each run, the runs alternating (A B A B ...) so that a change in the
    machine's load during the benchmark falls on both sides."""
    best = [(float("inf"), {}) for _ in runs]
    for _ in range(repeats):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            result = run()
            best[i] = (min(best[i][0], time.perf_counter() - start), result)
    return best


class _Images(torch.utils.data.Dataset):
    """The benchmark's images for CLIP_benchmark: (preprocessed image, class index), decoded on access."""

    def __init__(self, images: list, targets: list[int], preprocess: Callable, classes: list[str]):
        self.images, self.targets, self.preprocess, self.classes = images, targets, preprocess, classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from vlpretrain.data.images import load_rgb

        return self.preprocess(load_rgb(self.images[i])), self.targets[i]


def _accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple = (1,)) -> list[float]:
    """CLIP_benchmark 1.6.2's ``accuracy``, with ``.item()`` where it calls ``float()`` on a 1-element array,
    which NumPy 2.4 refuses (TypeError); the same numbers, computed after the timed work."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="what vlpretrain.load_model takes")
    p.add_argument("--data", default="emoji:test", help="labelled images, as vlp eval zeroshot --data (default: emoji:test)")
    p.add_argument("--label-column", default="category")
    p.add_argument("--classnames", default="eval/classnames/emoji-categories.txt",
                   help="as --classnames of vlp eval zeroshot; 'none' for the data's own")
    p.add_argument("--templates", default="eval/templates/emoji.txt", help="a template file or set; 'none' for the data's own")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--limit", type=int, default=None, help="only the first N images (a quick check)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each side; the best counts (default: 1)")
    p.add_argument("--out", default="results/bench_eval.json")
    args = p.parse_args(argv)
    try:
        from clip_benchmark.metrics import zeroshot_classification as clip_zeroshot
    except ImportError:
        print(f"bench_eval: clip_benchmark is not installed; install it with: {INSTALL}", file=sys.stderr)
        return 2
    clip_zeroshot.accuracy = _accuracy

    from vlpretrain.data.labelled import LabelledImages
    from vlpretrain.data.wds_benchmark import open_benchmark_images
    from vlpretrain.evaluation.classnames import load_classnames, match_labels
    from vlpretrain.evaluation.tasks import evaluate_zeroshot
    from vlpretrain.evaluation.templates import load_templates
    from vlpretrain.inference import PRECISIONS, inference_precision
    from vlpretrain.io import write_json
    from vlpretrain.models import load_model

    data, own_classnames, own_templates = open_benchmark_images(args.data, args.label_column)
    classnames = own_classnames if args.classnames == "none" else args.classnames
    templates = load_templates(own_templates if args.templates == "none" else args.templates)
    images = list(data.images)[:args.limit]  # held in memory: both sides then read the same bytes / paths
    keys, readable, targets = match_labels(data.labels[:len(images)], load_classnames(classnames), data.name)
    model = load_model(args.model).to(args.device).eval()

    def ours(count: int) -> dict:
        subset = LabelledImages(images[:count], data.labels[:count], data.sources[:count], data.name)
        with inference_precision(args.precision):
            m = evaluate_zeroshot(model, subset, dict(zip(keys, readable)), templates, args.batch_size, progress=False)
        return m["metrics"]

    def theirs(count: int) -> dict:
        loader = torch.utils.data.DataLoader(_Images(images[:count], targets[:count], model.preprocess, readable),
                                             batch_size=args.batch_size, num_workers=0)
        dtype = PRECISIONS[args.precision]
        device_type = torch.device(args.device).type
        before = torch.get_autocast_dtype(device_type)
        if dtype is not None:
            torch.set_autocast_dtype(device_type, dtype)  # their amp=True autocasts to this dtype
        try:
            return clip_zeroshot.evaluate(model, loader, model.tokenizer, readable,
                                          [t.replace("{}", "{c}") for t in templates], args.device,
                                          amp=dtype is not None)
        finally:
            torch.set_autocast_dtype(device_type, before)

    n = len(images)
    ours(args.batch_size), theirs(args.batch_size)  # warm-up (allocator, kernels) of both on one batch
    (ours_s, ours_m), (theirs_s, theirs_m) = _timed_interleaved([lambda: ours(n), lambda: theirs(n)], args.repeats)
    result: dict[str, Any] = {
        "command": "python tools/bench_eval.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "model": args.model, "data": args.data, "images": n, "classes": len(keys), "templates": len(templates),
        "batch_size": args.batch_size, "precision": args.precision, "device": args.device,
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "ours": {"seconds": round(ours_s, 3), "images_per_s": round(n / ours_s, 1), "acc1": ours_m["acc1"],
                 "mean_per_class_recall": ours_m["mean_per_class_recall"]},
        "clip_benchmark": {"seconds": round(theirs_s, 3), "images_per_s": round(n / theirs_s, 1),
                           "acc1": theirs_m["acc1"], "mean_per_class_recall": theirs_m["mean_per_class_recall"]},
        "ratio": round(theirs_s / ours_s, 3),
        "versions": {"torch": torch.__version__, "clip_benchmark": _version("clip_benchmark"),
                     "python": platform.python_version()},
    }
    print(f"{n} images, {len(keys)} classes, {len(templates)} templates, batch {args.batch_size}, {args.precision} on "
          f"{args.device}: ours {result['ours']['images_per_s']} images/s, CLIP_benchmark "
          f"{result['clip_benchmark']['images_per_s']} images/s, ratio {result['ratio']} "
          f"(acc1 {ours_m['acc1']:.4f} / {theirs_m['acc1']:.4f})")
    print(f"written: {write_json(result, args.out)}")
    return 0


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    sys.exit(main())
