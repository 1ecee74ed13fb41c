"""`vlp eval run` over several models and data sets, `vlp eval build`, --recall-k, --precision, saved zero-shot
classifiers and CLIP_benchmark's wds layout, on tiny models and data (in-process)."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlpretrain.cli.main import main
from vlpretrain.data.wds_benchmark import open_wds_benchmark, wds_corpus, wds_labelled_images
from vlpretrain.evaluation.benchmark_run import ModelEntry, parse_models, read_models_file, run_benchmark
from vlpretrain.evaluation.retrieval import retrieval_metrics
from vlpretrain.evaluation.tasks import evaluate_retrieval, evaluate_zeroshot
from vlpretrain.inference import encode_corpus, inference_precision
from vlpretrain.io import is_our_figure
from vlpretrain.models import build_model

from helpers import tiny_model_config

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def _image(rgb, seed: int, fmt: str) -> bytes:
    noise = np.random.default_rng(seed).integers(-20, 20, (16, 16, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype("uint8")).save(buffer, format=fmt)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_wds(root: Path, per_class: int = 2, retrieval: bool = False) -> Path:
    """A tiny data set in CLIP_benchmark's wds layout: test/{0,1}.tar (+ nshards.txt), classnames.txt and
    zeroshot_classification_templates.txt; images alternate webp / jpg / png; one sample has no image."""
    (root / "test").mkdir(parents=True)
    names = list(COLOURS)
    samples = [(c, i) for i in range(per_class) for c in range(len(names))]
    formats = [("webp", "WEBP"), ("jpg", "JPEG"), ("png", "PNG")]
    for shard, part in enumerate((samples[:len(samples) // 2], samples[len(samples) // 2:])):
        with tarfile.open(root / "test" / f"{shard}.tar", "w") as tar:
            for n, (c, i) in enumerate(part):
                key = f"s{shard}_{n:04d}"
                ext, fmt = formats[(c + i) % 3]
                _add(tar, f"{key}.{ext}", _image(COLOURS[names[c]], 10 * c + i, fmt))
                _add(tar, f"{key}.cls", str(c).encode())
                _add(tar, f"{key}.txt", f"a {names[c]} square number {i}\nsquare {i}, {names[c]}".encode())
            if shard == 1:
                _add(tar, "bad.cls", b"0")  # no image: counted and skipped
    (root / "test" / "nshards.txt").write_text("2\n")
    (root / "classnames.txt").write_text("\n".join(names) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of {c}.\na {c} square.\n")
    if retrieval:
        (root / "dataset_type.txt").write_text("retrieval\n")
    return root


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("models")
    paths = []
    with torch.random.fork_rng(devices=[]):
        for seed, name in ((0, "alpha"), (1, "beta")):
            torch.manual_seed(seed)
            paths.append(Path(build_model(tiny_model_config()).save_pretrained(folder / name / "final")))
    return paths


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory) -> Path:
    """A suite of a wds classification set, a wds retrieval set and a broken wds set (its classnames.txt
    lists fewer classes than the shards use)."""
    root = tmp_path_factory.mktemp("bench")
    write_wds(root / "wds_colours")
    write_wds(root / "wds_pairs", retrieval=True)
    write_wds(root / "wds_broken")
    (root / "wds_broken" / "classnames.txt").write_text("red\n")
    for name, tasks in (("two", [("colours", "zeroshot", "wds_colours"), ("broken", "zeroshot", "wds_broken")]),
                        ("good", [("colours", "zeroshot", "wds_colours"), ("pairs", "retrieval", "wds_pairs")])):
        (root / f"{name}.yaml").write_text("name: %s\ntasks:\n" % name + "".join(
            f"  - name: {n}\n    task: {kind}\n    data: wds:{folder}\n" for n, kind, folder in tasks))
    return root


def test_wds_reader_reads_classes_templates_and_captions(benchmark):
    bench = open_wds_benchmark(f"wds:{benchmark / 'wds_colours'}")
    assert [p.name for p in bench.shards] == ["0.tar", "1.tar"]
    assert bench.classnames == ["red", "green", "blue"] and bench.templates == ["a photo of {c}.", "a {c} square."]
    data = wds_labelled_images(bench)
    assert data.name == "colours" and data.labels == ["red", "green", "blue"] * 2
    images = list(data.images)
    assert len(images) == len(data) == 6 and Image.open(io.BytesIO(images[0])).format == "WEBP"
    corpus = wds_corpus(open_wds_benchmark(f"wds:{benchmark / 'wds_pairs'}"))
    assert len(corpus) == 6 and corpus[1].captions == ["a green square number 0", "square 0, green"]
    with pytest.raises(FileNotFoundError, match=r"no 'val' split folder \(splits here: test\)"):
        open_wds_benchmark(f"wds:{benchmark / 'wds_colours'}", "val")


def test_run_two_models_one_broken_dataset(benchmark, two_models, tmp_path, capsys):
    template = str(tmp_path / "results" / "{dataset}_{model}_{task}.json")
    code = main(["eval", "run", str(benchmark / "two.yaml"), "--model", str(two_models[0]), "--model",
                 f"b={two_models[1]}", "--output", template, "--no-progress"])
    out = capsys.readouterr().out
    assert code == 1
    written = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert written == ["colours_alpha_zeroshot_classification.json", "colours_b_zeroshot_classification.json"]
    reason = ("a sample has class 1, but classnames.txt lists 1 classes; the file and the shards do not belong "
              "together")
    assert f"failed: alpha / broken: {benchmark / 'wds_broken'}: {reason}" in out
    assert f"failed: b / broken: {benchmark / 'wds_broken'}: {reason}" in out
    assert "2 written, 0 already there, 0 skipped (data not installed), 2 failed" in out
    report = json.loads((tmp_path / "results" / "colours_b_zeroshot_classification.json").read_text())
    assert (report["model"], report["pretrained"], report["precision"]) == ("b", str(two_models[1]), "fp32")
    assert report["num_templates"] == 2  # the wds folder's own templates


def test_run_one_broken_cell_of_two_by_two_others_written(benchmark, two_models, tmp_path, capsys):
    """2 models x 2 data sets, the saved classifier of one (model, data set) corrupt: three results, one named failure."""
    common = ["eval", "run", str(benchmark / "good.yaml"), "--model", f"a={two_models[0]}", "--model",
              f"b={two_models[1]}", "--no-progress"]
    clf = str(tmp_path / "clf" / "{dataset}_{model}.safetensors")
    assert main(common + ["--output", str(tmp_path / "first" / "{dataset}_{model}.json"), "--save-clf", clf]) == 0
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == ["colours_a.safetensors", "colours_b.safetensors"]
    (tmp_path / "clf" / "colours_b.safetensors").write_bytes(b"not a classifier")
    capsys.readouterr()
    assert main(common + ["--output", str(tmp_path / "second" / "{dataset}_{model}.json"), "--load-clf", clf]) == 1
    out = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "second").iterdir()) == ["colours_a.json", "pairs_a.json", "pairs_b.json"]
    assert f"failed: b / colours: --load-clf: {tmp_path / 'clf' / 'colours_b.safetensors'} is not a safetensors file" in out
    first, second = (json.loads((tmp_path / d / "colours_a.json").read_text())["metrics"] for d in ("first", "second"))
    assert first["confusion_matrix"] == second["confusion_matrix"]


def test_run_skip_existing_and_failed_model(benchmark, two_models, tmp_path, capsys):
    template = str(tmp_path / "{dataset}_{model}.json")
    args = ["eval", "run", str(benchmark / "good.yaml"), "--model", str(two_models[0]), "--output", template,
            "--no-progress", "--recall-k", "1,2,50", "--skip-existing"]
    assert main(args) == 0
    kept = tmp_path / "colours_alpha.json"
    kept.write_text('{"marker": true}')
    before = kept.stat().st_mtime_ns
    missing = tmp_path / "nowhere" / "final"
    assert main(args + ["--model", str(missing)]) == 1
    out = capsys.readouterr().out
    assert kept.read_text() == '{"marker": true}' and kept.stat().st_mtime_ns == before
    assert f"alpha / colours: exists, skipped ({kept})" in out and "alpha / pairs: exists, skipped" in out
    assert f"failed: nowhere / colours: model {missing} did not load:" in out
    retrieval = json.loads((tmp_path / "pairs_alpha.json").read_text())["metrics"]
    assert {f"image_retrieval_recall@{k}" for k in (1, 2, 50)} <= set(retrieval) and retrieval["image_retrieval_recall@50"] == 1.0


def test_models_file_names_and_template_errors(benchmark, tmp_path):
    models = tmp_path / "models.txt"
    models.write_text("# two models\nsmall=runs/a/final\nruns/b/final  # the second\n")
    assert parse_models(read_models_file(models)) == [ModelEntry("small", "runs/a/final", True),
                                                      ModelEntry("b", "runs/b/final")]
    with pytest.raises(ValueError, match="--model: runs/x/final and other/x/final are both named 'x'; name them apart"):
        parse_models(["runs/x/final", "other/x/final"])
    with pytest.raises(ValueError, match=r"--output: unknown field \{data\} in 'r/\{data\}.json'"):
        run_benchmark(benchmark / "good.yaml", parse_models(["a=x"]), "r/{data}.json")
    with pytest.raises(ValueError, match=r"has no \{model\}: every result would go to the same file"):
        run_benchmark(benchmark / "good.yaml", parse_models(["a=x", "b=y"]), "r/{dataset}.json")


def test_one_model_keeps_the_folder_layout(benchmark, two_models, tmp_path, capsys):
    out = tmp_path / "single"
    assert main(["eval", "run", str(benchmark / "good.yaml"), "--model", str(two_models[0]), "--out", str(out),
                 "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["colours.confusion.png", "colours.json", "pairs.json",
                                                    "summary.csv", "summary.md"]
    assert f"written: {out}/summary.md (2 tasks, 0 skipped)" in capsys.readouterr().out
    (out / "pairs.json").unlink()
    assert main(["eval", "run", str(benchmark / "good.yaml"), "--model", str(two_models[0]), "--out", str(out),
                 "--no-progress", "--skip-existing"]) == 0
    summary = (out / "summary.md").read_text()
    assert "| colours | zeroshot_classification |" in summary and "| pairs | zeroshot_retrieval |" in summary
    # A summary or figure of the user's in the folder is never replaced: the model's tasks fail, naming the file.
    rerun = ["eval", "run", str(benchmark / "good.yaml"), "--model", str(two_models[0]), "--out", str(out),
             "--no-progress", "--skip-existing"]
    png = out / "colours.confusion.png"
    ours = png.read_bytes()
    (out / "colours.json").unlink()
    capsys.readouterr()
    (out / "summary.md").write_text("# my notes\n")
    assert main(rerun) == 1
    assert (f"{out}/summary.md: not a summary written by vlp eval run; not replaced: move it away or choose "
            "another --out") in capsys.readouterr().out
    assert (out / "summary.md").read_text() == "# my notes\n" and not (out / "colours.json").exists()
    (out / "summary.md").write_text(summary)
    csv_summary = (out / "summary.csv").read_text()
    (out / "summary.csv").write_text("my,table\n")
    assert main(rerun) == 1
    assert f"{out}/summary.csv: not a summary written by vlp eval run" in capsys.readouterr().out
    (out / "summary.csv").write_text(csv_summary)
    Image.new("RGB", (4, 4)).save(png)
    theirs = png.read_bytes()
    assert main(rerun) == 1
    assert (f"/ colours: {png}: not a figure written by vlpretrain; not replaced: move it away or choose "
            "another --out") in capsys.readouterr().out
    assert png.read_bytes() == theirs and not (out / "colours.json").exists()
    png.write_bytes(ours)
    os.utime(png, (0, 0))
    assert main(rerun) == 0 and (out / "colours.json").exists() and png.stat().st_mtime > 0  # redrawn
    # Beside one of our results, a figure without our mark was drawn with it (by an earlier version): redrawn.
    Image.new("RGB", (4, 4)).save(png)
    assert main(rerun[:-1]) == 0 and is_our_figure(png)


def test_recall_k_matches_a_direct_computation(model, benchmark):
    corpus = wds_corpus(open_wds_benchmark(f"wds:{benchmark / 'wds_pairs'}"))
    m = evaluate_retrieval(model, corpus, batch_size=4, progress=False, ks=(1, 3, 50))["metrics"]
    feats = encode_corpus(model, corpus, batch_size=4, progress=False)
    sims = feats["text_features"] @ feats["image_features"].T
    for k in (1, 3):
        top = sims.topk(k, dim=1).indices
        expected = (top == feats["text_to_image"][:, None]).any(1).float().mean().item()
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(expected)
    assert m["image_retrieval_recall@50"] == m["text_retrieval_recall@50"] == 1.0
    assert m == {**m, **retrieval_metrics(feats["image_features"], feats["text_features"], feats["text_to_image"],
                                          ks=(1, 3, 50))}


def test_precision_is_recorded_and_used(model, benchmark):
    data = wds_labelled_images(open_wds_benchmark(f"wds:{benchmark / 'wds_colours'}"))
    fp32 = evaluate_zeroshot(model, data, None, "a {c} square.", progress=False)
    with inference_precision("bf16"):
        bf16 = evaluate_zeroshot(model, data, None, "a {c} square.", progress=False)
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert fp32["metrics"]["num_samples"] == bf16["metrics"]["num_samples"] == 6
    with pytest.raises(ValueError, match="--precision must be one of fp32, bf16, fp16, got 'int8'"):
        with inference_precision("int8"):
            pass


def test_save_and_load_clf_round_trip_and_mismatch(benchmark, two_models, tmp_path, capsys):
    clf = tmp_path / "colours.safetensors"
    data = f"wds:{benchmark / 'wds_colours'}"
    base = ["eval", "zeroshot", "--data", data, "--no-progress"]
    assert main(base + ["--model", str(two_models[0]), "--save-clf", str(clf), "--output", str(tmp_path / "a.json")]) == 0
    assert b"vlpretrain-zeroshot-classifier-v1" in clf.read_bytes()[:4096]  # safetensors' JSON header
    assert main(base + ["--model", str(two_models[0]), "--load-clf", str(clf), "--output", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["metrics"] for n in "ab")
    assert a["confusion_matrix"] == b["confusion_matrix"] and a["acc1"] == b["acc1"]
    capsys.readouterr()
    assert main(base + ["--model", str(two_models[1]), "--load-clf", str(clf)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vlp eval: error: --load-clf: {clf} was made with model {two_models[0]} (dim 16); the given "
                          f"model {two_models[1]} embeds text differently") and len(err.splitlines()) == 1
    assert main(base + ["--model", str(two_models[0]), "--load-clf", str(clf), "--classnames", "red,green,blue,pink"]) == 2
    assert ("holds 3 classes, this data set has 4: use the same class names, or save a new one with --save-clf"
            in capsys.readouterr().err)


def test_build_merges_known_results(tmp_path, capsys):
    results = tmp_path / "results"
    rows = [("cifar10", "a", "zeroshot_classification", {"acc1": 0.5, "acc5": 0.9, "mean_per_class_recall": 0.45}),
            ("cifar10", "b", "zeroshot_classification", {"acc1": 0.25, "acc5": float("nan"), "mean_per_class_recall": 0.2}),
            ("flickr", "a", "zeroshot_retrieval", {"image_retrieval_recall@5": 0.75, "text_retrieval_recall@5": 0.8,
                                                   "image_retrieval_recall@1": 0.5, "text_retrieval_recall@1": 0.6})]
    for dataset, model, task, metrics in rows:
        (results / model).mkdir(parents=True, exist_ok=True)
        (results / model / f"{dataset}.json").write_text(json.dumps(
            {"dataset": dataset, "model": model, "pretrained": "", "task": task, "metrics": metrics, "language": "en",
             "precision": "fp32"}))
    (results / "a" / "info.json").write_text('{"not": "a result"}')
    assert main(["eval", "build", str(results), "--out", str(tmp_path / "table.csv"),
                 "--markdown", str(tmp_path / "table.md")]) == 0
    table = list(csv.reader((tmp_path / "table.csv").open()))
    assert table == [
        ["dataset", "model", "pretrained", "task", "language", "precision", "acc1", "acc5", "mean_per_class_recall",
         "image_retrieval_recall@1", "image_retrieval_recall@5", "text_retrieval_recall@1", "text_retrieval_recall@5"],
        ["cifar10", "a", "", "zeroshot_classification", "en", "fp32", "0.5", "0.9", "0.45", "", "", "", ""],
        ["flickr", "a", "", "zeroshot_retrieval", "en", "fp32", "", "", "", "0.5", "0.75", "0.6", "0.8"],
        ["cifar10", "b", "", "zeroshot_classification", "en", "fp32", "0.25", "", "0.2", "", "", "", ""]]
    assert list(csv.reader((tmp_path / "table.pivot.csv").open())) == [
        ["model", "cifar10 (acc1)", "flickr (image_retrieval_recall@5)"], ["a", "0.5", "0.75"], ["b", "0.25", ""]]
    markdown = (tmp_path / "table.md").read_text()
    assert "| a | 50.0 | 75.0 |\n| b | 25.0 |  |" in markdown
    assert "| a | 50.0 | 75.0 |" in capsys.readouterr().out


def test_save_clf_refuses_non_finite_weights_and_load_clf_names_a_missing_header_key(model, tmp_path):
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from vlpretrain.evaluation.clf_store import CLF_FORMAT, load_classifier, save_classifier

    path = tmp_path / "clf.safetensors"
    overflowed = SimpleNamespace(weights=torch.tensor([[1.0, float("inf")], [0.0, float("nan")]]),
                                 classnames=["red", "blue"], templates=["a {c} square."])
    with inference_precision("fp16"), pytest.raises(ValueError) as error:
        save_classifier(path, overflowed, model)
    assert str(error.value) == (f"--save-clf: {path}: the class weights hold NaN or inf (prompts encoded in fp16; "
                                f"fp16 / bf16 can overflow); not saved: rerun with --precision fp32")
    assert not path.exists()
    for header, missing in (({"format": CLF_FORMAT, "classnames": '["red"]'}, "signature"),
                            ({"format": CLF_FORMAT}, "signature or classnames")):
        save_file({"weights": torch.zeros(16, 1)}, str(path), metadata=header)
        with pytest.raises(ValueError) as error:
            load_classifier(path, model, ["red"])
        assert str(error.value) == (f"--load-clf: {path}: its header has no {missing} (damaged, or not written by "
                                    f"--save-clf); save a new one with --save-clf")


def _result(dataset: str = "cifar10", model: str = "a") -> str:
    return json.dumps({"dataset": dataset, "model": model, "task": "zeroshot_classification", "metrics": {"acc1": 0.5}})


def test_build_refuses_existing_files_unless_overwrite(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "a.json").write_text(_result())
    other = tmp_path / "other.json"
    other.write_text(_result(model="b"))
    table = tmp_path / "table.csv"
    args = ["eval", "build", str(tmp_path / "r"), "--out", str(table)]
    assert main(args) == 0 and (tmp_path / "table.pivot.csv").is_file()
    table.write_text("kept")
    capsys.readouterr()
    assert main(args + ["--markdown", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vlp eval: error: {table} already exists; pass --overwrite to replace it, or choose another --out"]
    assert main(["eval", "build", str(tmp_path / "r"), "--markdown", str(other)]) == 2
    assert (f"{other} already exists; pass --overwrite to replace it, or choose another --markdown"
            in capsys.readouterr().err)
    assert table.read_text() == "kept" and other.read_text() == _result(model="b")
    assert main(args + ["--overwrite"]) == 0
    assert list(csv.reader(table.open()))[1][:2] == ["cifar10", "a"]


def test_run_refuses_dot_names_and_files_that_are_not_results(benchmark, tmp_path, capsys):
    def no_load(spec):
        raise AssertionError("no model loads when every path is refused")

    for name, template in (("..", "{model}/{dataset}.json"), ("a", "{model}/{pretrained}/{dataset}.json")):
        with pytest.raises(ValueError) as error:
            run_benchmark(benchmark / "good.yaml", parse_models([f"{name}=.."]), str(tmp_path / template),
                          progress=False, load=no_load)
        field, advice = (("model", "give the model another NAME with --model NAME=SPEC") if name == ".." else
                         ("pretrained", "leave {pretrained} out of the template"))
        assert str(error.value) == f"{field} '..' cannot be part of a file path ('.' and '..' name folders): {advice}"
    # a JSON that the old summary reader took for a result (metrics and task only) is not one either
    (tmp_path / "pairs_a.json").write_text("my notes")
    (tmp_path / "colours_a.json").write_text('{"metrics": {}, "task": "x"}')
    outcome = run_benchmark(benchmark / "good.yaml", parse_models(["a=x"]), str(tmp_path / "{dataset}_{model}.json"),
                            progress=False, load=no_load)
    assert outcome.failed == {
        ("a", "colours"): f"{tmp_path / 'colours_a.json'}: not an evaluation result (needs dataset, metrics, model, "
                          f"task); not replaced: move it away or choose another --output",
        ("a", "pairs"): f"{tmp_path / 'pairs_a.json'}: not valid JSON (Expecting value: line 1 column 1 (char 0)); "
                        f"not replaced: move it away or choose another --output"}
    assert (tmp_path / "pairs_a.json").read_text() == "my notes"


def test_models_load_one_at_a_time_and_results_are_replaced(benchmark, two_models, tmp_path):
    import weakref

    from vlpretrain.evaluation.results_table import read_results
    from vlpretrain.models import load_model

    suite = tmp_path / "one.yaml"
    suite.write_text(f"name: one\ntasks:\n  - name: colours\n    task: zeroshot\n    data: wds:{benchmark / 'wds_colours'}\n")
    loaded, alive_at_load = [], []

    def load(spec):
        alive_at_load.append([ref() is not None for ref in loaded])
        model = load_model(spec)
        loaded.append(weakref.ref(model))
        return model

    (tmp_path / "r").mkdir()
    old = tmp_path / "r" / "colours_a.json"
    old.write_text(_result("colours"))
    outcome = run_benchmark(suite, parse_models([f"a={two_models[0]}", f"b={two_models[1]}"]),
                            str(tmp_path / "r" / "{dataset}_{model}.json"), progress=False, load=load)
    assert alive_at_load == [[], [False]] and not outcome.failed
    assert [(r["model"], r["pretrained"]) for _, r in read_results([tmp_path / "r"])] == [
        ("a", str(two_models[0])), ("b", str(two_models[1]))]


def test_default_output_folder_is_the_model_name(benchmark, tmp_path, monkeypatch, capsys):
    from vlpretrain.cli import eval_run
    from vlpretrain.evaluation import benchmark_run
    from vlpretrain.inference_precision import PRECISIONS

    templates = []
    monkeypatch.setattr(benchmark_run, "run_benchmark",
                        lambda suite, models, template, **kw: templates.append(template) or benchmark_run.BenchmarkOutcome())
    for spec in ("open_clip:ViT-B-32/openai", "recipes/lit-minilm.yaml", "hf:org/clip-name", "runs/demo/final",
                 "small=open_clip:RN50"):
        assert main(["eval", "run", str(benchmark / "good.yaml"), "--model", spec, "--no-progress"]) == 0
    assert templates == [f"results/eval/good/{name}/{{dataset}}.json" for name in
                         ("open_clip-ViT-B-32-openai", "lit-minilm", "hf-org-clip-name", "demo", "small")]
    capsys.readouterr()
    assert main(["eval", "run", str(benchmark / "good.yaml"), "--model", "..", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == ("vlp eval: error: model '..' cannot be part of a file path ('.' and "
                                               "'..' name folders): give the model another NAME with --model NAME=SPEC")
    assert eval_run.PRECISION_CHOICES == tuple(PRECISIONS) == ("fp32", "bf16", "fp16")
