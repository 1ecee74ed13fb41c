"""The trainer end to end on tiny models: bad samples, resume, and 2 processes vs 1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlpretrain.config import recipe_from_dict
from vlpretrain.models import load_model
from vlpretrain.training import train

from helpers import interrupt_at_step, launch_two_processes, read_metrics, tiny_recipe, vlp, write_image_csv

REPO = Path(__file__).resolve().parents[1]


def test_bad_samples_are_skipped_and_counted(tmp_path, caplog):
    csv = write_image_csv(tmp_path, 14)
    (tmp_path / "images" / "img3.png").write_bytes(b"this is not a png")  # corrupt
    (tmp_path / "images" / "img5.png").unlink()                             # missing
    val = write_image_csv(tmp_path / "val", 6)
    cfg = recipe_from_dict(tiny_recipe(tmp_path / "run", csv, val, epochs=2))
    with caplog.at_level("WARNING"):
        result = train(cfg)
    records = read_metrics(tmp_path / "run")
    steps = [r for r in records if "loss" in r]
    assert len(steps) == result.step == 2 * (13 // 4)  # 13 rows survive the missing-file check
    assert result.skipped_samples >= 1  # the corrupt image, each time the sampler reaches it
    assert steps[-1]["skipped_samples"] == result.skipped_samples
    assert "img3.png: not a readable image" in caplog.text  # the corrupt file, named
    assert "dropped 1 of 14 rows (image file missing)" in caplog.text and "pairs.csv:row 6" in caplog.text
    vals = [r for r in records if r.get("split") == "val"]
    assert len(vals) == 2 and 0 <= vals[-1]["image_retrieval_recall@1"] <= 1 and vals[-1]["num_images"] == 6
    model = load_model(result.final_dir)
    assert model.encode_text(model.tokenizer(["a red square"])).shape == (1, 16)


def test_logit_scale_is_clamped(tmp_path):
    csv = write_image_csv(tmp_path, 8)
    recipe = tiny_recipe(tmp_path / "run", csv, lr=1.0, warmup_steps=0)
    recipe["model"]["init_logit_scale"] = 4.6
    result = train(recipe_from_dict(recipe))
    model = load_model(result.final_dir)
    assert model.logit_scale.item() <= torch.log(torch.tensor(100.0)).item() + 1e-6


def test_resume_mid_epoch_equals_uninterrupted_run(tmp_path):
    csv = write_image_csv(tmp_path, 20)  # 5 batches per epoch
    settings = dict(epochs=2, checkpoint_every=3, keep_checkpoints=5)
    full = train(recipe_from_dict(tiny_recipe(tmp_path / "full", csv, **settings)))

    interrupt_at_step(recipe_from_dict(tiny_recipe(tmp_path / "cut", csv, **settings)), 4)
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (3, 0, 3)
    assert not (tmp_path / "cut" / "final").exists()

    resumed = train(recipe_from_dict(tiny_recipe(tmp_path / "cut", csv, resume="latest", **settings)))
    assert resumed.step == full.step == 10
    steps = [r["step"] for r in read_metrics(tmp_path / "cut") if "loss" in r]
    assert steps == [1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10]  # step 4 was redone after the interruption
    a = load_file(str(full.final_dir / "model.safetensors"))
    b = load_file(str(resumed.final_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


@pytest.mark.slow
def test_ema_averages_the_steps_weights_and_resumes_exactly(tmp_path):
    """train.ema_decay: final/ is the EMA of the weights after each step (a checkpoint per step gives
    them), final-online/ equals a run without EMA, and an interrupted run resumes to the same average."""
    csv = write_image_csv(tmp_path, 16)  # 4 batches per epoch
    settings = dict(epochs=2, checkpoint_every=1, keep_checkpoints=100)
    plain = train(recipe_from_dict(tiny_recipe(tmp_path / "plain", csv, **settings)))
    ema_settings = dict(settings, ema_decay=0.7, ema_warmup=False)
    full = train(recipe_from_dict(tiny_recipe(tmp_path / "ema", csv, **ema_settings)))

    online = load_file(str(full.output_dir / "final-online" / "model.safetensors"))
    reference = load_file(str(plain.final_dir / "model.safetensors"))
    for key in reference:
        assert torch.equal(online[key], reference[key]), key

    expected = None
    for step in range(1, full.step + 1):
        weights = load_file(str(full.output_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))
        if expected is None:  # the first update copies the weights
            expected = {k: v.double() for k, v in weights.items()}
        else:
            expected = {k: 0.7 * expected[k] + 0.3 * weights[k].double() for k in weights}
    averaged = load_file(str(full.final_dir / "model.safetensors"))
    trainable = [k for k in expected if not torch.equal(expected[k], reference[k].double())]
    assert trainable  # the average moved away from the last weights
    for key in expected:
        assert torch.allclose(averaged[key].double(), expected[key], atol=1e-5), key

    interrupt_at_step(recipe_from_dict(tiny_recipe(tmp_path / "cut", csv, **ema_settings)), 5)
    resumed = train(recipe_from_dict(tiny_recipe(tmp_path / "cut", csv, resume="latest", **ema_settings)))
    again = load_file(str(resumed.final_dir / "model.safetensors"))
    for key in averaged:
        assert torch.allclose(again[key], averaged[key], atol=1e-6), key


def test_ema_decay_out_of_range_is_an_error(tmp_path):
    csv = write_image_csv(tmp_path, 8)
    with pytest.raises(ValueError, match=r"^train.ema_decay must be in \[0, 1\) \(e.g. 0.999\), got 1.5$"):
        train(recipe_from_dict(tiny_recipe(tmp_path / "run", csv, ema_decay=1.5)))


@pytest.mark.slow
def test_unknown_override_names_nearest_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "run", tmp_path / "x.csv")))
    proc = vlp("train", str(recipe), "train.learning_rate=1")
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("unknown key 'train.learning_rate' (did you mean 'train.lr'?)")


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_global_batch(tmp_path):
    """accelerate launch, 2 gloo processes x batch 4 == 1 process x batch 8, step for step."""
    csv = write_image_csv(tmp_path, 24)
    # Random crops stay on: augmentations are seeded per (seed, epoch, row), so each sample gets the
    # same crop whichever process loads it.
    two = tiny_recipe(tmp_path / "two", csv, batch_size=4, epochs=2)
    one = tiny_recipe(tmp_path / "one", csv, batch_size=8, epochs=2)
    for recipe in (two, one):
        recipe["data"]["augmentation"] = {"scale": [0.5, 1.0]}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    launch_two_processes("train", str(tmp_path / "two.yaml"))
    assert (tmp_path / "two" / "train.rank1.log").exists()  # really two processes

    single = train(recipe_from_dict(one))
    a = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    b = load_file(str(single.final_dir / "model.safetensors"))
    for key in a:
        if key.endswith("attn.in_proj_bias"):
            # The key-bias third has an exact gradient of zero (softmax ignores a shift shared by
            # all keys), so Adam divides rounding noise by its own size there: compare the rest.
            width = a[key].shape[0] // 3
            a[key], b[key] = torch.cat([a[key][:width], a[key][2 * width:]]), torch.cat([b[key][:width], b[key][2 * width:]])
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    losses_two = [r["loss"] for r in read_metrics(tmp_path / "two") if "loss" in r]
    losses_one = [r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r]
    assert len(losses_two) == len(losses_one) == 6
    assert losses_two == pytest.approx(losses_one, abs=1e-5)


def test_fresh_run_refuses_to_mix_with_an_earlier_one(tmp_path):
    csv = write_image_csv(tmp_path, 8)
    recipe = tiny_recipe(tmp_path / "run", csv, checkpoint_every=1)
    train(recipe_from_dict(recipe))
    with pytest.raises(ValueError, match="already holds checkpoints of an earlier run \\(step_00000002\\); pass --resume"):
        train(recipe_from_dict(recipe))
    recipe["train"]["overwrite"] = True
    train(recipe_from_dict(recipe))
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2]  # metrics started anew


def test_unknown_precision_is_an_error(tmp_path):
    recipe = tiny_recipe(tmp_path / "run", write_image_csv(tmp_path, 8), precision="fp8")
    with pytest.raises(ValueError, match="train.precision: 'fp8' is not one of no \\(fp32\\), bf16, fp16"):
        train(recipe_from_dict(recipe))


@pytest.mark.slow
def test_vlp_demo_end_to_end_on_the_emoji_corpus(tmp_path):
    """`vlp demo` with a tiny model and 3 steps: builds the corpus, trains, prints and saves recall."""
    env = dict(os.environ, VLP_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="2")
    cmd = [sys.executable, "-m", "vlpretrain.cli.main", "demo", "--output-dir", str(tmp_path / "demo"),
           "train.max_steps=3", "train.batch_size=16", "train.progress=false", "data.num_workers=0",
           "model.vision.width=32", "model.vision.layers=1", "model.vision.head_width=16",
           "model.text.width=32", "model.text.layers=1", "model.text.heads=2", "model.embed_dim=16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "emoji test split: 356 images, 356 captions (demo-emoji, 3 steps)" in proc.stdout
    assert "text -> image" in proc.stdout and "image -> text" in proc.stdout
    report = json.loads((tmp_path / "demo" / "test_retrieval.json").read_text())
    assert set(report) == {"dataset", "model", "pretrained", "task", "metrics", "language", "precision"}
    assert report["metrics"]["chance_image_retrieval_recall@10"] == pytest.approx(10 / 356)
    assert 0 <= report["metrics"]["image_retrieval_recall@10"] <= 1
    # The whole corpus is indexed and the default query answered with 5 ranked captions.
    assert f"index: {tmp_path / 'demo' / 'index'} (3775 images, flat); query 'a smiling cat':" in proc.stdout
    answer, serve_line = proc.stdout.split("query 'a smiling cat':\n", 1)[1].strip().split("\n\n", 1)
    hits = answer.splitlines()
    assert [line.split(".")[0].strip() for line in hits] == ["1", "2", "3", "4", "5"]
    # and ends with the line that serves the index
    assert serve_line.strip() == (f"search it in a browser: vlp index serve demo={tmp_path / 'demo' / 'index'}"
                                  "   (then open http://127.0.0.1:8000/)")
    query = subprocess.run([sys.executable, "-m", "vlpretrain.cli.main", "index", "query", str(tmp_path / "demo" / "index"),
                            "--text", "a smiling cat", "-k", "5", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert query.returncode == 0, query.stderr[-3000:]
    assert [hit["caption"] for hit in json.loads(query.stdout)] == [re.match(r"\s*\d+\. \S+  (.*)  \(", line).group(1) for line in hits]


def test_bf16_on_a_cpu_without_native_bf16_is_warned(monkeypatch, caplog):
    """bf16 without AVX512-BF16 / AMX runs tens of times slower than fp32: the log says so, and how to avoid it."""
    from types import SimpleNamespace

    from vlpretrain.training import prepare

    cpu = SimpleNamespace(device=torch.device("cpu"))
    message = ("train.precision=bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX): bf16 matmuls run tens "
               "of times slower than fp32 here; set train.precision=no for fp32")
    for native, precision, warned in ((False, "bf16", True), (True, "bf16", False), (False, "no", False)):
        monkeypatch.setattr(prepare, "cpu_has_native_bf16", lambda: native)
        caplog.clear()
        with caplog.at_level("WARNING", logger="vlpretrain.train"):
            prepare._warn_if_slow_bf16(recipe_from_dict({"train": {"precision": precision}}), cpu)
        assert [r.getMessage() for r in caplog.records] == ([message] if warned else [])


def test_auto_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    """train.precision=auto (the demo recipes'): bf16 on a CPU with native bf16, fp32 elsewhere."""
    from vlpretrain.training import prepare

    if torch.cuda.is_available():
        pytest.skip("auto follows the GPU here")
    for native, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(prepare, "cpu_has_native_bf16", lambda: native)
        assert prepare.resolve_precision("auto") == expected
    assert prepare.resolve_precision("fp32") == "no" and prepare.resolve_precision("bf16") == "bf16"
