"""train.eval_suite: a suite scored inside training, its numbers in metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from vlpretrain.config import ConfigError, recipe_from_dict

from helpers import read_metrics, tiny_recipe, write_image_csv


def _suite(tmp_path, csv):
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    labels = tmp_path / "data" / "labels.csv"
    labels.write_text("image,label\n" + "".join(f"images/img{i}.png,{colours[i % 8]}\n" for i in range(8)))
    suite = tmp_path / "tiny.yaml"
    suite.write_text(f"""name: tiny
tasks:
  - {{name: colours, task: zeroshot, data: {labels}, templates: ["a {{c}} square."]}}
  - {{name: pairs, task: retrieval, data: {csv}}}
""")
    return suite


def test_suite_runs_every_n_epochs_and_its_metrics_are_logged(tmp_path):
    from vlpretrain.training.trainer import train

    csv = write_image_csv(tmp_path / "data", 8)
    suite = _suite(tmp_path, csv)
    recipe = tiny_recipe(tmp_path / "run", csv, epochs=3, eval_suite=str(suite), eval_every_epochs=2)
    train(recipe_from_dict(recipe))  # 2 steps per epoch: the suite after epoch 2 (step 4) and the last (step 6)
    evals = [r for r in read_metrics(tmp_path / "run") if r.get("split") == "eval"]
    assert [(r["step"], r["epoch"]) for r in evals] == [(4, 1), (6, 2)]
    for record in evals:
        folder = tmp_path / "run" / "eval" / f"step_{record['step']:08d}"
        for task, key in (("colours", "mean_per_class_recall"), ("pairs", "image_retrieval_recall@1")):
            report = json.loads((folder / f"{task}.json").read_text())
            assert record[f"eval/{task}/{key}"] == report["metrics"][key]


def test_missing_suite_is_a_one_line_error_before_training(tmp_path):
    from vlpretrain.training.trainer import train

    csv = write_image_csv(tmp_path / "data", 8)
    recipe = tiny_recipe(tmp_path / "run", csv, eval_suite=str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"^train.eval_suite: .*nope.yaml: suite file not found$"):
        train(recipe_from_dict(recipe))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
