"""vlp plot: a figure and the plotted series, equal to the runs' metrics.jsonl."""

from __future__ import annotations

import json

from vlpretrain.cli.main import main


def _run(folder, offset: float):
    folder.mkdir(parents=True)
    records = [{"step": s, "epoch": 0, "loss": 3.0 - 0.1 * s + offset, "logit_scale": 14.0 + s} for s in (1, 2, 3, 4)]
    records.insert(2, {"step": 2, "epoch": 0, "split": "monitor", "monitor/erank_image": 5.0 + offset,
                       "monitor/erank_text": 4.0, "monitor/modality_gap": 0.8, "monitor/align": 1.1,
                       "monitor/uniform_image": -2.0, "monitor/uniform_text": -1.5})
    records.append({"step": 4, "epoch": 0, "split": "val", "val_loss": 2.0, "image_retrieval_recall@1": 0.25 + offset,
                    "text_retrieval_recall@1": 0.3})
    records.append({"step": 4, "epoch": 0, "split": "eval", "eval/emoji-categories/mean_per_class_recall": 0.4,
                    "eval/emoji-categories/acc1": 0.5})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 5, "lo')
    return records


def test_plot_writes_png_and_series_equal_to_metrics(tmp_path, capsys, monkeypatch):
    import matplotlib

    monkeypatch.setitem(matplotlib.rcParams, "backend", "svg")  # a caller's backend: plotting must not switch it
    runs = {"a": _run(tmp_path / "a", 0.0), "b": _run(tmp_path / "b", 0.5)}
    out = tmp_path / "plots" / "runs.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == "svg"
    series = json.loads(out.with_suffix(".json").read_text())
    assert set(series) == {"a", "b"}
    for name, records in runs.items():
        train = [r for r in records if "split" not in r]
        assert series[name]["loss"] == {"step": [r["step"] for r in train], "value": [r["loss"] for r in train]}
        val = [r for r in records if r.get("split") == "val"][0]
        assert series[name]["image_retrieval_recall@1"] == {"step": [4], "value": [val["image_retrieval_recall@1"]]}
        monitor = [r for r in records if r.get("split") == "monitor"][0]
        assert series[name]["monitor/erank_image"]["value"] == [monitor["monitor/erank_image"]]
        assert series[name]["eval/emoji-categories/mean_per_class_recall"]["value"] == [0.4]
        assert "eval/emoji-categories/acc1" not in series[name]  # not plotted, so not in the series
    assert f"written: {out}" in capsys.readouterr().out
    # An existing figure is not replaced without --overwrite; a folder without metrics is a one-line error.
    assert main(["plot", str(tmp_path / "a"), "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.strip() == (f"vlp plot: error: {tmp_path}: no metrics.jsonl here; give a training "
                                               f"run's output folder (train.output_dir)")
