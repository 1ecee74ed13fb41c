"""Image transforms: the train and eval pipelines (open_clip's, sized and normalised as the model says),
and the augmentations that open_clip's ``AugmentationCfg`` lacks, applied to PIL images after the crop.

- :func:`build_transforms`: (train, eval) transforms from :class:`ImageSettings` (the model's image
  size, mean, std and resize rule; see ``vlpretrain.models.factory.image_settings``) and the recipe's
  ``data.augmentation``.

- :class:`RandomShading`: a smooth light-to-dark field over the drawing, leaving the white background
  alone. Flat-coloured art (twemoji) then also shows the highlights and shadows of shaded styles (Noto),
  without changing any hue, so colour words in captions stay true.
- Colour-safe captions (``data.augmentation.protect_colour_captions``): colour jitter, greyscale and
  shading make a model ignore colour, which is right for "a cat" and wrong for "a red heart" or
  "waving hand: dark skin tone". Samples whose caption names a colour or a skin tone are augmented
  without them (:func:`colour_caption_pattern`, :func:`colour_safe_augmentation`).
"""

from __future__ import annotations

import math
import random
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image

__all__ = ["ImageSettings", "build_transforms", "check_augmentation_keys", "RandomShading", "colour_caption_pattern",
           "colour_safe_augmentation"]


@dataclass(frozen=True)
class ImageSettings:
    """What a model's image tower expects: the square input ``size``, normalisation ``mean`` / ``std``
    (None: open_clip's OpenAI defaults) and, for transformers processors, ``resize_mode`` /
    ``interpolation`` / ``resize_size`` (a shortest-side resize larger than the crop, e.g. 256 -> 224)."""

    size: int = 224
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    resize_mode: Optional[str] = None
    interpolation: Optional[str] = None
    resize_size: Optional[int] = None


def build_transforms(image: ImageSettings, augmentation: Optional[dict] = None) -> tuple[Callable, Callable]:
    """(train, eval) image transforms from open_clip, sized and normalised by ``image``.

    ``augmentation`` is the recipe's ``data.augmentation``: open_clip's ``AugmentationCfg`` keys, plus
    ``blur_prob`` / ``blur_sigma`` and ``shade_prob`` / ``shade_strength``, applied after the crop on
    the PIL image, shading first.

    Example:
        >>> train, evaluation = build_transforms(ImageSettings(size=64), {"scale": [0.9, 1.0], "shade_prob": 0.5})
        >>> evaluation(Image.new("RGB", (100, 80))).shape
        torch.Size([3, 64, 64])
    """
    import open_clip

    check_augmentation_keys(augmentation)
    aug = dict(augmentation or {})
    for key in ("scale", "ratio"):
        if key in aug and aug[key] is not None:
            aug[key] = tuple(aug[key])
    blur_prob, blur_sigma = float(aug.pop("blur_prob", 0.0) or 0.0), aug.pop("blur_sigma", (0.1, 1.0))
    shade_prob, shade_strength = float(aug.pop("shade_prob", 0.0) or 0.0), aug.pop("shade_strength", (0.2, 0.5))
    aug.pop("protect_colour_captions", None)  # read by the training dataset (colour_caption_pattern)
    with warnings.catch_warnings():
        if not aug.get("use_timm") and set(aug) <= OPEN_CLIP_APPLIED_KEYS:
            # open_clip applies these keys itself yet still lists them as "unused" (it pops only scale).
            warnings.filterwarnings("ignore", message="Unused augmentation cfg items", category=UserWarning)
        train = open_clip.image_transform(image.size, is_train=True, mean=image.mean, std=image.std,
                                          aug_cfg=aug or None)
    if blur_prob > 0:
        from torchvision import transforms

        blur = transforms.GaussianBlur(kernel_size=5, sigma=tuple(blur_sigma))
        train.transforms.insert(1, transforms.RandomApply([blur], p=blur_prob))
    if shade_prob > 0:
        train.transforms.insert(1, RandomShading(shade_prob, tuple(shade_strength)))
    evaluation = open_clip.image_transform(image.size, is_train=False, mean=image.mean, std=image.std,
                                           resize_mode=image.resize_mode, interpolation=image.interpolation)
    if image.resize_mode == "shortest" and image.resize_size not in (None, image.size):
        from torchvision import transforms

        # CLIP processors may resize the shortest side to more than the crop (e.g. 256 then crop 224).
        evaluation.transforms[0] = transforms.Resize(
            image.resize_size, interpolation=transforms.InterpolationMode(image.interpolation or "bicubic"))
    return train, evaluation


# data.augmentation keys applied here rather than by open_clip (see build_transforms) or read by the dataset.
OUR_AUGMENTATION_KEYS = ("blur_prob", "blur_sigma", "shade_prob", "shade_strength", "protect_colour_captions")


def check_augmentation_keys(augmentation: Optional[dict]) -> None:
    """A ``data.augmentation`` key that neither open_clip's ``AugmentationCfg`` nor this module takes is a
    one-line ConfigError with the nearest valid key (open_clip would raise a bare TypeError).

    Example:
        >>> check_augmentation_keys({"scale": [0.8, 1.0], "shade_prob": 0.3})  # fine
    """
    import dataclasses

    from open_clip.transform import AugmentationCfg

    from ..config import check_keys

    allowed = [f.name for f in dataclasses.fields(AugmentationCfg)] + list(OUR_AUGMENTATION_KEYS)
    check_keys(augmentation or {}, allowed, "data.augmentation.")


class RandomShading:
    """With probability ``p``, multiply the non-background pixels by ``1 + s * field``, where ``field`` is
    a linear ramp in a random direction (or, half of the time, a radial highlight around a random
    point) scaled to [-1, 1] and ``s`` is drawn from ``strength``. Pixels near ``background`` are kept.

    Example:
        >>> shade = RandomShading(p=1.0, strength=(0.3, 0.3))
        >>> shaded = shade(Image.new("RGB", (32, 32), (200, 40, 40)))
    """

    def __init__(self, p: float = 0.5, strength: Sequence[float] = (0.2, 0.5),
                 background: tuple[int, int, int] = (255, 255, 255)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"data.augmentation.shade_prob must be in [0, 1], got {p}")
        low, high = (float(strength[0]), float(strength[1])) if len(strength) == 2 else (None, None)
        if low is None or not 0.0 <= low <= high < 1.0:
            raise ValueError(f"data.augmentation.shade_strength must be [low, high] with 0 <= low <= high < 1, "
                             f"got {list(strength)}")
        self.p, self.strength, self.background = p, (low, high), np.asarray(background, np.float32)

    def __call__(self, image: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return image
        pixels = np.asarray(image.convert("RGB"), np.float32)
        height, width = pixels.shape[:2]
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        xs, ys = xs / max(width - 1, 1) * 2 - 1, ys / max(height - 1, 1) * 2 - 1
        if random.random() < 0.5:
            angle = random.uniform(0, 2 * math.pi)
            field = (math.cos(angle) * xs + math.sin(angle) * ys) / math.sqrt(2)
        else:
            cx, cy = random.uniform(-0.8, 0.8), random.uniform(-0.8, 0.8)
            distance = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)
            field = 1 - distance / max(float(distance.max()), 1e-6) * 2
        gain = 1 + random.uniform(*self.strength) * field
        # How far each pixel is from the background, as a 0..1 weight: anti-aliased edges shade partly.
        drawing = np.clip(np.abs(pixels - self.background).sum(-1) / 60.0, 0.0, 1.0)
        weight = 1 + (gain - 1) * drawing
        shaded = np.clip(pixels * weight[..., None], 0, 255).astype(np.uint8)
        return Image.fromarray(shaded)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, strength={self.strength})"


# Words whose truth depends on colour: colour names, light / dark, and the emoji skin tones.
DEFAULT_COLOUR_CAPTION_PATTERN = (
    r"\b(red|orange|yellow|green|blue|purple|violet|brown|black|white|grey|gray|pink|gold|golden|silver|"
    r"rainbow|colou?red|light|dark|pale|skin tones?)\b")
# Augmentations that change colour; the colour-safe transform leaves them out.
#: Keys open_clip's own (non-timm) training transform applies: it warns about all but ``scale`` regardless.
OPEN_CLIP_APPLIED_KEYS = {"scale", "color_jitter", "color_jitter_prob", "gray_scale_prob"}

COLOUR_AUGMENTATION_KEYS = ("color_jitter", "color_jitter_prob", "gray_scale_prob", "shade_prob", "shade_strength")


def colour_caption_pattern(setting: Any) -> Optional[re.Pattern]:
    """``protect_colour_captions``: true -> the default colour-word pattern, a string -> that regular
    expression (case-insensitive), false / absent -> None.

    Example:
        >>> bool(colour_caption_pattern(True).search("waving hand: dark skin tone"))
        True
    """
    if not setting:
        return None
    source = DEFAULT_COLOUR_CAPTION_PATTERN if setting is True else str(setting)
    try:
        return re.compile(source, re.IGNORECASE)
    except re.error as e:
        raise ValueError(f"data.augmentation.protect_colour_captions: {source!r} is not a regular expression ({e})") from None


def colour_safe_augmentation(augmentation: dict) -> dict:
    """The same augmentation settings without the colour-changing ones."""
    return {k: v for k, v in augmentation.items() if k not in COLOUR_AUGMENTATION_KEYS and k != "protect_colour_captions"}
