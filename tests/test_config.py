"""Recipes: YAML + key=value overrides, with errors that name the key and the nearest valid one."""

import pytest

from vlpretrain.config import ConfigError, load_recipe, recipe_from_dict


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=1", "unknown key 'train.learning_rate' (did you mean 'train.lr'?)"),
    ("train.batchsize=8", "unknown key 'train.batchsize' (did you mean 'train.batch_size'?)"),
    ("trian.lr=1", "unknown key 'trian.lr' (did you mean 'train.lr'?)"),
    ("data.num_worker=2", "unknown key 'data.num_worker' (did you mean 'data.num_workers'?)"),
    ("train.epochs=two", "train.epochs: expected an integer, got 'two'"),
    ("train.lr", "override 'train.lr' is not of the form key=value (e.g. train.lr=1e-3)"),
])
def test_override_errors(override, message):
    with pytest.raises(ConfigError) as info:
        recipe_from_dict({}, [override])
    assert str(info.value) == message


def test_overrides_and_types():
    cfg = recipe_from_dict({"train": {"lr": 1}}, ["train.epochs=3", "train.precision=bf16",
                                                  "model.vision.width=64", "data.augmentation.scale=[0.5, 1.0]",
                                                  "train.grad_clip_norm=null"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 3 and cfg.train.precision == "bf16"
    assert cfg.model.vision == {"width": 64}
    assert cfg.data.augmentation == {"scale": [0.5, 1.0]}
    assert cfg.train.grad_clip_norm is None


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  embed_dims: 64\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert str(info.value) == f"{path}: unknown key 'model.embed_dims' (did you mean 'model.embed_dim'?)"


def test_shipped_recipes_load():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert len(recipes) >= 2
    for path in recipes:
        load_recipe(path)
