"""Training monitors against direct computations on fixed vectors, and their warnings on real runs."""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlpretrain.config import recipe_from_dict
from vlpretrain.training.monitors import (SpikeDetector, alignment, embedding_stats, grad_norms, modality_gap,
                                          spectrum, uniformity)

from helpers import read_metrics, tiny_recipe, write_image_csv

X = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.6, 0.8], [0.0, 0.0, 1.0]]), dim=1)
Y = F.normalize(torch.tensor([[0.8, 0.6, 0.0], [0.0, 1.0, 0.0], [0.0, 0.8, 0.6], [0.6, 0.0, 0.8]]), dim=1)


def test_alignment_uniformity_gap_equal_direct_sums():
    rows = X.tolist()
    direct_align = np.mean([sum((a - b) ** 2 for a, b in zip(x, y)) for x, y in zip(rows, Y.tolist())])
    assert math.isclose(alignment(X, Y), direct_align, rel_tol=1e-5)
    pairs = [sum((a - b) ** 2 for a, b in zip(rows[i], rows[j])) for i, j in itertools.combinations(range(4), 2)]
    assert math.isclose(uniformity(X), math.log(np.mean([math.exp(-2 * d) for d in pairs])), rel_tol=1e-5)
    gap = np.linalg.norm(np.mean(rows, 0) - np.mean(Y.tolist(), 0))
    assert math.isclose(modality_gap(X, Y), gap, rel_tol=1e-5)


def test_uniformity_above_the_row_cap_is_that_of_a_fixed_sample():
    x = F.normalize(torch.randn(10, 3, generator=torch.Generator().manual_seed(1)), dim=1)
    sample = x[torch.randperm(10, generator=torch.Generator().manual_seed(0))[:4]]
    assert uniformity(x, max_rows=4) == uniformity(sample) == uniformity(x, max_rows=4)
    assert uniformity(x, max_rows=10) == uniformity(x)  # at the cap: every pair
    assert uniformity(x, max_rows=4) != uniformity(x)


def test_spectrum_equals_numpy_svd_entropy():
    centred = X.numpy() - X.numpy().mean(0)
    s = np.linalg.svd(centred, compute_uv=False)
    p = s / s.sum()
    result = spectrum(X)
    assert math.isclose(result["erank"], math.exp(-(p * np.log(p)).sum()), rel_tol=1e-5)
    assert np.allclose(result["singular_values"], s[:3], atol=1e-6)
    assert math.isclose(result["spread"], (centred ** 2).sum(1).mean(), rel_tol=1e-5)
    # Identical rows: no spread, rank 0 (the collapse signal), whatever the rounding of the mean.
    collapsed = spectrum(X[:1].repeat(5, 1))
    assert collapsed["spread"] < 1e-12 and collapsed["erank"] == 0.0


def test_embedding_stats_pairs_captions_with_their_images():
    owner = torch.tensor([0, 0, 1, 3])
    stats = embedding_stats(X, Y, owner)
    assert math.isclose(stats["monitor/align"], alignment(X[owner], Y), rel_tol=1e-6)
    assert math.isclose(stats["monitor/erank_text"], spectrum(Y)["erank"], rel_tol=1e-6)
    assert stats["monitor/sv1_image"] == pytest.approx(spectrum(X)["singular_values"][0])


def test_grad_norms_per_tower():
    params = {"clip.visual.a": torch.nn.Parameter(torch.zeros(2)), "clip.visual.b": torch.nn.Parameter(torch.zeros(1)),
              "clip.transformer.c": torch.nn.Parameter(torch.zeros(2)), "clip.logit_scale": torch.nn.Parameter(
                  torch.zeros(())), "clip.token_embedding": torch.nn.Parameter(torch.zeros(1))}
    params["clip.visual.a"].grad = torch.tensor([3.0, 0.0])
    params["clip.visual.b"].grad = torch.tensor([4.0])
    params["clip.transformer.c"].grad = torch.tensor([1.0, 2.0])
    params["clip.logit_scale"].grad = torch.tensor(-0.5)
    norms = grad_norms(params.items())  # token_embedding has no gradient: counted as 0
    assert norms == pytest.approx({"image": 5.0, "text": math.sqrt(5.0), "other": 0.5})


def test_spike_detector():
    spikes = SpikeDetector(window=20)
    noisy = [2.0 + 0.05 * math.sin(i) for i in range(30)]
    assert not any(spikes.add(v) for v in noisy)
    assert spikes.add(6.0)
    assert not spikes.add(2.02)
    falling = SpikeDetector(window=20)  # a steadily falling loss is never a spike
    assert not any(falling.add(5.0 - 0.04 * i) for i in range(100))


def _run(tmp_path, name, caplog, build=None, monkeypatch=None, **train):
    from vlpretrain.training.trainer import train as run_training

    csv = write_image_csv(tmp_path / "data", 16)
    recipe = tiny_recipe(tmp_path / name, csv, val_data=csv, batch_size=8, monitor_every=2, **train)
    if build is not None:
        monkeypatch.setattr("vlpretrain.training.prepare.build_start_model", build)
    with caplog.at_level(logging.WARNING, logger="vlpretrain"):
        run_training(recipe_from_dict(recipe))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return read_metrics(tmp_path / name), warnings


def _run_plain(tmp_path):
    from vlpretrain.training.trainer import train as run_training

    recipe = tiny_recipe(tmp_path / "plain", tmp_path / "data" / "pairs.csv", val_data=tmp_path / "data" / "pairs.csv",
                         batch_size=8, epochs=2)
    run_training(recipe_from_dict(recipe))
    return tmp_path / "plain"


def test_constant_image_tower_warns_of_collapse_and_healthy_run_does_not(tmp_path, caplog, monkeypatch):
    from vlpretrain.training.start import build_start_model

    records, warnings = _run(tmp_path, "healthy", caplog, epochs=2)
    watched = [r for r in records if r.get("split") == "monitor"]
    assert [r["step"] for r in watched] == [2, 4]
    assert all(r["monitor/erank_image"] > 1.5 and r["monitor/grad_norm_image"] > 0 for r in watched)
    assert all("monitor/erank_text" in r for r in records if r.get("split") == "val")
    assert not [w for w in warnings if "collapsed" in w], warnings
    # Watching does not move the run: the same losses without monitors.
    plain = read_metrics(_run_plain(tmp_path))
    assert [r["loss"] for r in plain if "loss" in r] == [r["loss"] for r in records if "loss" in r]

    def constant_images(model_cfg, **kwargs):
        model = build_start_model(model_cfg, **kwargs)
        with torch.no_grad():  # every image maps to the same embedding: the projection ignores its input
            model.clip.visual.proj.zero_()
            model.clip.visual.proj[0, 0] = 1.0
            model.clip.visual.proj[:, 1:] = 0.0
            model.clip.visual.ln_post.weight.zero_()
            model.clip.visual.ln_post.bias.fill_(1.0)
        model.clip.visual.requires_grad_(False)
        return model

    caplog.clear()
    records, warnings = _run(tmp_path, "collapsed", caplog, build=constant_images, monkeypatch=monkeypatch)
    watched = [r for r in records if r.get("split") == "monitor"]
    assert watched and all(r["monitor/erank_image"] == 0.0 for r in watched)
    collapse = [w for w in warnings if "collapsed" in w]
    assert len(collapse) == 1 and collapse[0].startswith("image embeddings have collapsed at step 2"), warnings


def test_saturated_scale_and_spike_warnings_are_worded_for_a_user(caplog):
    from types import SimpleNamespace

    from vlpretrain.training.monitors import SATURATED_CHECKS, TrainingMonitor

    model = torch.nn.Module()
    model.logit_scale = torch.nn.Parameter(torch.tensor(math.log(100)))
    model.max_logit_scale = math.log(100)
    run = SimpleNamespace(unwrapped=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                          accelerator=SimpleNamespace(is_main_process=True))
    written = []
    monitor = TrainingMonitor(run, every=10, log=SimpleNamespace(write=written.append))
    batch = {"image": torch.zeros(2, 3, 4, 4)}
    with caplog.at_level(logging.WARNING, logger="vlpretrain"):
        for k in range(1, 60):
            monitor.before_step(k)
            monitor.after_step(k, 0, torch.tensor(9.0 if k == 40 else 2.0 + 0.01 * (k % 3)), batch)
    monitor.close()
    messages = [r.getMessage() for r in caplog.records]
    assert [r["monitor/steps_at_clamp"] for r in written] == [10, 20, 30, 40, 50]
    assert messages == ["loss spike at step 40: 9 against a recent median of 2.01; a few are harmless, many suggest "
                        "lowering train.lr or setting train.grad_clip_norm",
                        f"the logit scale has sat at its clamp (100) for {SATURATED_CHECKS * 10} steps (step 50): "
                        "the temperature can fall no further, and the loss may be too easy on this data (duplicate "
                        "captions?) or the lr too high"]
    assert written[-1]["monitor/loss_spikes"] == 1


def test_collapse_is_not_called_on_too_few_rows_to_show_it(caplog):
    from types import SimpleNamespace

    from vlpretrain.training.monitors import COLLAPSE_MIN_ROWS, TrainingMonitor

    model = torch.nn.Module()
    model.logit_scale = torch.nn.Parameter(torch.tensor(1.0))
    run = SimpleNamespace(unwrapped=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                          accelerator=SimpleNamespace(is_main_process=True))
    written = []
    monitor = TrainingMonitor(run, every=1, log=SimpleNamespace(write=written.append))
    with caplog.at_level(logging.WARNING, logger="vlpretrain"):
        # A healthy per-device batch of 2: 2 centred rows always have effective rank 1.
        monitor.before_step(1)
        monitor._keep_features(model, (), {"image_features": X[:2], "text_features": Y[:2]})
        monitor.after_step(1, 0, torch.tensor(2.0), {"image": torch.zeros(2, 3, 4, 4)})
        assert written[-1]["monitor/erank_image"] == pytest.approx(1.0) and not caplog.records
        low_rank = {"monitor/spread_image": 0.5, "monitor/erank_image": 1.0}
        monitor.check(low_rank, 2, where="the training batch", rows=COLLAPSE_MIN_ROWS - 1)
        assert not caplog.records
        # Identical rows still show (no spread), and enough rows with a low rank do.
        monitor.check({"monitor/spread_text": 0.0, "monitor/erank_text": 0.0}, 3, where="the training batch", rows=2)
        monitor.check(low_rank, 4, where="the validation set", rows=COLLAPSE_MIN_ROWS)
    monitor.close()
    assert [r.getMessage()[:40] for r in caplog.records] == ["text embeddings have collapsed at step 3",
                                                             "image embeddings have collapsed at step "]


def test_a_tiny_validation_set_is_not_called_collapsed(tmp_path, caplog):
    """Two validation images have an effective rank of at most 1 whatever the model: too few to call collapse."""
    from vlpretrain.training.trainer import train as run_training

    train_csv = write_image_csv(tmp_path / "data", 16)
    val_csv = write_image_csv(tmp_path / "val", 2, seed=1)
    recipe = tiny_recipe(tmp_path / "run", train_csv, val_data=val_csv, batch_size=8, monitor_every=2)
    with caplog.at_level(logging.WARNING, logger="vlpretrain"):
        run_training(recipe_from_dict(recipe))
    assert not [r for r in caplog.records if "collapsed" in r.getMessage()]
    validation = [r for r in read_metrics(tmp_path / "run") if r.get("split") == "val"]
    assert validation and all(r["monitor/rows"] == 2 and r["monitor/erank_image"] < 1.01 for r in validation)
