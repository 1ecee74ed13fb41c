"""Non-finite losses and weights: a NaN / inf loss skips the step (no update, counted), N in a row stop the
run with one line, NaN weights are never saved as final/; unreadable weight files are one-line errors."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlpretrain.config import recipe_from_dict
from vlpretrain.models import build_model
from vlpretrain.training import train
from vlpretrain.training.step import NonFiniteGuard, NonFiniteLossError

from helpers import read_metrics, spawn_gloo, tiny_model_config, tiny_recipe, vlp, write_image_csv

FIXED_LR = dict(schedule="constant", warmup_steps=0, weight_decay=0.0, precision="no")


class _NaNAtCalls(torch.nn.Module):
    """The run's objective, with every ``*_loss`` term made NaN at the given calls (1-based)."""

    def __init__(self, inner: torch.nn.Module, calls: set[int]):
        super().__init__()
        self.inner, self.calls, self.count = inner, calls, 0

    def forward(self, **kwargs):
        self.count += 1
        out = self.inner(**kwargs)
        if self.count in self.calls:
            out = {k: v * float("nan") if k.endswith("_loss") else v for k, v in out.items()}
        return out


def _nan_loss_at(monkeypatch, calls: set[int]) -> None:
    import vlpretrain.training.prepare as prepare

    make_loss = prepare._make_loss
    monkeypatch.setattr(prepare, "_make_loss", lambda cfg: _NaNAtCalls(make_loss(cfg), calls))


def test_a_nan_loss_step_leaves_the_weights_alone_and_is_counted(tmp_path, monkeypatch):
    csv = write_image_csv(tmp_path, 8)
    reference = train(recipe_from_dict(tiny_recipe(tmp_path / "one", csv, max_steps=1, **FIXED_LR)))
    _nan_loss_at(monkeypatch, {2})
    skipped = train(recipe_from_dict(tiny_recipe(tmp_path / "two", csv, max_steps=2, **FIXED_LR)))

    assert skipped.step == 2 and skipped.nonfinite_steps == 1
    a = load_file(str(reference.final_dir / "model.safetensors"))
    b = load_file(str(skipped.final_dir / "model.safetensors"))
    for key in a:  # step 2 changed nothing: the weights are those after step 1
        assert torch.equal(a[key], b[key]), key
    records = [r for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert [r["nonfinite_steps"] for r in records] == [0, 1]
    assert records[0]["loss"] == pytest.approx(read_metrics(tmp_path / "one")[0]["loss"])
    assert records[1]["loss"] != records[1]["loss"]  # NaN: no finite step in that interval
    assert "saved the final model to" in (tmp_path / "two" / "train.rank0.log").read_text()
    assert "(steps skipped for a non-finite loss: 1)" in (tmp_path / "two" / "train.rank0.log").read_text()


def test_max_nonfinite_steps_in_a_row_stop_the_run_without_final(tmp_path, monkeypatch):
    csv = write_image_csv(tmp_path, 8)  # 2 steps per epoch
    _nan_loss_at(monkeypatch, {3, 5, 6, 7})
    cfg = recipe_from_dict(tiny_recipe(tmp_path / "run", csv, epochs=5, max_nonfinite_steps=3, **FIXED_LR))
    with pytest.raises(NonFiniteLossError) as error:
        train(cfg)
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # step 7 stopped the run before its record
    assert [r["nonfinite_steps"] for r in records] == [0, 0, 1, 1, 2, 3]
    last_finite = records[3]["loss"]  # step 3's NaN broke no streak of 3: step 4 was finite
    assert str(error.value) == (f"train: the loss was not finite for 3 steps in a row (steps 5-7; last finite loss "
                                f"{last_finite:.4g} at step 4); lower train.lr or check the data")
    assert not (tmp_path / "run" / "final").exists()


def test_nan_weights_are_never_saved(tmp_path):
    model = build_model(tiny_model_config())
    model.save_pretrained(tmp_path / "good")
    before = (tmp_path / "good" / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.clip.visual.conv1.weight[0, 0, 0, 0] = float("inf")
    for target in (tmp_path / "new", tmp_path / "good"):
        with pytest.raises(ValueError) as error:
            model.save_pretrained(target)
        assert str(error.value) == (f"{target}: not written: the weights hold NaN or inf values "
                                    f"(e.g. in clip.visual.conv1.weight)")
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "good" / "model.safetensors").read_bytes() == before  # the earlier model is kept


def test_nan_weights_at_the_end_of_a_run_write_no_final(tmp_path):
    """A huge lr makes the weights NaN; with the streak limit out of reach the run gets to its end, and the
    check before saving refuses them (no last checkpoint, no final/)."""
    csv = write_image_csv(tmp_path, 8)
    cfg = recipe_from_dict(tiny_recipe(tmp_path / "run", csv, epochs=4, lr=1e6, max_nonfinite_steps=100,
                                       checkpoint_every=100, precision="no"))
    with pytest.raises(ValueError, match=r"^train: the weights hold NaN or inf values after step 8 \(e\.g\. \S+\); "
                                         r"final/ was not written; lower train\.lr or check the data$"):
        train(cfg)
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / "checkpoints").exists()
    assert read_metrics(tmp_path / "run")[-1]["nonfinite_steps"] > 0


@pytest.mark.slow
def test_a_huge_lr_exits_non_zero_with_one_line_and_no_final(tmp_path):
    """train.lr=1e6 blows the weights up: the run stops (non-finite losses in a row, or NaN weights at the
    end) with one error line, exit 2, and no final/."""
    csv = write_image_csv(tmp_path, 16)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "run", csv, epochs=3, precision="no")))
    proc = vlp("train", str(recipe), "train.lr=1e6")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.fullmatch(r"vlp train: error: train: (the loss was not finite for 5 steps in a row \(steps \d+-\d+; "
                        r"last finite loss \S+ at step \d+\)|the weights hold NaN or inf values after step \d+ "
                        r"\(e\.g\. \S+\); final/ was not written); lower train\.lr or check the data",
                        proc.stderr.strip().splitlines()[-1]), proc.stderr[-2000:]
    assert not (tmp_path / "run" / "final").exists()


class _GlooAccelerator:
    """What NonFiniteGuard needs of an Accelerator, over the test's gloo process group."""

    def __init__(self, world: int):
        self.num_processes = world

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        import torch.distributed as dist

        assert reduction == "sum"
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor


def _guard_worker(rank: int, world: int) -> list:
    guard = NonFiniteGuard(_GlooAccelerator(world), limit=2)
    losses = [(1.0, 3.0), (1.0, float("nan")), (2.0, 4.0), (float("inf"), 1.0)]  # (rank 0, rank 1) per step
    decisions = [guard.check(torch.tensor(pair[rank]), step) for step, pair in enumerate(losses, start=1)]
    try:
        guard.check(torch.tensor(float("nan")), 5)
    except NonFiniteLossError as e:
        decisions.append(str(e))
    return decisions


@pytest.mark.slow
def test_every_process_skips_when_one_has_a_nan_loss():
    assert spawn_gloo(_guard_worker, 2) == [
        True, False, True, False,
        "train: the loss was not finite for 2 steps in a row (steps 4-5; last finite loss 3 at step 3); "
        "lower train.lr or check the data"]


def _pickle_that_touches(marker) -> bytes:
    """A .bin / .pt whose unpickling would run code: it creates ``marker``."""
    import io
    import os

    class Planted:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    buffer = io.BytesIO()
    torch.save({"weight": Planted()}, buffer)
    return buffer.getvalue()


@pytest.mark.slow
def test_unreadable_weights_of_our_checkpoint_are_one_line_exit_2(tmp_path):
    csv = write_image_csv(tmp_path, 4)
    folder = build_model(tiny_model_config()).save_pretrained(tmp_path / "ckpt")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # a truncated download
    proc = vlp("embed", "--model", str(folder), "--data", str(csv), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr == (f"vlp embed: error: {weights}: unreadable or truncated weights file (Error while "
                           f"deserializing header: incomplete metadata, file not fully covered)\n")

    weights.write_bytes(_pickle_that_touches(tmp_path / "ran"))  # a pickle under the safetensors name
    proc = vlp("embed", "--model", str(folder), "--data", str(csv), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"vlp embed: error: {weights}: unreadable or truncated weights file (")
    assert not (tmp_path / "ran").exists()


@pytest.mark.slow
def test_a_pickled_bin_in_a_transformers_folder_is_refused_in_one_line(tmp_path):
    pytest.importorskip("transformers")
    from test_hf_models import _clip_tokenizer, tiny_clip_config

    tokenizer = _clip_tokenizer()
    config = tiny_clip_config(tokenizer)
    folder = tmp_path / "hf-clip"
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(_pickle_that_touches(tmp_path / "ran"))
    csv = write_image_csv(tmp_path, 4)
    proc = vlp("embed", "--model", f"hf:{folder}", "--data", str(csv), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr == (f"vlp embed: error: {folder / 'pytorch_model.bin'}: refused: not a plain weights file "
                           f"(a pickle holding code or objects that a weights-only load does not run); use "
                           f"model.safetensors\n")
    assert not (tmp_path / "ran").exists()
