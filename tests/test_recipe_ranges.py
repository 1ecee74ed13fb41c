"""Recipe values are range-checked when the recipe loads, and keys inside the free-form mappings
(model.vision, model.text, data.augmentation) are checked like every other key: one-line errors that
name the dotted key, the value and what is allowed."""

from __future__ import annotations

import dataclasses
from typing import Union, get_args, get_origin, get_type_hints

import pytest
import yaml

from vlpretrain.config import ConfigError, RecipeConfig, load_recipe, recipe_from_dict
from vlpretrain.recipe_ranges import RANGES
from vlpretrain.models import build_model
from vlpretrain.data.transforms import build_transforms, ImageSettings

from helpers import tiny_model_config, tiny_recipe, vlp


@pytest.mark.parametrize("override, message", [
    ("train.epochs=0", "train.epochs must be an integer >= 1, got 0"),
    ("train.max_steps=-2", "train.max_steps must be an integer >= 1 (null: train.epochs decide), got -2"),
    ("train.max_steps=0", "train.max_steps must be an integer >= 1 (null: train.epochs decide), got 0"),
    ("train.batch_size=0", "train.batch_size must be an integer >= 1, got 0"),
    ("train.lr=-1e-3", "train.lr must be a finite number >= 0, got -0.001"),
    ("train.lr=.inf", "train.lr must be a finite number >= 0, got inf"),
    ("train.lr=nan", "train.lr must be a finite number >= 0, got nan"),
    ("train.warmup_steps=-1", "train.warmup_steps must be an integer >= 0, got -1"),
    ("train.log_every=0", "train.log_every must be an integer >= 1, got 0"),
    ("train.beta2=1", "train.beta2 must be in [0, 1), got 1.0"),
    ("train.ema_decay=1.5", "train.ema_decay must be in [0, 1) (e.g. 0.999), got 1.5"),
    ("train.seed=-1", "train.seed must be an integer in [0, 4294967295], got -1"),
    ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps must be an integer >= 1, got 0"),
    ("data.num_workers=-1", "data.num_workers must be an integer >= 0, got -1"),
    ("model.cached_text_dropout=1", "model.cached_text_dropout must be in [0, 1), got 1.0"),
    ("model.image_std=[0.2,0,0.3]", "model.image_std must be a finite number > 0, got [0.2, 0, 0.3]"),
    ("loss.distill_alpha=2", "loss.distill_alpha must be in [0, 1], got 2.0"),
    ("loss.queue_size=-5", "loss.queue_size must be an integer >= 0 (0: no queue), got -5"),
    # Inside the free-form mappings: probabilities and sizes.
    ("model.vision.patch_dropout=1.0", "model.vision.patch_dropout must be in [0, 1), got 1.0"),
    ("model.vision.image_size=[32,0]", "model.vision.image_size must be an integer >= 1, got [32, 0]"),
    ("model.vision.width=2.5", "model.vision.width must be an integer >= 1, got 2.5"),
    ("model.text.context_length=0", "model.text.context_length must be an integer >= 1, got 0"),
    ("model.fusion.mlm_probability=0", "model.fusion.mlm_probability must be in (0, 1], got 0"),
    ("data.augmentation.gray_scale_prob=1.2", "data.augmentation.gray_scale_prob must be in [0, 1], got 1.2"),
    ("data.augmentation.color_jitter_prob=high", "data.augmentation.color_jitter_prob must be in [0, 1], got 'high'"),
    ("data.augmentation.blur_prob=-0.1", "data.augmentation.blur_prob must be in [0, 1], got -0.1"),
])
def test_out_of_range_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as info:
        recipe_from_dict({}, [override])
    assert str(info.value) == message


@pytest.mark.parametrize("override", [
    "train.max_steps=null", "train.max_steps=1", "train.epochs=1", "train.lr=1e-8", "train.warmup_steps=0",
    "train.ema_decay=0", "train.grad_clip_norm=null", "train.keep_checkpoints=0", "data.num_workers=0",
    "model.vision.patch_dropout=0.5", "model.vision.image_size=[32,48]", "data.augmentation.re_prob=1",
    "data.augmentation.color_jitter=[0.4,0.4,0.4,0.1]", "model.vision.timm_drop_path=null",
    "train.epochs=" + "1" + "0" * 40,  # an exact int, larger than a float can hold
])
def test_values_inside_the_ranges_load(override):
    recipe_from_dict({}, [override])


def test_a_recipe_file_names_itself_in_the_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  epochs: 0\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert str(info.value) == f"{path}: train.epochs must be an integer >= 1, got 0"


def _numeric(annotation) -> bool:
    if get_origin(annotation) is Union:
        return any(_numeric(a) for a in get_args(annotation) if a is not type(None))
    return annotation in (int, float)


def test_every_numeric_recipe_key_has_a_range():
    """A new int / float field must say what it allows (RANGES), so no key goes unchecked."""
    unchecked, defaults = [], RecipeConfig()
    for section in dataclasses.fields(defaults):
        values = getattr(defaults, section.name)
        for name, annotation in get_type_hints(type(values)).items():
            if _numeric(annotation) and f"{section.name}.{name}" not in RANGES:
                unchecked.append(f"{section.name}.{name}")
    assert unchecked == []
    recipe_from_dict({})  # the defaults themselves pass


@pytest.mark.parametrize("build, message", [
    (lambda: build_model(tiny_model_config(vision={"image_size": 32, "patch_dropuot": 0.1})),
     "unknown key 'model.vision.patch_dropuot' (did you mean 'model.vision.patch_dropout'?)"),
    (lambda: build_model(tiny_model_config(text={"context_lenght": 16})),
     "unknown key 'model.text.context_lenght' (did you mean 'model.text.context_length'?)"),
    (lambda: build_transforms(ImageSettings(size=32), {"scale": [0.9, 1.0], "gray_scale_porb": 0.2}),
     "unknown key 'data.augmentation.gray_scale_porb' (did you mean 'data.augmentation.gray_scale_prob'?)"),
    (lambda: build_model(tiny_model_config(), augmentation={"shade_prb": 0.5}),
     "unknown key 'data.augmentation.shade_prb' (did you mean 'data.augmentation.shade_prob'?)"),
])
def test_typos_inside_free_form_mappings_name_the_nearest_key(build, message):
    with pytest.raises(ConfigError) as info:
        build()
    assert str(info.value) == message


def test_our_own_augmentation_keys_are_accepted():
    train, _ = build_transforms(ImageSettings(size=32), {"scale": [0.9, 1.0], "blur_prob": 0.5, "blur_sigma": [0.1, 1],
                                                         "shade_prob": 0.5, "shade_strength": [0.2, 0.3],
                                                         "protect_colour_captions": True})
    names = [type(t).__name__ for t in train.transforms]
    assert "RandomShading" in names and "RandomApply" in names


@pytest.mark.slow
@pytest.mark.parametrize("override, last_line", [
    ("model.vision.patch_dropuot=0.1",
     "vlp train: error: unknown key 'model.vision.patch_dropuot' (did you mean 'model.vision.patch_dropout'?)"),
    ("data.augmentation.sclae=[0.5,1]",
     "vlp train: error: unknown key 'data.augmentation.sclae' (did you mean 'data.augmentation.scale'?)"),
])
def test_cli_nested_key_typo_is_exit_2_and_one_line(tmp_path, override, last_line):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "run", tmp_path / "x.csv", precision="no")))
    proc = vlp("train", str(recipe), override)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == last_line
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_out_of_range_value_is_exit_2_before_anything_is_written(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "run", tmp_path / "x.csv", precision="no")))
    proc = vlp("train", str(recipe), "train.max_steps=-2")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"vlp train: error: {recipe}: train.max_steps must be an integer >= 1 "
                                   f"(null: train.epochs decide), got -2")
    assert not (tmp_path / "run").exists()
