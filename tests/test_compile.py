"""train.compile: the trainer steps a torch.compile'd model, and checkpoints and final/ hold the plain module's
weights (no ``_orig_mod.`` keys), equal to an uncompiled run's. The fast test traces with dynamo's "eager"
backend (the same wrapping, no kernel generation); the slow one runs inductor itself (tens of seconds here)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import vlpretrain.training.prepare as prepare
from vlpretrain.config import recipe_from_dict
from vlpretrain.models import load_model
from vlpretrain.training import train

from helpers import tiny_recipe, write_image_csv


def _compiled_flags(monkeypatch) -> list[bool]:
    """Records, for each run the trainer prepares, whether the model it steps is a torch.compile wrapper."""
    import vlpretrain.training.trainer as trainer

    flags: list[bool] = []
    original = trainer.prepare_run

    def recorded(*args, **kwargs):
        run = original(*args, **kwargs)
        flags.append(isinstance(run.model, torch._dynamo.eval_frame.OptimizedModule))
        return run

    monkeypatch.setattr(trainer, "prepare_run", recorded)
    return flags


def _train_plain_then_compiled(tmp_path, monkeypatch) -> tuple[dict, dict]:
    """Two 2-step runs in one process, the second compiled (a per-run setting, not the process's first)."""
    csv = write_image_csv(tmp_path, 8)
    flags = _compiled_flags(monkeypatch)
    weights = {}
    for on in (False, True):
        run_dir = tmp_path / f"run-{on}"
        result = train(recipe_from_dict(tiny_recipe(run_dir, csv, max_steps=2, checkpoint_every=1, compile=on)))
        assert result.step == 2
        checkpoint = load_file(str(run_dir / "checkpoints" / "step_00000001" / "model.safetensors"))
        assert not [k for k in checkpoint if "_orig_mod" in k]
        weights[on] = load_file(str(result.final_dir / "model.safetensors"))
        reloaded = load_model(result.final_dir)
        assert reloaded.state_dict().keys() == weights[on].keys()
    assert flags == [False, True]
    assert weights[True].keys() == weights[False].keys()
    assert not [k for k in weights[True] if "_orig_mod" in k]
    return weights[False], weights[True]


def test_compiled_training_saves_the_plain_modules_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "COMPILE_BACKEND", "eager")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    plain, compiled = _train_plain_then_compiled(tmp_path, monkeypatch)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # dynamo really traced the model
    for key in plain:
        torch.testing.assert_close(compiled[key], plain[key], atol=1e-6, rtol=0, msg=key)


@pytest.mark.slow
def test_inductor_compiled_training_matches_the_uncompiled_run(tmp_path, monkeypatch):
    try:
        prepare.compile_backend(recipe_from_dict({"train": {"compile": True}}))
    except ValueError as error:
        pytest.skip(str(error))
    plain, compiled = _train_plain_then_compiled(tmp_path, monkeypatch)
    for key in plain:
        # Inductor fuses and reorders float32 arithmetic; after 2 Adam steps the weights agree to rounding.
        torch.testing.assert_close(compiled[key], plain[key], atol=1e-4, rtol=1e-4, msg=key)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU run needs triton, not a C++ compiler")
def test_compile_without_a_compiler_is_a_one_line_error(tmp_path, monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/g++",))
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "run", write_image_csv(tmp_path, 8), max_steps=1, compile=True))
    with pytest.raises(ValueError) as error:
        train(recipe)
    assert str(error.value) == ("train.compile: torch.compile on a CPU needs a C++ compiler (g++ or clang++, or "
                                "$CXX naming one): apt-get install g++, or set train.compile: false")
    assert not (tmp_path / "run" / "final").exists()
