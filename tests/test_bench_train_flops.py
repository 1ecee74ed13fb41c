"""tools/bench_train.py --flops: the FLOP count of a small open_clip ViT against a count by hand, and the
utilization arithmetic and peak lookup of the MFU report."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "tools" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def transformer_flops(layers: int, tokens: int, width: int) -> int:
    """Per sample: q, k, v and out projections 8 n w^2, MLP (4x) 16 n w^2, scores and weighted sum 4 n^2 w."""
    return layers * (24 * tokens * width**2 + 4 * tokens**2 * width)


def test_training_flops_of_a_small_vit_equal_a_count_by_hand(bench_train):
    image, patch, vision_width, text_width, context, embed = 32, 8, 32, 48, 8, 16
    cfg = {"embed_dim": embed,
           "vision_cfg": {"image_size": image, "patch_size": patch, "width": vision_width, "layers": 2,
                          "head_width": 16},
           "text_cfg": {"context_length": context, "vocab_size": 100, "width": text_width, "heads": 3, "layers": 3}}
    patches = (image // patch) ** 2
    patch_conv = 2 * patches * 3 * patch**2 * vision_width
    forward = (patch_conv + transformer_flops(2, patches + 1, vision_width) + transformer_flops(3, context, text_width)
               + 2 * vision_width * embed + 2 * text_width * embed)
    # Backward is twice the forward, but for the patch convolution's input (the image), whose gradient is not needed.
    assert bench_train.training_flops_per_pair(cfg) == 3 * forward - patch_conv


def test_flop_utilization_and_the_peak_of_a_card(bench_train):
    report = {"results": {"open_clip_train": {"pairs_per_s": 100.0}, "vlp": {"pairs_per_s": 125.0}}}
    bench_train.add_flop_utilization(report, 4e10, 989.4)
    assert report["training_flops_per_pair"] == 4e10 and report["peak_tflops"] == 989.4
    assert report["results"]["vlp"]["achieved_tflops"] == pytest.approx(5.0)
    assert report["results"]["open_clip_train"]["model_flops_utilization"] == pytest.approx(4.0 / 989.4)
    bench_train.add_flop_utilization(report, 4e10, None)
    assert report["results"]["vlp"]["model_flops_utilization"] is None
    peaks = {name: bench_train.peak_bf16_tflops(name) for name in
             ("NVIDIA H100 PCIe", "NVIDIA H100 80GB HBM3", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA L40S",
              "NVIDIA L40", "NVIDIA L4", "Tesla T4")}
    assert peaks == {"NVIDIA H100 PCIe": 756.0, "NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 NVL": 835.5,
                     "NVIDIA H200": 989.4, "NVIDIA L40S": 362.1, "NVIDIA L40": 181.0, "NVIDIA L4": 121.0,
                     "Tesla T4": None}


@pytest.mark.parametrize("argv, message", [
    (["--flops", "--effective-batch", "8"], "--flops goes with the open_clip_train comparison, not --effective-batch"),
    (["--peak-tflops", "100"], "--peak-tflops needs --flops"),
])
def test_flops_options_that_do_not_go_together(bench_train, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(sys, "argv", ["bench_train.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        bench_train.parse_args()
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip().endswith(f"error: {message}")
