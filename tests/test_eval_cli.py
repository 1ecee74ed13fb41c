"""`vlp eval zeroshot | linear-probe | knn | run` on small labelled sets, and their one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlpretrain.cli.main import main as cli_main
from vlpretrain.data import rendered
from vlpretrain.evaluation.suite import run_suite
from vlpretrain.models import load_model

from helpers import vlp

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def _class_folders(root: Path, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            noise = rng.integers(-20, 20, (16, 16, 3))
            Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype("uint8")).save(root / name / f"{i}.png")
    return root


def _table(root: Path, name: str) -> Path:
    folders = _class_folders(root / f"{name}_images")
    lines = ["image,label"] + [f"{p.relative_to(root)},{p.parent.name}" for p in sorted(folders.rglob("*.png"))]
    (root / f"{name}.csv").write_text("\n".join(lines) + "\n")
    return root / f"{name}.csv"


@pytest.mark.slow
def test_zeroshot_on_class_folders_writes_json_and_png(tmp_path, checkpoint):
    data = _class_folders(tmp_path / "data")
    out, png = tmp_path / "zs.json", tmp_path / "cm.png"
    proc = vlp("eval", "zeroshot", "--model", str(checkpoint), "--data", str(data), "--templates", "openai_imagenet_7",
               "--output", str(out), "--confusion-png", str(png), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "zeroshot_classification on data (12 images, 3 classes)" in proc.stdout
    report = json.loads(out.read_text())
    assert set(report) >= {"dataset", "model", "pretrained", "task", "metrics", "language"}
    m = report["metrics"]
    assert math.isnan(m["acc5"])  # fewer than 5 classes
    assert len(m["confusion_matrix"]) == 3 and sum(map(sum, m["confusion_matrix"])) == 12
    assert len(m["per_template"]) == 7 and m["template_spread"]["min"] <= m["template_spread"]["max"]
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("setup, args, message", [
    ("folders", ["--templates", "openai_imagnet"], "unknown template set 'openai_imagnet'"),
    ("folders", ["--classnames", "red,green"], "labels 'blue' are not among the 2 class names (mismatched label names?)"),
    ("empty_class", [], "class 'green' has no images (empty subfolder"),
    ("empty", [], "no images found (expected one subfolder of images per class)"),
])
def test_zeroshot_errors_are_one_line(tmp_path, checkpoint, setup, args, message, capsys):
    data = tmp_path / "data"
    if setup == "folders":
        _class_folders(data)
    elif setup == "empty_class":
        _class_folders(data)
        for f in (data / "green").iterdir():
            f.unlink()
    else:
        data.mkdir()
    # In-process (the same main() the console script runs): four subprocesses cost a minute of imports.
    code = cli_main(["eval", "zeroshot", "--model", str(checkpoint), "--data", str(data), "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
@pytest.mark.parametrize("task", ["linear-probe", "knn"])
def test_linear_probe_and_knn_on_tables(tmp_path, checkpoint, task):
    train, test = _table(tmp_path, "fit"), _table(tmp_path, "score")
    out = tmp_path / f"{task}.json"
    proc = vlp("eval", task, "--model", str(checkpoint), "--train", str(train), "--test", str(test),
               "--k-shot", "3", "--output", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["task"] == task.replace("-", "_") and report["metrics"]["num_train"] == 9
    assert report["metrics"]["acc1"] > 0.9  # colours are trivially separable on frozen random features


def test_suite_writes_reports_and_skips_missing_optional_data(tmp_path, checkpoint, monkeypatch):
    table = _table(tmp_path, "colours")
    (tmp_path / "templates.txt").write_text("a photo of {c}.\n{c}\n")
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"""
name: tiny
tasks:
  - {{name: colours, task: zeroshot, data: {table.name}, templates: templates.txt}}
  - {{name: colours-knn, task: knn, data: {table.name}, train: {table.name}, k: 3}}
  - {{name: stamps, task: zeroshot, data: "tuxpaint:", label_column: category, optional: true}}
""")
    monkeypatch.setattr(rendered, "TUXPAINT_STAMPS", tmp_path / "not-installed")
    result = run_suite(suite, load_model(checkpoint), "tiny", tmp_path / "out", progress=False)
    assert set(result.results) == {"colours", "colours-knn"}
    assert "install Debian's tuxpaint-stamps-default" in result.skipped["stamps"]
    assert json.loads((tmp_path / "out" / "colours.json").read_text())["metrics"]["num_classes"] == 3
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| colours | zeroshot_classification |" in summary and "skipped stamps" in summary
    assert (tmp_path / "out" / "summary.csv").read_text().startswith("task,kind,dataset")


@pytest.mark.slow
def test_readme_zero_shot_example_runs_as_written(tmp_path, checkpoint, monkeypatch):
    """The README's Python example, with the demo checkpoint swapped for a tiny one."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("### Zero-shot classification", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert 'load_model("runs/lit-minilm-emoji/final")' in block
    monkeypatch.setenv("VLP_CACHE_DIR", str(tmp_path / "cache"))
    namespace: dict = {}
    exec(block.replace("runs/lit-minilm-emoji/final", str(checkpoint)), namespace)
    assert len(namespace["labels"]) == 2 and all(len(pair) == 2 for pair in namespace["labels"])


def test_hugging_face_dataset_with_class_labels(tmp_path):
    """A saved `datasets` dataset whose label column is a ClassLabel: labels come back as names."""
    import datasets

    from vlpretrain.data.labelled import open_labelled_images

    folders = _class_folders(tmp_path / "imgs", per_class=2)
    paths = sorted(str(p) for p in folders.rglob("*.png"))
    names = sorted(COLOURS)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict({"image": paths, "label": [names.index(Path(p).parent.name) for p in paths]},
                                    features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    data = open_labelled_images(str(tmp_path / "saved"))
    assert len(data) == 6 and sorted(set(data.labels)) == names
    assert data.labels == [Path(p).parent.name for p in paths]


def test_suite_retrieval_task_equals_evaluate_retrieval(tmp_path, checkpoint):
    """A `task: retrieval` entry reports what evaluate_retrieval gives on the same corpus, in the summary too."""
    from vlpretrain.data import open_corpus
    from vlpretrain.evaluation.tasks import evaluate_retrieval

    table = _table(tmp_path, "colours")
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: tiny\ntasks:\n  - {{name: pairs, task: retrieval, data: {table.name}, caption_column: label}}\n")
    model = load_model(checkpoint)
    result = run_suite(suite, model, "tiny", tmp_path / "out", progress=False)
    direct = evaluate_retrieval(model, open_corpus(str(table), caption_column="label"), progress=False)
    assert result.results["pairs"]["metrics"] == direct["metrics"]
    rows = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    header, row = rows[0].split(","), rows[1].split(",")
    assert row[header.index("text_to_image_R@1")] == f"{100 * direct['metrics']['image_retrieval_recall@1']:.1f}"
    assert row[header.index("images")] == "12" and row[header.index("acc1")] == ""
