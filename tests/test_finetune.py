"""Fine-tuning from open_clip weight files (open_clip:ARCH@FILE) and layer-wise lr decay."""

from __future__ import annotations

import json
import math

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from vlpretrain.config import TrainConfig, recipe_from_dict
from vlpretrain.models import build_model, load_model
from vlpretrain.training import train
from vlpretrain.training.optim import create_optimizer, create_scheduler, layer_id, layer_scales, parameter_groups

from helpers import TINY_TEXT, TINY_VISION, read_metrics, tiny_model_config, write_image_csv

ARCH = "vlp-test-tiny-vit"
OTHER_ARCH = "vlp-test-tiny-vit-p16"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Two tiny registered open_clip architectures, and one model's weights as .pt and .safetensors."""
    folder = tmp_path_factory.mktemp("open_clip_configs")
    configs = {ARCH: {"embed_dim": 16, "vision_cfg": dict(TINY_VISION), "text_cfg": dict(TINY_TEXT)},
               OTHER_ARCH: {"embed_dim": 16, "vision_cfg": {**TINY_VISION, "patch_size": 16},
                            "text_cfg": dict(TINY_TEXT)}}
    for name, cfg in configs.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    files = tmp_path_factory.mktemp("weights")
    torch.save(state, files / "tiny.pt")
    save_file(state, str(files / "tiny.safetensors"))
    torch.save(open_clip.create_model(OTHER_ARCH).state_dict(), files / "other.pt")
    return files


@pytest.mark.parametrize("name", ["tiny.pt", "tiny.safetensors"])
def test_open_clip_file_gives_open_clips_own_model(weights, name):
    path = weights / name
    ours = load_model(f"open_clip:{ARCH}@{path}").eval()
    theirs = open_clip.create_model(ARCH, pretrained=str(path)).eval()
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32)
    tokens = ours.tokenizer(["a red square", "a blue circle", "an emoji"])
    with torch.no_grad():
        assert torch.equal(ours.encode_image(images), theirs.encode_image(images, normalize=True))
        assert torch.equal(ours.encode_text(tokens), theirs.encode_text(tokens, normalize=True))
    assert ours.logit_scale.item() == theirs.logit_scale.item()


def test_open_clip_training_checkpoint_layout_loads(weights, tmp_path):
    # open_clip's own training checkpoints: {"epoch", "state_dict": {"module.<key>": ...}}
    state = torch.load(weights / "tiny.pt")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "epoch_3.pt")
    model = load_model(f"open_clip:{ARCH}@{tmp_path / 'epoch_3.pt'}")
    assert torch.equal(model.clip.visual.conv1.weight, state["visual.conv1.weight"])


def test_corrupt_missing_and_mismatched_files(weights, tmp_path):
    unreadable = "cannot read weights from the file (corrupt, truncated, or not a PyTorch / safetensors state dict)"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(ValueError) as e:
        load_model(f"open_clip:{ARCH}@{garbage}")
    assert str(e.value) == f"open_clip:{ARCH}@{garbage}: {unreadable}"

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((weights / "tiny.safetensors").read_bytes()[:500])
    with pytest.raises(ValueError) as e:
        load_model(f"open_clip:{ARCH}@{truncated}")
    assert str(e.value) == f"open_clip:{ARCH}@{truncated}: {unreadable}"

    missing = tmp_path / "nowhere" / "w.pt"
    with pytest.raises(FileNotFoundError) as e:
        load_model(f"open_clip:{ARCH}@{missing}")
    assert str(e.value) == (f"open_clip:{ARCH}@{missing}: weights file not found (give the path of an open_clip "
                            f".pt / .bin / .safetensors file, or a pretrained tag)")

    other = weights / "other.pt"
    with pytest.raises(ValueError) as e:
        load_model(f"open_clip:{ARCH}@{other}")
    assert str(e.value) == (f"open_clip:{ARCH}@{other}: weights do not fit {ARCH} (size mismatch at visual.conv1.weight: "
                            f"file (32, 3, 16, 16), model (32, 3, 8, 8)); check the architecture name")

    state = torch.load(weights / "tiny.pt")
    del state["text_projection"]
    state["extra.weight"] = torch.zeros(2)
    state["extra.bias"] = torch.zeros(2)
    partial = tmp_path / "partial.pt"
    torch.save(state, partial)
    with pytest.raises(ValueError) as e:
        load_model(f"open_clip:{ARCH}@{partial}")
    assert str(e.value) == (f"open_clip:{ARCH}@{partial}: weights do not fit {ARCH} (missing from the file: "
                            f"text_projection; not in the model: extra.weight and 1 more); check the architecture name")


def test_layer_ids_of_every_tower_kind():
    assert layer_id("clip.visual.conv1.weight") == ("image", 0)
    assert layer_id("clip.visual.transformer.resblocks.3.attn.in_proj_weight") == ("image", 4)
    assert layer_id("clip.transformer.resblocks.0.mlp.c_fc.weight") == ("text", 1)
    assert layer_id("clip.text.transformer.resblocks.2.ln_1.weight") == ("text", 3)
    assert layer_id("clip.positional_embedding") == ("text", 0)
    assert layer_id("clip.visual.trunk.blocks.11.attn.qkv.weight") == ("image", 12)
    assert layer_id("clip.visual.trunk.pos_embed") == ("image", 0)
    assert layer_id("clip.text.transformer.encoder.layer.5.attention.self.query.weight") == ("text", 6)
    assert layer_id("clip.text.transformer.embeddings.word_embeddings.weight") == ("text", 0)
    assert layer_id("clip.hf_model.vision_model.encoder.layers.7.mlp.fc1.weight") == ("image", 8)
    assert layer_id("clip.hf_model.vision_model.embeddings.patch_embedding.weight") == ("image", 0)
    assert layer_id("clip.hf_model.text_model.encoder.layers.0.self_attn.q_proj.weight") == ("text", 1)
    assert layer_id("clip.hf_model.text_model.embeddings.token_embedding.weight") == ("text", 0)
    for top in ("clip.visual.ln_post.weight", "clip.visual.proj", "clip.text_projection", "clip.logit_scale",
                "clip.visual.trunk.norm.weight", "clip.hf_model.vision_model.post_layernorm.weight",
                "clip.hf_model.visual_projection.weight", "clip.text.proj.weight", "clip.something_new"):
        assert layer_id(top) == (None, None)


def test_layer_decay_groups_match_a_hand_computation():
    model = build_model(tiny_model_config(vision={**TINY_VISION, "layers": 2}))  # image: 2 blocks, text: 1
    d, lr = 0.5, 1e-3
    by_hand = {"clip.visual.conv1.weight": d ** 3, "clip.visual.class_embedding": d ** 3,
               "clip.visual.positional_embedding": d ** 3, "clip.visual.ln_pre.weight": d ** 3,
               "clip.visual.transformer.resblocks.0.attn.in_proj_weight": d ** 2,
               "clip.visual.transformer.resblocks.1.mlp.c_fc.bias": d, "clip.visual.ln_post.bias": 1.0,
               "clip.visual.proj": 1.0, "clip.token_embedding.weight": d ** 2, "clip.positional_embedding": d ** 2,
               "clip.transformer.resblocks.0.ln_1.weight": d, "clip.ln_final.weight": 1.0,
               "clip.text_projection": 1.0, "clip.logit_scale": 1.0}
    scales = layer_scales(model, d)
    assert {k: scales[k] for k in by_hand} == by_hand

    no_decay = {"clip.visual.class_embedding", "clip.visual.positional_embedding", "clip.visual.ln_pre.weight",
                "clip.visual.transformer.resblocks.1.mlp.c_fc.bias", "clip.visual.ln_post.bias",
                "clip.token_embedding.weight", "clip.positional_embedding", "clip.transformer.resblocks.0.ln_1.weight",
                "clip.ln_final.weight", "clip.logit_scale"}
    groups = parameter_groups(model, 0.2, layer_decay=d, lr=lr)
    group_of = {id(p): g for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    for name, scale in by_hand.items():
        group = group_of[id(params[name])]
        assert group["lr"] == lr * scale and group["lr_scale"] == scale, name
        assert group["weight_decay"] == (0.0 if name in no_decay else 0.2), name
    assert sum(len(g["params"]) for g in groups) == len(params)
    assert groups[0]["lr_scale"] == 1.0  # the trainer logs group 0's lr: the base one
    # Without layer_decay: the two groups as before.
    assert [g["weight_decay"] for g in parameter_groups(model, 0.2)] == [0.2, 0.0]

    cfg = TrainConfig(lr=lr, weight_decay=0.2, layer_decay=d, warmup_steps=2, schedule="cosine")
    optimizer = create_optimizer(model, cfg)
    scheduler = create_scheduler(optimizer, cfg, total_steps=10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    factor = scheduler.get_last_lr()[0] / lr
    assert 0 < factor < 1
    for group in optimizer.param_groups:  # the schedule scales every group's own lr
        assert math.isclose(group["lr"], lr * group["lr_scale"] * factor, rel_tol=1e-9)

    with pytest.raises(ValueError) as e:
        create_optimizer(model, TrainConfig(layer_decay=1.5))
    assert str(e.value) == "train.layer_decay must be in (0, 1], got 1.5 (e.g. 0.75; null turns it off)"


def test_finetune_from_open_clip_file_with_layer_decay(weights, tmp_path):
    csv = write_image_csv(tmp_path, 8)
    lr, decay = 1e-3, 0.5
    recipe = {"model": {"arch": ARCH, "pretrained": str(weights / "tiny.pt")},
              "data": {"train": str(csv), "num_workers": 0},
              "train": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "max_steps": 2, "lr": lr,
                        "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0, "layer_decay": decay,
                        "log_every": 1, "progress": False, "threads": 1}}
    result = train(recipe_from_dict(recipe))
    assert result.step == 2
    start, final = torch.load(weights / "tiny.pt"), load_model(result.final_dir).state_dict()
    change = {k: (final[f"clip.{k}"] - start[k]).abs().max().item() for k in start}
    # Adam moves each weight by about lr * scale per step: the patch embedding (scale 0.5^2, below the
    # one block) at most a quarter of what the projection (scale 1) moves.
    assert 0 < change["visual.conv1.weight"] <= 2 * lr * decay ** 2 * 1.05
    assert 2 * lr * decay ** 2 * 1.05 < change["visual.proj"] <= 2 * lr * 1.05
    assert [r["lr"] for r in read_metrics(tmp_path / "run") if "loss" in r][0] == pytest.approx(lr)  # group 0 is the base lr
