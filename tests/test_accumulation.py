"""train.accum_freq: K micro-batches of B (features cached, then recomputed with gradients) train exactly
like one batch of K x B, for InfoNCE and SigLIP, in 1 and 2 processes; random draws are replayed; ALBEF
refuses it; a resumed run ends on the uninterrupted run's weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file

from vlpretrain.config import ConfigError, recipe_from_dict
from vlpretrain.losses import create_loss
from vlpretrain.models import build_model
from vlpretrain.training import train
from vlpretrain.training.accumulation import accumulate_gradients

from helpers import (TINY_TEXT, TINY_VISION, interrupt_at_step, launch_two_processes, read_metrics, spawn_gloo,
                     tiny_model_config, tiny_recipe, vlp, write_image_csv, write_test_shards)

ALBEF_REFUSAL = ("train.accum_freq > 1 is not available with loss.name=albef (its ITM hard negatives and momentum "
                 "queue need the whole batch in one forward); use accum_freq: 1")


def _siglip_arch(folder: Path) -> str:
    """A tiny open_clip config with a learnable logit bias (what loss.name=siglip needs)."""
    path = Path(folder) / "tiny-siglip.json"
    path.write_text(json.dumps({"embed_dim": 16, "init_logit_bias": -10.0, "vision_cfg": TINY_VISION,
                                "text_cfg": TINY_TEXT}))
    return str(path)


def _model(loss: str, folder: Path, **vision) -> torch.nn.Module:
    torch.manual_seed(0)
    arch = _siglip_arch(folder) if loss == "siglip" else "ViT-B-32"
    model = build_model(tiny_model_config(arch=arch, vision={**TINY_VISION, **vision}))
    return model.train()


def _pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    tokens = torch.randint(1, 400, (n, 16), generator=generator)
    tokens[:, -1] = 49407  # an end-of-text token, where the text tower pools
    return images, tokens


def _micro_batches(images: torch.Tensor, tokens: torch.Tensor, size: int) -> list[dict]:
    return [{"image": images[i:i + size], "tokens": tokens[i:i + size]} for i in range(0, len(images), size)]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _big_batch(model, loss_name: str, images, tokens) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reference: one forward and backward over the whole batch."""
    loss = create_loss(loss_name)(**model(images, tokens))["contrastive_loss"]
    loss.backward()
    return loss.detach(), _grads(model)


def _accumulated(model, loss_name: str, images, tokens, micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss, _ = accumulate_gradients(lambda b: model(b["image"], b["tokens"]), create_loss(loss_name),
                                   _micro_batches(images, tokens, micro), total=lambda t: t["contrastive_loss"])
    return loss, _grads(model)


def _assert_same_grads(a: dict, b: dict, loss_name: str) -> None:
    shared = {"clip.logit_scale"} | ({"clip.logit_bias"} if loss_name == "siglip" else set())
    assert set(a) == set(b) and len(a) > 10 and shared <= set(a)  # the 1/K gradient of the shared scalars
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


@pytest.mark.parametrize("loss_name", ["contrastive", "siglip"])
def test_four_micro_batches_of_two_give_the_gradients_of_one_batch_of_eight(tmp_path, loss_name):
    images, tokens = _pairs(8)
    big_loss, big = _big_batch(_model(loss_name, tmp_path), loss_name, images, tokens)
    loss, accumulated = _accumulated(_model(loss_name, tmp_path), loss_name, images, tokens, micro=2)
    assert torch.allclose(loss, big_loss, atol=1e-5)
    _assert_same_grads(accumulated, big, loss_name)
    # Control: four plain losses over 2 pairs each (2 - 1 negatives a row) give other gradients.
    plain = _model(loss_name, tmp_path)
    for batch in _micro_batches(images, tokens, 2):
        (create_loss(loss_name)(**plain(batch["image"], batch["tokens"]))["contrastive_loss"] / 4).backward()
    assert any(not torch.allclose(g, big[n], atol=1e-4) for n, g in _grads(plain).items())


def test_replayed_random_state_gives_the_cached_patch_dropout_masks(tmp_path):
    """With patch dropout (FLIP) the gradients equal those of the K micro-batches encoded once, with the
    draws of the cached pass, and backpropagated together; torch's generator ends where they leave it."""
    images, tokens = _pairs(8)
    model = _model("contrastive", tmp_path, patch_dropout=0.5)
    torch.manual_seed(5)
    outs = [model(b["image"], b["tokens"]) for b in _micro_batches(images, tokens, 2)]
    after_reference = torch.get_rng_state()
    features = {k: torch.cat([o[k] for o in outs]) for k in ("image_features", "text_features")}
    create_loss("contrastive")(**features, logit_scale=outs[0]["logit_scale"])["contrastive_loss"].backward()
    reference = _grads(model)

    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    _, accumulated = _accumulated(model, "contrastive", images, tokens, micro=2)
    assert torch.equal(torch.get_rng_state(), after_reference)
    _assert_same_grads(accumulated, reference, "contrastive")
    # Control: other draws (another seed) give other gradients, so the masks really matter here.
    model.zero_grad(set_to_none=True)
    torch.manual_seed(6)
    _, other = _accumulated(model, "contrastive", images, tokens, micro=2)
    assert any(not torch.allclose(g, reference[n], atol=1e-4) for n, g in other.items())


def _gloo_worker(rank: int, world: int, folder: str) -> dict:
    """Each of 2 processes: its 8 of the 16 pairs as 4 micro-batches of 2, gradients averaged as DDP does."""
    results = {}
    for loss_name in ("contrastive", "siglip"):
        images, tokens = _pairs(16)
        local = slice(rank * 8, (rank + 1) * 8)
        model = _model(loss_name, Path(folder))
        loss, grads = _accumulated(model, loss_name, images[local], tokens[local], micro=2)
        for tensor in [loss, *grads.values()]:
            dist.all_reduce(tensor)
            tensor /= world
        results[loss_name] = {"loss": loss, "grads": grads}
    return results


@pytest.mark.slow
def test_two_processes_accumulating_give_the_gradients_of_one_batch(tmp_path):
    """2 gloo processes x 4 micro-batches of 2 == 1 process x 16: the loss's all-gather sees every rank's
    cached and fresh features."""
    two = spawn_gloo(_gloo_worker, 2, str(tmp_path))
    images, tokens = _pairs(16)
    for loss_name in ("contrastive", "siglip"):
        loss, grads = _big_batch(_model(loss_name, tmp_path), loss_name, images, tokens)
        assert torch.allclose(two[loss_name]["loss"], loss, atol=1e-5), loss_name
        _assert_same_grads(two[loss_name]["grads"], grads, loss_name)


def _recipe(tmp_path: Path, out: str, csv: Path, loss_name: str, **train) -> dict:
    recipe = tiny_recipe(tmp_path / out, csv, precision="no", **train)
    if loss_name == "siglip":
        recipe["model"]["arch"] = _siglip_arch(tmp_path)
        recipe["loss"] = {"name": "siglip"}
    return recipe


def _assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if key.endswith("attn.in_proj_bias"):
            # The key-bias third has an exact gradient of zero (softmax ignores a shift shared by all keys),
            # so Adam divides rounding noise by its own size there: compare the rest.
            width = x.shape[0] // 3
            x, y = torch.cat([x[:width], x[2 * width:]]), torch.cat([y[:width], y[2 * width:]])
        assert torch.allclose(x, y, atol=atol), key


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


@pytest.mark.parametrize("loss_name", ["contrastive", "siglip"])
def test_trainer_with_accum_freq_4_ends_on_the_weights_of_batch_8(tmp_path, loss_name):
    csv = write_image_csv(tmp_path, 24)
    accumulated = train(recipe_from_dict(_recipe(tmp_path, "acc", csv, loss_name, batch_size=2, accum_freq=4)))
    big = train(recipe_from_dict(_recipe(tmp_path, "big", csv, loss_name, batch_size=8)))
    assert accumulated.step == big.step == 3  # 12 micro-batches of 2 make 3 optimizer steps
    _assert_same_weights(load_file(str(accumulated.final_dir / "model.safetensors")),
                         load_file(str(big.final_dir / "model.safetensors")))
    assert _losses(tmp_path / "acc") == pytest.approx(_losses(tmp_path / "big"), abs=1e-5)
    assert [r["samples_seen"] for r in read_metrics(tmp_path / "acc") if "loss" in r] == [8, 16, 24]


@pytest.mark.slow
@pytest.mark.parametrize("loss_name", ["contrastive", "siglip"])
def test_two_processes_with_accum_freq_2_train_like_one_with_batch_8(tmp_path, loss_name):
    """accelerate launch: 2 gloo processes x 2 micro-batches of 2 == 1 process x 8, step for step."""
    csv = write_image_csv(tmp_path, 24)
    two = _recipe(tmp_path, "two", csv, loss_name, batch_size=2, accum_freq=2)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    launch_two_processes("train", str(tmp_path / "two.yaml"))
    assert (tmp_path / "two" / "train.rank1.log").exists()  # really two processes
    one = train(recipe_from_dict(_recipe(tmp_path, "one", csv, loss_name, batch_size=8)))
    _assert_same_weights(load_file(str(tmp_path / "two" / "final" / "model.safetensors")),
                         load_file(str(one.final_dir / "model.safetensors")))
    assert len(_losses(tmp_path / "two")) == 3
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), abs=1e-5)


def test_albef_refuses_accumulation_in_one_line(tmp_path):
    recipe = tiny_recipe(tmp_path / "run", write_image_csv(tmp_path, 8), accum_freq=2)
    recipe["loss"] = {"name": "albef"}
    with pytest.raises(ConfigError) as error:
        train(recipe_from_dict(recipe))
    assert str(error.value) == ALBEF_REFUSAL
    (tmp_path / "albef.yaml").write_text(yaml.safe_dump(recipe))
    proc = vlp("train", str(tmp_path / "albef.yaml"))
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].endswith(ALBEF_REFUSAL)


def test_more_micro_batches_per_step_than_an_epoch_holds_is_an_error(tmp_path):
    recipe = tiny_recipe(tmp_path / "run", write_image_csv(tmp_path, 8), batch_size=2, accum_freq=8)
    with pytest.raises(ValueError, match=r"^train.accum_freq: 8 micro-batches make one optimizer step, but an epoch "
                                         r"holds only 4 per process: lower train.accum_freq or train.batch_size$"):
        train(recipe_from_dict(recipe))


def test_resume_with_accum_freq_2_ends_on_the_uninterrupted_weights(tmp_path):
    """14 pairs in micro-batches of 2: 7 per epoch, 3 steps of 2 (the 7th is left out); patch dropout draws
    from torch's generator, so its state at the checkpoint matters too."""
    csv = write_image_csv(tmp_path, 14)
    settings = dict(batch_size=2, accum_freq=2, epochs=2, checkpoint_every=1, keep_checkpoints=10)

    def recipe(out: str, **extra) -> dict:
        values = _recipe(tmp_path, out, csv, "contrastive", **settings, **extra)
        values["model"]["vision"]["patch_dropout"] = 0.5
        return values

    full = train(recipe_from_dict(recipe("full")))
    interrupt_at_step(recipe_from_dict(recipe("cut")), 5)
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step_00000005" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"], state["samples_seen"]) == (5, 1, 2, 20)
    assert state["accum_freq"] == 2
    resumed = train(recipe_from_dict(recipe("cut", resume="latest")))
    assert resumed.step == full.step == 6
    assert [r["step"] for r in read_metrics(tmp_path / "cut") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")
    a = load_file(str(full.final_dir / "model.safetensors"))
    b = load_file(str(resumed.final_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resumed_shard_stream_with_accum_freq_2_repeats_the_uninterrupted_losses(tmp_path):
    """A stream of shards skips the micro-batches of the steps done (22 samples: 11 micro-batches of 2, 5 steps)."""
    write_test_shards(tmp_path / "shards", [6, 5, 7, 4], manifest=True)
    settings = dict(batch_size=2, accum_freq=2, epochs=2, checkpoint_every=3, keep_checkpoints=5)

    def recipe(out: str, **extra) -> dict:
        values = tiny_recipe(tmp_path / out, tmp_path / "shards", precision="no", **settings, **extra)
        values["data"]["shuffle_buffer"] = 6
        return values

    full = train(recipe_from_dict(recipe("full")))
    interrupt_at_step(recipe_from_dict(recipe("cut")), 4)
    resumed = train(recipe_from_dict(recipe("cut", resume="latest")))
    assert resumed.step == full.step == 10
    expected = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full") if "loss" in r}
    records = [r for r in read_metrics(tmp_path / "cut") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10]  # step 4 redone after the cut
    assert {r["step"]: r["loss"] for r in records} == expected
