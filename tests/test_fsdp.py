"""The trainer under FSDP (FSDP2, Accelerate's FSDP plugin) with 2 gloo processes on the CPU: 3 steps give the
losses and weights of DDP, the consolidated final/ loads and exports, a sharded checkpoint resumes to the weights
of the uninterrupted run, and what does not fit (another world size, what FSDP does not support yet) is refused
in one line."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from vlpretrain.config import recipe_from_dict
from vlpretrain.training import train
from vlpretrain.training.fsdp import check_fsdp_supported
from vlpretrain.training.sharded_checkpoint import (SHARD_LAYOUT, _check_optimizer_shard, check_shard_layout,
                                                    save_sharded_objects)

from helpers import read_metrics, spawn_gloo, tiny_recipe, write_image_csv

# What `accelerate launch --config_file recipes/accelerate/fsdp.yaml` sets (the launcher turns the config's
# fsdp_config into these variables; test_launch_configs checks the file), with fp32 for this CPU.
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "ResidualAttentionBlock", "FSDP_RESHARD_AFTER_FORWARD": "true",
            "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT", "FSDP_OFFLOAD_PARAMS": "false"}
# grad_clip_norm: the clip goes through Accelerate's DTensor-aware norm under FSDP.
SETTINGS = dict(max_steps=3, checkpoint_every=2, keep_checkpoints=5, precision="no", grad_clip_norm=1.0)


def _recipe(out: Path, csv: Path, **overrides):
    return recipe_from_dict(tiny_recipe(out, csv, batch_size=4, **{**SETTINGS, **overrides}))


def _three_runs(rank: int, world: int, root: str) -> None:
    """In each of the 2 processes: DDP, then FSDP, then FSDP resumed from its step-2 checkpoint.

    The process group is spawn_gloo's; Accelerate finds it through the usual launcher variables."""
    root_path = Path(root)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", CUDA_VISIBLE_DEVICES="")
    csv = root_path / "pairs.csv"
    train(_recipe(root_path / "ddp", csv))
    os.environ.update(FSDP_ENV)
    train(_recipe(root_path / "fsdp", csv))
    train(_recipe(root_path / "resumed", csv, resume=str(root_path / "fsdp" / "checkpoints" / "step_00000002")))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    write_image_csv(root, 24)  # global batch 8: 3 steps
    spawn_gloo(_three_runs, 2, str(root))
    return root


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.allclose(a[key], b[key], atol=atol, rtol=0), key


@pytest.mark.slow
def test_three_fsdp_steps_match_ddp_losses_and_weights(runs):
    # Same reductions in the same order on this CPU: equal to 1e-6 (measured: identical).
    fsdp = [r for r in read_metrics(runs / "fsdp") if "loss" in r]
    ddp = [r for r in read_metrics(runs / "ddp") if "loss" in r]
    assert [r["step"] for r in fsdp] == [r["step"] for r in ddp] == [1, 2, 3]
    for key in ("loss", "contrastive_loss", "logit_scale"):
        assert [r[key] for r in fsdp] == pytest.approx([r[key] for r in ddp], abs=1e-6), key
    _assert_same_weights(_weights(runs / "fsdp" / "final"), _weights(runs / "ddp" / "final"), atol=1e-6)


@pytest.mark.slow
def test_checkpoints_are_sharded_per_process_without_pickles(runs):
    checkpoint = runs / "fsdp" / "checkpoints" / "step_00000002"
    names = sorted(p.name for p in checkpoint.iterdir())
    for rank in (0, 1):
        assert f"model_shard_rank{rank}.safetensors" in names and f"optimizer_rank{rank}.safetensors" in names
    assert SHARD_LAYOUT in names and "model.safetensors" not in names  # weights only as shards
    assert not [n for n in names if n.endswith((".pkl", ".bin", ".pt", ".pth")) or n == ".metadata"]
    # Each process holds half the rows of a sharded weight.
    shards = [load_file(str(checkpoint / f"model_shard_rank{rank}.safetensors")) for rank in (0, 1)]
    full = _weights(runs / "ddp" / "checkpoints" / "step_00000002")
    key = "clip.visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert torch.equal(torch.cat([shards[0][key], shards[1][key]]), full[key])


@pytest.mark.slow
def test_final_is_consolidated_loads_and_exports(runs, tmp_path, capsys):
    import vlpretrain
    from vlpretrain.cli.main import main

    final = runs / "fsdp" / "final"
    model = vlpretrain.load_model(str(final))
    assert model.clip.logit_scale.shape == ()  # a scalar again, as open_clip saves it
    _assert_same_weights({k: v for k, v in model.state_dict().items()}, _weights(runs / "ddp" / "final"), atol=1e-6)
    assert main(["export", str(final), "--format", "open_clip", "--out", str(tmp_path / "exported")]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'exported'} (--format open_clip)")


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_to_the_uninterrupted_weights(runs):
    assert [r["step"] for r in read_metrics(runs / "resumed") if "loss" in r] == [3]
    _assert_same_weights(_weights(runs / "resumed" / "final"), _weights(runs / "fsdp" / "final"), atol=1e-6)


@pytest.mark.slow
def test_another_world_size_is_refused_in_one_line(runs, tmp_path):
    checkpoint = runs / "fsdp" / "checkpoints" / "step_00000002"
    listed = {p.name for p in checkpoint.iterdir()}
    with pytest.raises(ValueError) as error:
        check_shard_layout(checkpoint, listed, world_size=4, sharded_run=True)
    assert str(error.value) == (f"{checkpoint}: sharded by FSDP over 2 processes, but this run has 4; resume with "
                                f"--num_processes 2 (FSDP shards are per process), or start over with "
                                f"train.overwrite=true")
    # A one-process run without FSDP, through the trainer: refused before anything trains.
    with pytest.raises(ValueError) as error:
        train(_recipe(tmp_path / "one", runs / "pairs.csv", resume=str(checkpoint)))
    assert str(error.value) == (f"{checkpoint}: sharded by FSDP over 2 processes; resume it under FSDP with 2 "
                                f"processes (accelerate launch --config_file recipes/accelerate/fsdp.yaml "
                                f"--num_processes 2), or use its final/ weights")
    # And the other way round: a DDP checkpoint under FSDP.
    ddp_checkpoint = runs / "ddp" / "checkpoints" / "step_00000002"
    with pytest.raises(ValueError, match=r"not an FSDP checkpoint \(it has no fsdp_shards.json\)"):
        check_shard_layout(ddp_checkpoint, {p.name for p in ddp_checkpoint.iterdir()}, 2, sharded_run=True)


@pytest.mark.parametrize("override, named", [
    ({"train": {"ema_decay": 0.99}}, "train.ema_decay (EMA weights)"),
    ({"data": {"val": "pairs.csv"}}, "data.val (validation during training; evaluate final/ with vlp eval instead)"),
    ({"train": {"accum_freq": 2}}, "train.accum_freq > 1"),
    ({"train": {"eval_suite": "suite.yaml"}},
     "train.eval_suite (evaluation during training; evaluate final/ with vlp eval run instead)"),
    ({"loss": {"name": "albef", "momentum": 0.995}, "model": {"fusion": {"itm": True}}},
     "loss.momentum (ALBEF's momentum encoders)"),
])
def test_what_fsdp_does_not_support_yet_is_refused_in_one_line(override, named, tmp_path):
    recipe = tiny_recipe(tmp_path / "run", tmp_path / "pairs.csv")
    for section, values in override.items():
        recipe.setdefault(section, {}).update(values)
    fsdp2 = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2)))
    with pytest.raises(ValueError) as error:
        check_fsdp_supported(recipe_from_dict(recipe), fsdp2)
    assert str(error.value) == (f"{named} is not supported with FSDP yet; turn it off or train with DDP "
                                f"(recipes/accelerate/multi-gpu.yaml)")


def test_fsdp_version_1_is_refused_in_one_line(tmp_path):
    fsdp1 = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1)))
    with pytest.raises(ValueError) as error:
        check_fsdp_supported(recipe_from_dict(tiny_recipe(tmp_path / "run", tmp_path / "pairs.csv")), fsdp1)
    assert str(error.value) == ("FSDP version 1 is not supported: set fsdp_version: 2 in the Accelerate config (as "
                                "recipes/accelerate/fsdp.yaml does)")


def test_non_finite_weights_write_no_shard(tmp_path):
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.bias[1] = float("nan")
    one_process = SimpleNamespace(process_index=0, device="cpu", reduce=lambda tensor, reduction: tensor)
    objects = SimpleNamespace(model=model, accelerator=one_process)
    with pytest.raises(ValueError) as error:
        save_sharded_objects(objects, tmp_path)
    assert str(error.value) == (f"{tmp_path}: checkpoint not written: the weights hold NaN or inf values (e.g. bias); "
                                f"resume from the last checkpoint with a lower train.lr or a train.grad_clip_norm")
    assert list(tmp_path.iterdir()) == []


def test_optimizer_shard_without_state_or_of_other_parameters_is_one_line(tmp_path):
    path = tmp_path / "optimizer_rank0.json"
    fix = "resume with the recipe that wrote the checkpoint, or start over with train.overwrite=true"
    _check_optimizer_shard({"state": {"w": {"step": 1}}, "param_groups": []}, {"w", "b"}, path)  # fits
    with pytest.raises(ValueError) as error:
        _check_optimizer_shard({"param_groups": []}, {"w"}, path)
    assert str(error.value) == f"{path}: no optimizer state table ('state' of per-parameter entries); {fix}"
    with pytest.raises(ValueError) as error:
        _check_optimizer_shard({"state": {"w": {}, "old.proj": {}}}, {"w"}, path)
    assert str(error.value) == (f"{path}: optimizer state for parameters this model does not have (e.g. "
                                f"old.proj); {fix}")
