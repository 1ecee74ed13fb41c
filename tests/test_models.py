"""Dual encoders from every tower kind, locking, and the save / load round trip."""

from __future__ import annotations

import math

import pytest
import torch

from vlpretrain import load_model
from vlpretrain.config import ModelConfig
from vlpretrain.models import build_model
from vlpretrain.training.optim import parameter_groups

from helpers import TINY_VISION, tiny_model_config


def _check_interface(model, image_size: int) -> None:
    images = torch.randn(3, 3, image_size, image_size)
    tokens = model.tokenizer(["a red heart", "grinning face", "a frog"])
    out = model(images, tokens)
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    assert out["image_features"].shape == out["text_features"].shape == (3, model.embed_dim)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(model.encode_text(tokens), out["text_features"], atol=1e-6)
    raw = model.encode_image(images, normalize=False)
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=-1), out["image_features"], atol=1e-5)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_open_clip_towers():
    model = build_model(tiny_model_config())
    _check_interface(model, 32)
    from PIL import Image

    assert model.preprocess(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_timm_image_tower_and_hf_text_tower():
    cfg = ModelConfig(arch="ViT-B-32", embed_dim=24, image_tower="timm:resnet10t", text_tower="hf:minilm-l6",
                      vision={"image_size": 32}, text={"context_length": 16})
    model = build_model(cfg)
    assert type(model.clip).__name__ == "CustomTextCLIP"
    _check_interface(model, 32)
    # The pretrained MiniLM weights were loaded: a fresh BERT would not give these sentence similarities.
    text = model.clip.text
    tokens = model.tokenizer(["a photo of a dog", "a picture of a puppy", "quarterly tax report"])
    with torch.no_grad():
        pooled = text.pooler(text.transformer(input_ids=tokens, attention_mask=(tokens != text.config.pad_token_id).long()),
                             (tokens != text.config.pad_token_id).long())
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2] + 0.2


def test_lit_locking_freezes_towers():
    cfg = tiny_model_config(text_tower="hf:minilm-l6", lock_text=True, lock_image=True, lock_image_unlocked_groups=1)
    cfg.text = {"context_length": 16}
    model = build_model(cfg)
    text_trainable = {n for n, p in model.clip.text.named_parameters() if p.requires_grad}
    assert text_trainable and all(n.startswith("proj") for n in text_trainable)  # only the projection
    visual = {n: p.requires_grad for n, p in model.clip.visual.named_parameters()}
    assert not all(visual.values()) and any(visual.values())  # last group unlocked
    assert model.logit_scale.requires_grad


def test_weight_decay_groups():
    model = build_model(tiny_model_config())
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "clip.logit_scale" in no_decay_names
    assert "clip.token_embedding.weight" in no_decay_names and "clip.positional_embedding" in no_decay_names
    assert all(model.get_parameter(n).ndim >= 2 for n in decay_names)
    assert "clip.visual.conv1.weight" in decay_names


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(3)
    model = build_model(tiny_model_config())
    model.save_pretrained(tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    tokens = model.tokenizer(["a frog"])
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.encode_text(tokens), loaded.encode_text(tokens))
    assert torch.equal(model.encode_image(images), loaded.encode_image(images))
    assert not list(tmp_path.glob(".ckpt*"))  # no temporary folder left behind


def test_truncated_weights_give_clear_error(tmp_path):
    build_model(tiny_model_config()).save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors: unreadable or truncated weights file"):
        load_model(tmp_path / "ckpt")


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot load model 'nowhere'"):
        load_model("nowhere")
    with pytest.raises(ValueError, match="'ViT-B-23' is not an open_clip architecture \\(did you mean 'ViT-B-32'"):
        load_model("open_clip:ViT-B-23")
    with pytest.raises(FileNotFoundError, match="not a vlpretrain checkpoint"):
        load_model(tmp_path)


def test_open_clip_architecture_by_name():
    model = load_model("open_clip:RN50")  # random init, no download
    assert model.embed_dim == 1024 and model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_locked_text_cache_matches_the_tower():
    cfg = ModelConfig(arch="ViT-B-32", embed_dim=16, text_tower="hf:minilm-l6", lock_text=True,
                      cached_text_dropout=0.0, vision=dict(TINY_VISION), text={"context_length": 16})
    model = build_model(cfg)
    assert model.text_cache is not None
    model.eval()
    tokens = model.tokenizer(["grinning face", "red heart", "grinning face"])
    first = model.encode_text(tokens)
    again = model.encode_text(tokens)
    assert (model.text_cache.misses, model.text_cache.hits, len(model.text_cache)) == (2, 4, 2)
    cache, model.text_cache = model.text_cache, None
    reference = model.encode_text(tokens)  # open_clip's own forward
    assert torch.allclose(first, reference, atol=1e-5) and torch.equal(first, again)
    model.text_cache = cache
    model.train()
    model.encode_text(tokens).sum().backward()
    assert model.clip.text.proj.weight.grad is not None  # the projection still learns
    assert all(p.grad is None for p in model.clip.text.transformer.parameters())


def test_no_cache_when_text_layers_stay_trainable():
    cfg = ModelConfig(arch="ViT-B-32", embed_dim=16, text_tower="hf:minilm-l6", lock_text=True,
                      lock_text_unlocked_layers=1, vision=dict(TINY_VISION), text={"context_length": 16})
    assert build_model(cfg).text_cache is None


def test_hf_text_tower_partial_unlock():
    cfg = ModelConfig(arch="ViT-B-32", embed_dim=16, text_tower="hf:minilm-l6", lock_text=True,
                      lock_text_unlocked_layers=2, vision=dict(TINY_VISION), text={"context_length": 16})
    model = build_model(cfg)
    trainable = {n for n, p in model.clip.text.transformer.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("encoder.layer.4.", "encoder.layer.5.")) for n in trainable)
    assert any(n.startswith("encoder.layer.4.") for n in trainable)


def test_cached_text_dropout_only_in_training():
    cfg = ModelConfig(arch="ViT-B-32", embed_dim=16, text_tower="hf:minilm-l6", lock_text=True,
                      cached_text_dropout=0.5, vision=dict(TINY_VISION), text={"context_length": 16})
    model = build_model(cfg)
    tokens = model.tokenizer(["grinning face", "red heart"])
    model.eval()
    clean = model.encode_text(tokens)
    assert torch.equal(clean, model.encode_text(tokens))
    model.train()
    torch.manual_seed(0)
    noisy = model.encode_text(tokens)
    assert not torch.allclose(noisy, clean, atol=1e-3)


def test_blur_augmentation_blurs_after_the_crop():
    """data.augmentation.blur_prob inserts a Gaussian blur after the crop; the image comes out smoother."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms

    from vlpretrain.data.transforms import build_transforms
    from vlpretrain.models.factory import image_settings

    cfg = tiny_model_config()
    open_clip_cfg = {"vision_cfg": {"image_size": 32}}
    plain, _ = build_transforms(image_settings(open_clip_cfg, cfg), {"scale": [1.0, 1.0], "ratio": [1.0, 1.0]})
    blurred, _ = build_transforms(image_settings(open_clip_cfg, cfg), {"scale": [1.0, 1.0], "ratio": [1.0, 1.0],
                                                       "blur_prob": 1.0, "blur_sigma": [2.0, 2.0]})
    step = blurred.transforms[1]
    assert isinstance(step, transforms.RandomApply) and isinstance(step.transforms[0], transforms.GaussianBlur)
    stripes = np.zeros((32, 32, 3), np.uint8)
    stripes[:, ::2] = 255
    image = Image.fromarray(stripes)
    roughness = [float(t(image).diff(dim=-1).abs().mean()) for t in (plain, blurred)]
    assert roughness[1] < 0.5 * roughness[0]


def test_shading_augmentation_keeps_hue_and_background():
    """data.augmentation.shade_prob inserts RandomShading after the crop: the drawing gets lighter on
    one side and darker on the other, each pixel's hue (channel ratios) and the white background stay."""
    import numpy as np
    from PIL import Image

    from vlpretrain.data.transforms import RandomShading
    from vlpretrain.data.transforms import build_transforms
    from vlpretrain.models.factory import image_settings

    cfg = tiny_model_config()
    train_tf, _ = build_transforms(image_settings({"vision_cfg": {"image_size": 32}}, cfg), {"shade_prob": 1.0, "shade_strength": [0.4, 0.4]})
    assert isinstance(train_tf.transforms[1], RandomShading)

    pixels = np.full((40, 40, 3), 255, np.uint8)
    pixels[5:35, 5:35] = (160, 80, 40)
    image = Image.fromarray(pixels)
    shade = RandomShading(p=1.0, strength=(0.4, 0.4))
    for _ in range(10):
        out = np.asarray(shade(image)).astype(float)
        assert (out[:5] == 255).all() and (out[:, :5] == 255).all()  # the background is left alone
        drawing = out[6:34, 6:34].reshape(-1, 3)
        assert drawing[:, 0].max() - drawing[:, 0].min() > 40  # light and shadow across the drawing
        ratios = drawing / drawing[:, :1]
        assert np.allclose(ratios[:, 1], 0.5, atol=0.02) and np.allclose(ratios[:, 2], 0.25, atol=0.02)
    assert np.array_equal(np.asarray(RandomShading(p=0.0)(image)), pixels)


@pytest.mark.parametrize("kwargs, message", [
    ({"p": 1.5}, "data.augmentation.shade_prob must be in [0, 1], got 1.5"),
    ({"strength": (0.5, 0.2)}, "data.augmentation.shade_strength must be [low, high] with 0 <= low <= high < 1, got [0.5, 0.2]"),
    ({"strength": (0.3,)}, "data.augmentation.shade_strength must be [low, high] with 0 <= low <= high < 1, got [0.3]"),
])
def test_shading_settings_are_checked(kwargs, message):
    from vlpretrain.data.transforms import RandomShading

    with pytest.raises(ValueError) as error:
        RandomShading(**kwargs)
    assert str(error.value) == message


def test_colour_captions_are_augmented_without_colour_changes(tmp_path):
    """protect_colour_captions: a caption naming a colour or skin tone gets the transform without colour
    jitter / greyscale; other captions get the full one."""
    import numpy as np
    from PIL import Image

    from vlpretrain.config import DataConfig
    from vlpretrain.data import open_corpus
    from vlpretrain.models import build_model
    from vlpretrain.training.data import build_train_dataset

    Image.fromarray(np.full((32, 32, 3), (200, 30, 30), np.uint8)).save(tmp_path / "red.png")
    (tmp_path / "pairs.csv").write_text("image,caption\nred.png,a red square\nred.png,a square\n"
                                        "red.png,waving hand: dark skin tone\n")
    augmentation = {"scale": [1.0, 1.0], "gray_scale_prob": 1.0, "protect_colour_captions": True}
    data = DataConfig(train=str(tmp_path / "pairs.csv"), augmentation=augmentation)
    model = build_model(tiny_model_config(), augmentation=augmentation)
    dataset = build_train_dataset(data, model, seed=0)

    def is_grey(pixels):
        return torch.allclose(pixels[0] * 0.26862954 + 0.48145466, pixels[1] * 0.26130258 + 0.4578275, atol=1e-3)

    assert [is_grey(dataset[i]["image"]) for i in range(3)] == [False, True, False]
    with pytest.raises(ValueError, match=r"^data.augmentation.protect_colour_captions: '\(' is not a regular expression"):
        build_train_dataset(DataConfig(train=str(tmp_path / "pairs.csv"), augmentation={"protect_colour_captions": "("}),
                            model, seed=0)
    assert open_corpus(str(tmp_path / "pairs.csv"))  # the table itself is unchanged
