#!/usr/bin/env python
"""Data path throughput: original image files against WebDataset shards, and ours against open_clip_train.

It makes its own corpus of large RGBA PNGs (nothing downloaded) and measures, in one run:

- shard writing (``vlp data shard``'s ``write_shards``): images/s per process, for 1 and 2 processes;
- decode + augment + tokenize throughput (pairs/s) of the training data path, from the PNGs (a CSV read by
  ``ImageTextDataset``) and from the shards (``ShardStream``), with the same transform and workers;
- ``vlp train`` pairs/s from the CSV and from the shards (same model, batch, threads, workers, fp32);
- ``vlp train`` from the shards against ``python -m open_clip_train.main --dataset-type webdataset`` on the
  same shards, model, batch size, image size, threads, workers and precision (ratio);
- peak memory of ``vlp embed`` over shard sets of growing size (it should stay flat): the process tree's
  RSS, and its PSS, which counts once the pages the decoding worker shares with its parent.

    python tools/bench_data.py --out results/bench_data.json
    python tools/bench_data.py --images 300 --embed-samples 20000,200000 --out results/bench_data.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import re
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import DEFAULT_MODEL, readable, run, run_measured, throughput  # noqa: E402


def make_corpus(folder: Path, count: int, min_mp: float, max_mp: float, seed: int) -> Path:
    """``count`` RGBA PNGs of ``min_mp`` to ``max_mp`` megapixels (soft shapes on transparency, like clip
    art) and a CSV of them with a caption naming the shape and its colour."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40)}
    rows = ["image,caption"]
    for i in range(count):
        pixels = rng.uniform(min_mp, max_mp) * 1e6
        aspect = rng.uniform(0.6, 1.6)
        width, height = int((pixels * aspect) ** 0.5), int((pixels / aspect) ** 0.5)
        name, rgb = rng.choice(sorted(colours.items()))
        shape = rng.choice(["circle", "square"])
        image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
        draw = ImageDraw.Draw(image)
        box = [rng.randint(0, width // 3), rng.randint(0, height // 3), rng.randint(2 * width // 3, width - 1),
               rng.randint(2 * height // 3, height - 1)]
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=rgb + (255,))
        path = folder / f"{i:05d}.png"
        image.save(path, compress_level=1)  # fast to write; decoding cost is what is measured
        rows.append(f"{path},a {name} {shape}")
    csv = folder / "pairs.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def bench_write(csv: Path, work: Path, image_size: int, shard_size: int) -> tuple[dict, Path]:
    from vlpretrain.data.named import open_named_corpus
    from vlpretrain.data.shard_writer import write_shards

    corpus = open_named_corpus(str(csv))
    results = {}
    for processes in (1, 2):
        out = work / f"shards-p{processes}"
        start = time.perf_counter()
        manifest = write_shards(corpus, out, image_size=image_size, shard_size=shard_size, processes=processes,
                                source=str(csv), progress=False)
        seconds = time.perf_counter() - start
        results[f"processes_{processes}"] = {"images_per_s": len(corpus) / seconds,
                                             "images_per_s_per_process": len(corpus) / seconds / processes,
                                             "seconds": seconds, "shards": len(manifest["shards"])}
    return results, work / "shards-p1"


def _bench_model(work: Path):
    from vlpretrain.config import ModelConfig
    from vlpretrain.models.factory import build_model

    model_dir = work / "model"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": DEFAULT_MODEL}))
    return model_dir, build_model(ModelConfig(arch=str(model_dir / "open_clip_config.json")))


def bench_decode(csv: Path, shards: Path, work: Path, workers: int, batch_size: int) -> dict:
    """pairs/s of the training data path alone (decode, resize-crop, augment, tokenize, collate)."""
    from torch.utils.data import DataLoader

    from vlpretrain.data import ImageTextDataset, collate_image_text
    from vlpretrain.data.named import open_named_corpus
    from vlpretrain.data.shard_dataset import ShardStream
    from vlpretrain.data.shard_format import resolve_shards

    _, model = _bench_model(work)
    corpus = open_named_corpus(str(csv))
    sources = {
        "original_files": ImageTextDataset(corpus, model.preprocess_train, model.tokenizer, caption_choice="random"),
        "shards": ShardStream(resolve_shards(shards), model.preprocess_train, model.tokenizer, shuffle_buffer=256),
    }
    results = {}
    for name, dataset in sources.items():
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(0)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_image_text)
        start, pairs = time.perf_counter(), 0
        for batch in loader:
            pairs += batch["image"].shape[0]
        results[name] = {"pairs_per_s": pairs / (time.perf_counter() - start), "pairs": pairs}
    results["ratio_shards_to_files"] = results["shards"]["pairs_per_s"] / results["original_files"]["pairs_per_s"]
    return results


def _vlp_train(data: str, work: Path, name: str, args, env: dict, num_samples: int) -> dict:
    model_dir = work / "model"
    recipe = {
        "model": {"arch": str(model_dir / "open_clip_config.json")},
        "data": {"train": data, "num_workers": args.workers,
                 **({"train_num_samples": num_samples, "shuffle_buffer": 256} if name == "shards" else {})},
        "train": {"output_dir": str(work / f"train-{name}"), "epochs": args.epochs, "batch_size": args.batch_size,
                  "lr": 1e-4, "warmup_steps": 2, "precision": "no", "log_every": args.log_every,
                  "threads": args.threads, "progress": False, "checkpoint_every": 0},
    }
    path = work / f"recipe-{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "vlpretrain.cli.main", "train", str(path)]
    peak, wall = run(cmd, env, work / f"train-{name}.log")
    records = [json.loads(line) for line in (work / f"train-{name}" / "metrics.jsonl").read_text().splitlines()]
    step_times = [args.batch_size / r["samples_per_s"] for r in records if "samples_per_s" in r][1:]
    return {"pairs_per_s": throughput(step_times, args.batch_size), "peak_memory_mib": peak, "wall_s": wall,
            "command": readable(cmd, work)}


def _open_clip_train(shards: Path, work: Path, args, env: dict, num_samples: int) -> dict:
    tars = sorted(shards.glob("*.tar"))
    pattern = str(shards / f"{{{tars[0].stem}..{tars[-1].stem}}}.tar")
    cmd = [sys.executable, "-m", "open_clip_train.main", "--dataset-type", "webdataset", "--train-data", pattern,
           "--train-num-samples", str(num_samples), "--model", f"local-dir:{work / 'model'}",
           "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--lr", "1e-4", "--warmup", "2",
           "--workers", str(args.workers), "--device", "cpu", "--precision", "fp32",
           "--log-every-n-steps", str(args.log_every), "--logs", str(work / "open_clip_logs"), "--name", "bench",
           "--save-frequency", "0", "--report-to", "", "--seed", "0"]
    peak, wall = run(cmd, env, work / "open_clip.log")
    step_times = [float(x) for x in re.findall(r"Batch \(t\): ([0-9.]+)", (work / "open_clip.log").read_text())][1:]
    return {"pairs_per_s": throughput(step_times, args.batch_size), "peak_memory_mib": peak, "wall_s": wall,
            "command": readable(cmd, work)}


def bench_train(csv: Path, shards: Path, work: Path, args, env: dict, num_samples: int) -> dict:
    results = {"vlp_csv": _vlp_train(str(csv), work, "csv", args, env, num_samples),
               "vlp_shards": _vlp_train(str(shards), work, "shards", args, env, num_samples),
               "open_clip_train_shards": _open_clip_train(shards, work, args, env, num_samples)}
    results["ratio_shards_to_csv"] = results["vlp_shards"]["pairs_per_s"] / results["vlp_csv"]["pairs_per_s"]
    results["ratio_vlp_to_open_clip_train"] = (results["vlp_shards"]["pairs_per_s"]
                                               / results["open_clip_train_shards"]["pairs_per_s"])
    return results


def _tiny_shards(folder: Path, samples: int, per_shard: int = 10_000) -> Path:
    """``samples`` small JPEG samples (one 32 px image, a caption each), written straight with tarfile."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 60, 60)).save(buffer, format="JPEG")
    jpg = buffer.getvalue()
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range((samples + per_shard - 1) // per_shard):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(shard * per_shard, min((shard + 1) * per_shard, samples)):
                for ext, data in (("jpg", jpg), ("txt", f"sample {i}".encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def bench_embed_memory(work: Path, sizes: list[int], env: dict, workers: int) -> dict:
    _, model = _bench_model(work)
    checkpoint = work / "checkpoint"
    model.save_pretrained(checkpoint)
    results = {}
    for size in sizes:
        shards = _tiny_shards(work / f"embed-shards-{size}", size)
        cmd = [sys.executable, "-m", "vlpretrain.cli.main", "embed", "--model", str(checkpoint), "--data", str(shards),
               "--out", str(work / f"embed-{size}"), "--num-workers", str(workers), "--no-progress"]
        measured = run_measured(cmd, env, work / f"embed-{size}.log", proportional=True)
        results[str(size)] = {**measured, "samples_per_s": size / measured["wall_s"]}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="PNGs in the generated corpus (default: 2000)")
    parser.add_argument("--min-mp", type=float, default=1.0, help="smallest image, megapixels (default: 1)")
    parser.add_argument("--max-mp", type=float, default=4.0, help="largest image, megapixels (default: 4)")
    parser.add_argument("--image-size", type=int, default=128, help="shorter side in the shards (default: 128)")
    parser.add_argument("--shard-size", type=int, default=100, help="samples per shard (default: 100)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--log-every", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--embed-samples", default="20000,200000",
                        help="shard-set sizes for vlp embed's peak memory (default: 20000,200000; empty: skip)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: write,decode,train,embed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench_data.json")
    args = parser.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    report: dict = {"benchmark": "data_path", "settings": {k: v for k, v in vars(args).items() if k != "out"},
                    "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version()},
                    "command": "python tools/bench_data.py " + " ".join(sys.argv[1:])}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        csv = make_corpus(work / "pngs", args.images, args.min_mp, args.max_mp, args.seed)
        report["corpus"] = {"images": args.images, "seconds_to_generate": time.perf_counter() - start,
                            "bytes": sum(p.stat().st_size for p in (work / "pngs").glob("*.png"))}
        print(f"corpus: {args.images} PNGs, {report['corpus']['bytes'] / 2**20:.0f} MiB", flush=True)
        _bench_model(work)
        report["shard_writing"], shards = bench_write(csv, work, args.image_size, args.shard_size)
        print("shard writing:", json.dumps(report["shard_writing"]), flush=True)
        if "decode" not in skip:
            report["decode_augment"] = bench_decode(csv, shards, work, args.workers, args.batch_size)
            print("decode + augment:", json.dumps(report["decode_augment"]), flush=True)
        if "train" not in skip:
            report["training"] = bench_train(csv, shards, work, args, env, args.images)
            print("training:", json.dumps({k: v for k, v in report["training"].items() if k.startswith("ratio")}),
                  flush=True)
        sizes = [int(s) for s in args.embed_samples.split(",") if s.strip()]
        if "embed" not in skip and sizes:
            report["embed_peak_memory"] = bench_embed_memory(work, sizes, env, args.workers)
            print("embed peak memory:", json.dumps(report["embed_peak_memory"]), flush=True)
    from vlpretrain.io import write_json

    path = write_json(report, args.out)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
