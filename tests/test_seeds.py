"""tools/seeds.py: per-seed runs and their mean / standard deviation."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import yaml

from helpers import tiny_recipe, write_image_csv

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("seeds_tool", ROOT / "tools" / "seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_two_seeds_mean_and_std_equal_the_per_seed_files(tmp_path, capsys):
    tool = _tool()
    csv = write_image_csv(tmp_path / "data", 8)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    labels = tmp_path / "data" / "labels.csv"
    labels.write_text("image,label\n" + "".join(f"images/img{i}.png,{colours[i % 8]}\n" for i in range(8)))
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: s\ntasks:\n  - {{name: colours, task: zeroshot, data: {labels}, "
                     f"templates: ['a {{c}} square.']}}\n")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "unused", csv, max_steps=2, lr=1e-2)))
    out = tmp_path / "seeds"
    assert tool.main(["--recipe", str(recipe), "--seeds", "0,1", "--out", str(out), "--retrieval-data", str(csv),
                      "--suite", str(suite), "--zeroshot-task", "colours", "--label", "tiny"]) == 0
    per_seed = [json.loads((out / f"seed_{s}" / "seed_result.json").read_text()) for s in (0, 1)]
    assert [r["seed"] for r in per_seed] == [0, 1] and all(r["steps"] == 2 for r in per_seed)
    assert per_seed[0]["metrics"] != per_seed[1]["metrics"]  # the seed reached the runs
    summary = json.loads((out / "seeds.json").read_text())
    assert set(summary["metrics"]) == {"test_image_retrieval_recall@1", "test_image_retrieval_recall@10",
                                       "test_text_retrieval_recall@1", "test_text_retrieval_recall@10",
                                       "zeroshot_balanced_accuracy"}
    for name, stats in summary["metrics"].items():
        values = [r["metrics"][name] for r in per_seed]
        assert stats["values"] == values
        assert stats["mean"] == pytest.approx(statistics.fmean(values))
        assert stats["std"] == pytest.approx(statistics.stdev(values))
    assert (out / "seeds.md").read_text().splitlines()[2].startswith("| tiny | 2 | ")
    table = tmp_path / "table.md"
    assert tool.main(["--combine", str(out), str(out), "--out", str(table)]) == 0
    assert table.read_text().splitlines()[2:] == [(out / "seeds.md").read_text().splitlines()[2]] * 2
    # A second run into the same folder does not replace the summary.
    assert tool.main(["--recipe", str(recipe), "--seeds", "0", "--out", str(out)]) == 2
    assert "seeds.json already exists; pass --overwrite" in capsys.readouterr().err


def test_parse_seeds_errors():
    tool = _tool()
    assert tool.parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("0,a", "1,1", "", "-1"):
        with pytest.raises(ValueError, match="--seeds"):
            tool.parse_seeds(bad)
