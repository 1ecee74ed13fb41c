"""model.grad_checkpointing: every tower kind recomputes its blocks in the backward pass (a block runs twice
per training step), and the gradients equal those of the same model without checkpointing."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from vlpretrain.config import ModelConfig, recipe_from_dict
from vlpretrain.losses import create_loss
from vlpretrain.models import build_model, load_model
from vlpretrain.training import train

from helpers import tiny_model_config, tiny_recipe, write_image_csv

CAPTIONS = ["a red square", "a blue circle", "a photo of the cat", "a green frog"]


def _count_calls(module: torch.nn.Module) -> list[int]:
    """A one-element counter that ``module``'s forward increments, recomputations included (torch's
    checkpoint recomputes without running module hooks, so the forward itself is wrapped)."""
    calls, forward = [0], module.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    module.forward = counted
    return calls


def _gradients(model, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """One training forward + contrastive loss + backward from a fixed seed (the same dropout draws)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    losses = create_loss("contrastive")(**model(images, tokens))
    sum(v for k, v in losses.items() if k.endswith("_loss")).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_gradients_and_recomputed(plain, blocks) -> None:
    """``blocks(model)`` lists one block per tower; each runs once per step without checkpointing, twice with."""
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    images = torch.randn(4, 3, plain.open_clip_config["vision_cfg"]["image_size"],
                         plain.open_clip_config["vision_cfg"]["image_size"], generator=torch.Generator().manual_seed(1))
    tokens = plain.tokenizer(CAPTIONS)
    counters = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        counters[name] = [_count_calls(block) for block in blocks(model)]
    expected = _gradients(plain, images, tokens)
    got = _gradients(checkpointed, images, tokens)
    assert [c[0] for c in counters["plain"]] == [1] * len(counters["plain"])
    assert [c[0] for c in counters["checkpointed"]] == [2] * len(counters["checkpointed"])  # recomputed
    trainable = {n for n, p in plain.named_parameters() if p.requires_grad}
    assert expected.keys() == got.keys() == trainable
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)


def test_open_clip_towers_give_the_same_gradients():
    torch.manual_seed(0)
    model = build_model(tiny_model_config())
    _assert_same_gradients_and_recomputed(
        model, lambda m: [m.clip.visual.transformer.resblocks[0], m.clip.transformer.resblocks[0]])
    model.set_grad_checkpointing(True)
    assert model.clip.visual.transformer.grad_checkpointing and model.clip.transformer.grad_checkpointing
    model.set_grad_checkpointing(False)
    assert not model.clip.visual.transformer.grad_checkpointing and not model.clip.transformer.grad_checkpointing


def test_timm_and_hugging_face_text_towers_give_the_same_gradients():
    """CustomTextCLIP: a timm ViT trunk and the MiniLM text tower (with its dropout, replayed on recompute)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="ViT-B-32", embed_dim=16, vision={"image_size": 32},
                                    image_tower="timm:test_vit", text_tower="hf:minilm-l6", pretrained_text=False))
    _assert_same_gradients_and_recomputed(
        model, lambda m: [m.clip.visual.trunk.blocks[0].mlp, m.clip.text.transformer.encoder.layer[0].output])


def test_transformers_clip_towers_give_the_same_gradients(tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_hf_models import _clip_tokenizer, tiny_clip_config

    torch.manual_seed(0)
    tokenizer = _clip_tokenizer()
    folder = tmp_path / "tiny-clip"
    transformers.CLIPModel(tiny_clip_config(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                    crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    model = build_model(ModelConfig(hf_model=str(folder)))
    # transformers checkpoints a layer's class-level forward: an instance forward on the layer would bypass it.
    _assert_same_gradients_and_recomputed(
        model, lambda m: [m.clip.hf_model.vision_model.encoder.layers[0].mlp,
                          m.clip.hf_model.text_model.encoder.layers[0].mlp])


def test_training_with_checkpointing_recomputes_and_ends_with_the_same_weights(tmp_path, monkeypatch):
    """The recipe key reaches the model the trainer builds; two steps end where they do without it, and
    final/ records the key and loads as any checkpoint does."""
    import vlpretrain.training.prepare as prepare

    csv = write_image_csv(tmp_path, 8)
    calls = {}
    build = prepare.build_start_model

    def counted(cfg, **kwargs):
        model = build(cfg, **kwargs)
        calls[cfg.grad_checkpointing] = _count_calls(model.clip.visual.transformer.resblocks[0])
        return model

    monkeypatch.setattr(prepare, "build_start_model", counted)
    finals = {}
    for on in (False, True):
        recipe = tiny_recipe(tmp_path / f"run-{on}", csv, max_steps=2)
        recipe["model"]["grad_checkpointing"] = on
        finals[on] = train(recipe_from_dict(recipe)).final_dir
    assert calls[False][0] == 2 and calls[True][0] == 4  # one forward per step, plus the recompute
    plain, checkpointed = (load_file(str(finals[on] / "model.safetensors")) for on in (False, True))
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], atol=1e-6, rtol=0, msg=key)
    assert json.loads((finals[True] / "vlp_config.json").read_text())["model"]["grad_checkpointing"] is True
    reloaded = load_model(finals[True])
    assert not reloaded.clip.visual.transformer.grad_checkpointing  # training-time only
