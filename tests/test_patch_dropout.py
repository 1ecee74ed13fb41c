"""FLIP's patch dropout (model.vision.patch_dropout): in training the image transformer sees a random half of
the patches; in eval mode it sees all of them and gives the features of the same model without dropout."""

from __future__ import annotations

from pathlib import Path

import torch

from vlpretrain.config import load_recipe
from vlpretrain.models import build_model

from helpers import TINY_VISION, tiny_model_config

REPO = Path(__file__).resolve().parents[1]
PATCHES = (TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2  # 16


def _tokens_seen(model) -> list[int]:
    """The token counts the image transformer receives, one entry per forward."""
    seen: list[int] = []
    model.clip.visual.transformer.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    return seen


def _images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_patch_dropout_drops_patches_in_training_only():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(vision={**TINY_VISION, "patch_dropout": 0.5}))
    assert model.clip.visual.transformer.batch_first  # token axis 1, as _tokens_seen reads it
    seen, images = _tokens_seen(model), _images()
    model.train()
    with torch.no_grad():
        features = []
        for seed in (0, 1, 0):
            torch.manual_seed(seed)
            features.append(model.encode_image(images))
    assert seen == [1 + PATCHES // 2] * 3  # class token + half of the 16 patches
    assert not torch.allclose(features[0], features[1])  # another seed keeps other patches
    assert torch.equal(features[0], features[2])  # the draw comes from torch's seeded generator

    model.eval()
    with torch.no_grad():
        evaluated = model.encode_image(images)
    assert seen[-1] == 1 + PATCHES
    plain = build_model(tiny_model_config())
    plain.load_state_dict(model.state_dict())  # patch dropout has no weights: the same model without it
    plain.eval()
    with torch.no_grad():
        assert torch.equal(evaluated, plain.encode_image(images))


def test_flip_recipe_is_the_demo_with_half_the_patches_dropped():
    flip = load_recipe(REPO / "recipes" / "flip-emoji.yaml")
    demo = load_recipe(REPO / "recipes" / "demo-emoji.yaml")
    assert flip.model.vision.pop("patch_dropout") == 0.5
    differences = {f"{section}.{key}" for section, values in flip.to_dict().items()
                   for key, value in values.items() if demo.to_dict()[section][key] != value}
    assert differences == {"train.epochs", "train.output_dir"}
    assert flip.train.epochs > demo.train.epochs  # cheaper steps, the same compute budget
    flip.model.vision["patch_dropout"] = 0.5
    model = build_model(flip.model)
    assert model.clip.visual.patch_dropout.prob == 0.5
    assert model.open_clip_config["vision_cfg"]["patch_dropout"] == 0.5  # saved with the model's config
