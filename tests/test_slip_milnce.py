"""SLIP and MIL-NCE against naive references written with explicit loops, in 1 and 2 gloo processes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlpretrain.config import ConfigError, recipe_from_dict
from vlpretrain.losses import create_loss
from vlpretrain.training.accumulation import check_accumulation

from helpers import spawn_gloo

B, D, W = 6, 5, 2  # global batch, feature width, processes
TEMPERATURE, SCALE = 0.2, 7.0


def _features(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    owner = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5])  # images 0..5, 1-3 captions each
    return {"image": F.normalize(torch.randn(B, D, generator=g), dim=1),
            "view": F.normalize(torch.randn(B, D, generator=g), dim=1),
            "text": F.normalize(torch.randn(len(owner), D, generator=g), dim=1),
            "owner": owner}


def naive_nt_xent(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR: each of the 2N views against the 2N - 1 others, its positive the other view of its image."""
    views = [a, b]
    total, n = 0.0, a.shape[0]
    for v in range(2):
        for i in range(n):
            anchor, positive = views[v][i], views[1 - v][i]
            denominator = 0.0
            for w in range(2):
                for j in range(n):
                    if w == v and j == i:
                        continue
                    denominator = denominator + torch.exp(anchor @ views[w][j] / t)
            total = total - torch.log(torch.exp(anchor @ positive / t) / denominator)
    return total / (2 * n)


def naive_clip(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    n, total = image.shape[0], 0.0
    for i in range(n):
        total = total - torch.log(torch.exp(scale * image[i] @ text[i]) / sum(torch.exp(scale * image[i] @ text[j])
                                                                             for j in range(n)))
        total = total - torch.log(torch.exp(scale * text[i] @ image[i]) / sum(torch.exp(scale * text[i] @ image[j])
                                                                             for j in range(n)))
    return total / (2 * n)


def naive_milnce(image: torch.Tensor, text: torch.Tensor, owner: list[int], scale: float) -> torch.Tensor:
    """Miech et al. 2020: positives = (i, its captions); negatives = (i, other captions), (other images, its captions)."""
    total = 0.0
    for i in range(image.shape[0]):
        positive, negative = 0.0, 0.0
        for t in range(text.shape[0]):
            if owner[t] == i:
                positive = positive + torch.exp(scale * image[i] @ text[t])
                for j in range(image.shape[0]):
                    if j != i:
                        negative = negative + torch.exp(scale * image[j] @ text[t])
            else:
                negative = negative + torch.exp(scale * image[i] @ text[t])
        total = total - torch.log(positive / (positive + negative))
    return total / image.shape[0]


def _slip(f: dict) -> dict:
    loss_fn = create_loss("slip", ssl_weight=0.5, ssl_temperature=TEMPERATURE)
    return loss_fn(image_features=f["image"], text_features=f["text"][:f["image"].shape[0]],
                   logit_scale=torch.tensor(SCALE), image_view_features=f["view"])


def test_slip_equals_naive_reference():
    f = _features()
    terms = _slip(f)
    assert set(terms) == {"contrastive_loss", "ssl_loss"}
    assert torch.allclose(terms["ssl_loss"], 0.5 * naive_nt_xent(f["image"], f["view"], TEMPERATURE), atol=1e-5)
    assert torch.allclose(terms["contrastive_loss"], naive_clip(f["image"], f["text"][:B], SCALE), atol=1e-5)


def test_milnce_equals_naive_reference():
    f = _features()
    loss = create_loss("milnce")(image_features=f["image"], text_features=f["text"], logit_scale=torch.tensor(SCALE),
                                 text_image_index=f["owner"])["contrastive_loss"]
    assert torch.allclose(loss, naive_milnce(f["image"], f["text"], f["owner"].tolist(), SCALE), atol=1e-5)


def test_milnce_with_one_caption_each_is_symmetric_bag_of_one():
    f = _features()
    loss = create_loss("milnce")(image_features=f["image"], text_features=f["text"][:B],
                                 logit_scale=torch.tensor(SCALE))["contrastive_loss"]
    assert torch.allclose(loss, naive_milnce(f["image"], f["text"][:B], list(range(B)), SCALE), atol=1e-5)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
def test_milnce_of_one_image_has_finite_gradients():
    f = _features()
    image = f["image"][:1].clone().requires_grad_()
    text = f["text"][:2].clone().requires_grad_()
    owner = torch.tensor([0, 0])  # no other image, so no (other image, caption) negatives
    scale = torch.tensor(SCALE, requires_grad=True)
    with torch.autograd.detect_anomaly():  # no NaN anywhere in the backward pass, not only in the leaves' grads
        loss = create_loss("milnce")(image_features=image, text_features=text, logit_scale=scale,
                                     text_image_index=owner)["contrastive_loss"]
        loss.backward()
    assert torch.allclose(loss, naive_milnce(f["image"][:1], f["text"][:2], [0, 0], SCALE), atol=1e-6)
    assert torch.isfinite(image.grad).all() and torch.isfinite(text.grad).all() and torch.isfinite(scale.grad)


def _local(f: dict, rank: int, world: int) -> dict:
    """This rank's images (B / W consecutive rows), their captions and views, with gradients on."""
    rows = range(rank * B // world, (rank + 1) * B // world)
    mine = torch.tensor([int(o) in rows for o in f["owner"]])
    out = {"image": f["image"][list(rows)].clone().requires_grad_(),
           "view": f["view"][list(rows)].clone().requires_grad_(),
           "text": f["text"][mine].clone().requires_grad_(),
           "owner": f["owner"][mine] - rows.start}
    return out


def _worker(rank: int, world: int) -> dict:
    f = _features()
    local = _local(f, rank, world)
    slip = _slip({**local, "text": f["text"][rank * B // world:(rank + 1) * B // world].clone().requires_grad_()})
    milnce = create_loss("milnce")(image_features=local["image"], text_features=local["text"],
                                   logit_scale=torch.tensor(SCALE), text_image_index=local["owner"])
    total = slip["ssl_loss"] + milnce["contrastive_loss"]
    total.backward()
    result = {"ssl": slip["ssl_loss"].detach(), "milnce": milnce["contrastive_loss"].detach()}
    for name in ("ssl", "milnce"):
        dist.all_reduce(result[name])
        result[name] /= world  # the data-parallel mean, as DDP reports it
    # Gradients of the local rows, put back in global order (DDP averages: a factor 1 / world).
    grads = {}
    for key in ("image", "view", "text"):
        parts = [None] * world
        dist.all_gather_object(parts, local[key].grad / world)
        grads[key] = torch.cat(parts)
    result["grads"] = grads
    return result


@pytest.mark.slow
def test_two_processes_equal_naive_references_and_gradients():
    two = spawn_gloo(_worker, W)
    f = _features()
    image, view, text = (f[k].clone().requires_grad_() for k in ("image", "view", "text"))
    ssl = 0.5 * naive_nt_xent(image, view, TEMPERATURE)
    milnce = naive_milnce(image, text, f["owner"].tolist(), SCALE)
    (ssl + milnce).backward()
    assert math.isclose(two["ssl"].item(), ssl.item(), abs_tol=1e-5)
    assert math.isclose(two["milnce"].item(), milnce.item(), abs_tol=1e-5)
    assert torch.allclose(two["grads"]["image"], image.grad, atol=1e-5)
    assert torch.allclose(two["grads"]["view"], view.grad, atol=1e-5)
    assert torch.allclose(two["grads"]["text"], text.grad, atol=1e-5)


def test_accumulation_refused_in_one_line():
    for name in ("slip", "milnce"):
        cfg = recipe_from_dict({"loss": {"name": name}, "train": {"accum_freq": 2}})
        with pytest.raises(ConfigError, match=f"train.accum_freq > 1 is not available with loss.name={name}"):
            check_accumulation(cfg)


def _multi_caption_jsonl(folder, n: int):
    """A JSONL corpus of n images with 1-3 captions each (a list per row)."""
    import json

    from helpers import write_image_csv

    write_image_csv(folder, n)
    rows = [{"image": f"images/img{i}.png", "caption": [f"square {i} view {k}" for k in range(1 + i % 3)]}
            for i in range(n)]
    path = folder / "multi.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_slip_and_milnce_train_end_to_end(tmp_path):
    from vlpretrain.training.trainer import train

    from helpers import read_metrics, tiny_recipe

    corpus = _multi_caption_jsonl(tmp_path, 8)
    for name in ("slip", "milnce"):
        recipe = tiny_recipe(tmp_path / name, corpus, max_steps=2)
        recipe["loss"] = {"name": name}
        recipe["data"]["augmentation"] = {"scale": [0.5, 1.0]}
        result = train(recipe_from_dict(recipe))
        steps = [r for r in read_metrics(tmp_path / name) if "loss" in r]
        assert result.step == 2 and len(steps) == 2
        assert all(math.isfinite(r["contrastive_loss"]) for r in steps)
        if name == "slip":
            # The logged loss is the sum of both terms.
            assert all(math.isclose(r["loss"], r["contrastive_loss"] + r["ssl_loss"], rel_tol=1e-5) for r in steps)


def test_dataset_second_view_is_another_draw_of_the_same_transform(tmp_path):
    from torchvision import transforms

    from vlpretrain.data import ImageTextDataset, collate_image_text
    from vlpretrain.data.named import open_named_corpus
    from vlpretrain.config import DataConfig

    corpus = open_named_corpus(str(_multi_caption_jsonl(tmp_path, 4)), DataConfig())
    crop = transforms.Compose([transforms.RandomResizedCrop(16, scale=(0.2, 1.0)), transforms.ToTensor()])
    plain = ImageTextDataset(corpus, crop, lambda c: torch.zeros(len(c), 4, dtype=torch.long))
    both = ImageTextDataset(corpus, crop, lambda c: torch.zeros(len(c), 4, dtype=torch.long), image_view=True)
    sample = both[1]
    assert torch.equal(sample["image"], plain[1]["image"])  # the first view is the usual one
    assert not torch.equal(sample["image_view"], sample["image"])
    batch = collate_image_text([both[0], both[1]])
    assert batch["image_view"].shape == batch["image"].shape
    assert "image_view" not in collate_image_text([plain[0]])


def test_objectives_choose_their_samples_and_refuse_shards(tmp_path):
    from vlpretrain.config import DataConfig
    from vlpretrain.models import build_model
    from vlpretrain.training.data import build_train_dataset

    from helpers import tiny_model_config, write_test_shards

    model = build_model(tiny_model_config())
    corpus = _multi_caption_jsonl(tmp_path, 4)
    milnce = build_train_dataset(DataConfig(train=str(corpus)), model, 0, loss_name="milnce")
    assert milnce[2]["tokens"].shape[0] == 3  # image 2's three captions
    assert "image_view" in build_train_dataset(DataConfig(train=str(corpus)), model, 0, loss_name="slip")[0]
    write_test_shards(tmp_path / "shards", [4], manifest=True)
    with pytest.raises(ValueError, match=r"^loss.name=slip reads a corpus table or folder, not WebDataset shards"):
        build_train_dataset(DataConfig(train=str(tmp_path / "shards")), model, 0, loss_name="slip")
