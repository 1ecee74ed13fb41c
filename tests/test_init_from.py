"""Fine-tuning starts: model.init_from (weights and architecture from a saved model, this recipe's locks)
and the Tux Paint split by category that the fine-tuning example trains and evaluates on."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlpretrain.config import recipe_from_dict
from vlpretrain.data import rendered
from vlpretrain.data.labelled import open_labelled_images
from vlpretrain.training import train

from helpers import tiny_recipe, write_image_csv


def test_init_from_continues_from_the_saved_weights_with_this_recipes_locks(tmp_path):
    csv = write_image_csv(tmp_path, 8)
    start = train(recipe_from_dict(tiny_recipe(tmp_path / "start", csv)))
    before = load_file(str(start.final_dir / "model.safetensors"))

    # lr 0: the fine-tuned model is the start, to the bit (the architecture came from the folder).
    frozen = tiny_recipe(tmp_path / "same", csv, lr=0.0, weight_decay=0.0)
    frozen["model"] = {"init_from": str(start.final_dir)}
    same = load_file(str(train(recipe_from_dict(frozen)).final_dir / "model.safetensors"))
    assert same.keys() == before.keys() and all(torch.equal(same[k], before[k]) for k in before)

    locked = tiny_recipe(tmp_path / "locked", csv, lr=1e-2)
    locked["model"] = {"init_from": str(start.final_dir), "lock_text": True}
    after = load_file(str(train(recipe_from_dict(locked)).final_dir / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("clip.visual.") for k in changed)
    assert not any(k.startswith(("clip.transformer.", "clip.token_embedding")) for k in changed)


def test_init_from_a_missing_folder_names_it(tmp_path):
    csv = write_image_csv(tmp_path, 8)
    recipe = tiny_recipe(tmp_path / "run", csv)
    recipe["model"] = {"init_from": str(tmp_path / "nowhere")}
    with pytest.raises(ValueError, match="cannot load model '.*nowhere'"):
        train(recipe_from_dict(recipe))


def test_tuxpaint_splits_by_category(tmp_path, monkeypatch):
    """train + val = the five training categories (val: about one stamp in five, by path hash);
    heldout = every other category."""
    stamps = tmp_path / "stamps"
    categories = ["animals"] * 12 + ["town"] * 8 + ["vehicles", "plants", "plants"]
    for i, category in enumerate(categories):
        folder = stamps / category / "sub"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 10, 0, 0)).save(folder / f"s{i}.png")
        (folder / f"s{i}.txt").write_text(f"A stamp number {i}.\nSecond line.\n")
    monkeypatch.setattr(rendered, "TUXPAINT_STAMPS", stamps)
    monkeypatch.setenv("VLP_CACHE_DIR", str(tmp_path / "cache"))
    split = {name: open_labelled_images(f"tuxpaint:{name}", label_column="category") for name in ("train", "val", "heldout")}
    assert sorted(split["train"].labels + split["val"].labels) == ["animals"] * 12 + ["town"] * 8
    assert 1 <= len(split["val"]) <= 8 and not set(split["train"].sources) & set(split["val"].sources)
    assert sorted(split["heldout"].labels) == ["plants", "plants", "vehicles"]
    assert len(open_labelled_images("tuxpaint:", label_column="category")) == len(categories)
    table = pd.read_csv(tmp_path / "cache" / "tuxpaint-v1" / "train.csv")
    assert table["caption"].str.fullmatch(r"A stamp number \d+\.").all()
    with pytest.raises(ValueError, match=r"^tuxpaint split 'test' does not exist \(use all, train, val, heldout\)$"):
        open_labelled_images("tuxpaint:test", label_column="category")
