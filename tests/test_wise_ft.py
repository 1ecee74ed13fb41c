"""WiSE-FT: weight interpolation, its errors, the alpha sweep over a suite, and ``vlp wise-ft``."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from PIL import Image

from vlpretrain.cli.main import main
from vlpretrain.models import build_model, load_model
from vlpretrain.evaluation.wise_ft import main_metric, wise_ft_sweep
from vlpretrain.models.weight_interpolation import interpolate_weights

from helpers import TINY_VISION, tiny_model_config, write_image_csv

ALPHAS = (0.0, 0.3, 1.0)


def _tiny(seed: int, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_model_config(**overrides)).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two tiny models of one architecture, saved as checkpoint folders."""
    root = tmp_path_factory.mktemp("wise")
    _tiny(0).save_pretrained(root / "zeroshot")
    _tiny(1).save_pretrained(root / "finetuned")
    return root / "zeroshot", root / "finetuned"


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """A folder of 3 colour classes x 3 images with a zero-shot and a k-NN task on it, and a retrieval task."""
    root = tmp_path_factory.mktemp("suite")
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    for name, rgb in colours.items():
        (root / "colours" / name).mkdir(parents=True)
        for i in range(3):
            shade = tuple(max(0, c - 40 * i) for c in rgb)
            Image.new("RGB", (24, 24), shade).save(root / "colours" / name / f"{i}.png")
    write_image_csv(root, 6)
    (root / "tiny.yaml").write_text(
        "name: tiny\n"
        "tasks:\n"
        "  - {name: colours, task: zeroshot, data: colours, templates: ['a {c} square.']}\n"
        "  - {name: colours-knn, task: knn, data: colours, train: colours, k: 1}\n"
        "  - {name: pairs, task: retrieval, data: pairs.csv}\n")
    return root / "tiny.yaml"


def test_interpolation_is_the_weighted_sum_of_the_state_dicts(checkpoints):
    zeroshot, finetuned = load_model(checkpoints[0]), load_model(checkpoints[1])
    # An integer buffer: never averaged, taken from the fine-tuned model.
    zeroshot.clip.register_buffer("seen", torch.tensor(3))
    finetuned.clip.register_buffer("seen", torch.tensor(8))
    a = {k: v.clone() for k, v in zeroshot.state_dict().items()}
    b = {k: v.clone() for k, v in finetuned.state_dict().items()}
    for alpha in ALPHAS:
        mixed = interpolate_weights(zeroshot, finetuned, alpha).state_dict()
        assert mixed.keys() == b.keys()
        for key in b:
            expected = b[key] if key == "clip.seen" else (1 - alpha) * a[key] + alpha * b[key]
            assert torch.equal(mixed[key], expected), (alpha, key)
    # The models handed in are left as they were.
    assert all(torch.equal(v, a[k]) for k, v in zeroshot.state_dict().items())
    assert all(torch.equal(v, b[k]) for k, v in finetuned.state_dict().items())


def test_alpha_0_and_1_reproduce_the_ends(checkpoints):
    zeroshot, finetuned = load_model(checkpoints[0]).eval(), load_model(checkpoints[1]).eval()
    torch.manual_seed(2)
    images = torch.randn(2, 3, 32, 32)
    tokens = zeroshot.tokenizer(["a red square", "a blue square"])
    with torch.no_grad():
        for alpha, end in ((0, zeroshot), (1, finetuned)):
            model = interpolate_weights(str(checkpoints[0]), str(checkpoints[1]), alpha).eval()
            assert torch.equal(model.encode_image(images), end.encode_image(images))
            assert torch.equal(model.encode_text(tokens), end.encode_text(tokens))
            assert model.logit_scale.item() == end.logit_scale.item()


def test_architecture_mismatch_and_alpha_range_errors(checkpoints, tmp_path):
    wide = tmp_path / "wide"
    _tiny(2, vision={**TINY_VISION, "width": 48}).save_pretrained(wide)
    with pytest.raises(ValueError) as e:
        interpolate_weights(str(checkpoints[0]), str(wide), 0.5)
    assert str(e.value) == (f"cannot interpolate {checkpoints[0]} and {wide}: not the same architecture (first "
                            f"difference: open_clip_model_cfg.vision_cfg.width: 32 vs 48); WiSE-FT needs a model "
                            f"and a fine-tune of it")

    extra = load_model(checkpoints[1])
    extra.clip.register_buffer("extra", torch.zeros(2))
    with pytest.raises(ValueError) as e:
        interpolate_weights(load_model(checkpoints[0]), extra, 0.5)
    assert str(e.value) == ("cannot interpolate zeroshot model and finetuned model: not the same architecture (first "
                            "difference: weight clip.extra only in finetuned model); WiSE-FT needs a model and a "
                            "fine-tune of it")

    for alpha in (1.5, -0.1, math.nan):
        with pytest.raises(ValueError) as e:
            interpolate_weights(str(checkpoints[0]), str(checkpoints[1]), alpha)
        assert str(e.value) == f"alpha must be between 0 and 1 (0 = zero-shot, 1 = fine-tuned), got {alpha}"


def test_sweep_writes_json_markdown_csv_and_plot(checkpoints, suite, tmp_path):
    out = tmp_path / "sweep"
    summary = wise_ft_sweep(str(checkpoints[0]), str(checkpoints[1]), [0, 0.5, 1], suite, out,
                            keep_checkpoints=True, progress=False)
    assert json.loads((out / "wise_ft.json").read_text()) == summary
    assert [r["alpha"] for r in summary["results"]] == [0, 0.5, 1]
    assert summary["tasks"]["colours"] == {"task": "zeroshot_classification", "dataset": "colours",
                                           "metric": "mean_per_class_recall", "chance": pytest.approx(1 / 3)}
    assert summary["tasks"]["colours-knn"]["metric"] == "mean_per_class_recall"
    assert summary["tasks"]["pairs"] == {"task": "zeroshot_retrieval", "dataset": str(suite.parent / "pairs.csv"),
                                         "metric": "image_retrieval_recall@1", "chance": pytest.approx(1 / 6)}
    for result in summary["results"]:
        assert set(result["tasks"]) == {"colours", "colours-knn", "pairs"}
        recalls = {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
        assert set(result["tasks"]["pairs"]) == recalls
        assert result["tasks"]["colours-knn"]["mean_per_class_recall"] == 1.0  # 1-NN on its own training set
    assert summary["best"]["colours-knn"] == {"alpha": 0, "value": 1.0}  # ties: the smaller alpha

    rows = list(csv.reader((out / "wise_ft.csv").read_text().splitlines()))
    assert rows[0] == ["alpha", "colours", "colours-knn", "pairs"]
    assert [row[0] for row in rows[1:]] == ["0", "0.5", "1"]
    assert rows[1][2] == "100.00"
    markdown = (out / "wise_ft.md").read_text()
    assert "| alpha | colours | colours-knn | pairs |" in markdown
    assert "| 0.5 |" in markdown and "| best alpha |" in markdown
    assert (out / "wise_ft.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files

    # Each alpha: the suite's reports and, kept, a checkpoint of the mixed weights.
    assert (out / "alpha_0.5" / "colours.json").is_file() and (out / "alpha_0.5" / "summary.md").is_file()
    mixed = load_model(out / "alpha_0.5").state_dict()
    expected = interpolate_weights(str(checkpoints[0]), str(checkpoints[1]), 0.5).state_dict()
    assert all(torch.equal(mixed[k], expected[k]) for k in expected)
    report = json.loads((out / "alpha_1" / "colours.json").read_text())["metrics"]
    assert summary["results"][2]["tasks"]["colours"]["mean_per_class_recall"] == report["mean_per_class_recall"]


def test_main_metric_of_a_retrieval_report():
    metrics = {f"{d}_recall@{k}": k / 20 for d in ("image_retrieval", "text_retrieval") for k in (1, 5, 10)}
    metrics["chance_image_retrieval_recall@1"] = 0.01
    name, kept, chance = main_metric({"task": "zeroshot_retrieval", "metrics": metrics})
    assert name == "image_retrieval_recall@1" and chance == 0.01
    assert kept == {k: v for k, v in metrics.items() if not k.startswith("chance")}


def test_cli_alpha_and_sweep(checkpoints, suite, tmp_path, capsys):
    zeroshot, finetuned = str(checkpoints[0]), str(checkpoints[1])
    models, out = ["--zeroshot", zeroshot, "--finetuned", finetuned], tmp_path / "wise-0.25"
    assert main(["wise-ft", *models, "--alpha", "0.25", "--out", str(out)]) == 0
    assert f"written: {out}" in capsys.readouterr().out
    saved = load_model(out).state_dict()
    expected = interpolate_weights(zeroshot, finetuned, 0.25).state_dict()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)

    sweep = tmp_path / "sweep"
    args = ["wise-ft", *models, "--sweep", "0,1", "--suite", str(suite), "--out", str(sweep), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "colours-knn: best alpha 0 (mean_per_class_recall 100.0%)" in printed
    assert {p.name for p in sweep.iterdir()} >= {"alpha_0", "alpha_1", "wise_ft.json", "wise_ft.md", "wise_ft.csv",
                                                 "wise_ft.png"}
    assert not (sweep / "alpha_0" / "model.safetensors").exists()  # no --keep-checkpoints

    errors = {
        ("--sweep", "0,1"): "--sweep needs --suite (an evaluation suite YAML, e.g. eval/suites/demo.yaml)",
        ("--sweep", "0,x", "--suite", str(suite)): "--sweep: 'x' is not a number (e.g. --sweep 0,0.25,0.5,0.75,1)",
        ("--alpha", "2"): "alpha must be between 0 and 1 (0 = zero-shot, 1 = fine-tuned), got 2.0",
    }
    for extra, message in errors.items():
        assert main(["wise-ft", *models, *extra, "--out", str(tmp_path / "x")]) == 2
        assert capsys.readouterr().err.strip() == f"vlp wise-ft: error: {message}"
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    rc = main(["wise-ft", *models, "--alpha", "0.5", "--out", str(tmp_path / "busy")])
    assert rc == 2 and capsys.readouterr().err.strip() == (
        f"vlp wise-ft: error: --out {tmp_path / 'busy'}: exists and is not a vlpretrain checkpoint folder; "
        f"choose a new folder")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    rc = main(["wise-ft", *models, "--sweep", "0,1", "--suite", str(suite), "--out", str(tmp_path / "busy")])
    assert rc == 2 and capsys.readouterr().err.strip() == (
        f"vlp wise-ft: error: --out {tmp_path / 'busy'}: exists and is not a wise-ft sweep folder; choose a new folder")
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]
