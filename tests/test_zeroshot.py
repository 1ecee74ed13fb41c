"""Zero-shot classifier and prompt templates: equivalence with open_clip, inputs, errors."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from helpers import tiny_model_config
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
from PIL import Image

from vlpretrain.evaluation.templates import TEMPLATE_SETS, load_templates, render_template
from vlpretrain.evaluation.zeroshot import ZeroShotClassifier
from vlpretrain.models import build_model

CLASSES = ["cat", "dog", "red heart", "car", "tree", "boat", "smiling face"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_model_config()).eval()


@pytest.fixture(scope="module")
def pil_images():
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((40, 30, 3)) * 255).astype("uint8")) for _ in range(5)]


def _open_clip_logits(model, images, templates, num_classes_per_batch):
    weights = open_clip.build_zero_shot_classifier(
        model.clip, tokenizer=model.tokenizer, classnames=CLASSES, templates=templates,
        num_classes_per_batch=num_classes_per_batch, device="cpu", use_tqdm=False)
    with torch.no_grad():
        features = model.clip.encode_image(images, normalize=True)
    return 100 * features @ weights


# -- equivalence with open_clip ------------------------------------------------------------------

@pytest.mark.parametrize("ours, theirs, per_batch, batch_size", [
    ("openai_imagenet", OPENAI_IMAGENET_TEMPLATES, 3, 100),
    ("openai_imagenet_7", SIMPLE_IMAGENET_TEMPLATES, None, 5),
    (["a photo of a {c}.", "a {} toy."], ["a photo of a {}.", "a {} toy."], 2, 256),
])
def test_logits_match_open_clip(model, ours, theirs, per_batch, batch_size):
    images = torch.randn(4, 3, 32, 32)
    clf = ZeroShotClassifier(model, CLASSES, templates=ours, batch_size=batch_size, progress=False)
    assert clf.weights.shape == (16, len(CLASSES))
    expected = _open_clip_logits(model, images, theirs, per_batch)
    ours_logits = clf.logits(clf.encode_images(images))
    torch.testing.assert_close(ours_logits, expected, atol=1e-5, rtol=1e-5)


def test_per_class_prompts_are_mean_of_normalized_prompt_embeddings(model):
    prompts = {c: [f"a {c}.", f"a picture showing a {c}, clearly."] for c in CLASSES}
    prompts["cat"] = ["a small cat."]  # uneven prompt counts
    clf = ZeroShotClassifier(model, CLASSES, templates=prompts, batch_size=3, progress=False)
    with torch.no_grad():
        for index, name in enumerate(CLASSES):
            feats = model.encode_text(model.tokenizer(prompts[name]), normalize=True)
            expected = torch.nn.functional.normalize(feats.mean(0), dim=0)
            torch.testing.assert_close(clf.weights[:, index], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="per-class prompts"):
        clf.per_template_weights()


def test_per_template_weights(model):
    templates = ["a photo of a {}.", "a {} toy.", "art of the {c}."]
    clf = ZeroShotClassifier(model, CLASSES, templates=templates, batch_size=4, progress=False)
    per_template = clf.per_template_weights()
    assert per_template.shape == (3, 16, len(CLASSES))
    for t, template in enumerate(templates):
        single = ZeroShotClassifier(model, CLASSES, templates=[template], progress=False)
        torch.testing.assert_close(per_template[t], single.weights, atol=1e-5, rtol=1e-5)
    # The ensemble is the renormalized mean of the per-template embeddings.
    torch.testing.assert_close(torch.nn.functional.normalize(per_template.mean(0), dim=0), clf.weights,
                               atol=1e-5, rtol=1e-5)


def test_model_training_mode_is_restored(model):
    model.train()
    try:
        clf = ZeroShotClassifier(model, CLASSES[:2], templates="simple", progress=False)
        clf.encode_images(torch.randn(1, 3, 32, 32))
        assert model.training
    finally:
        model.eval()


# -- predictions and inputs -----------------------------------------------------------------------

def test_predict_and_proba_agree(model, pil_images):
    clf = ZeroShotClassifier(model, CLASSES, templates="openai_imagenet_7", batch_size=2, progress=False)
    probs = clf.predict_proba(pil_images)
    assert probs.shape == (5, len(CLASSES))
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
    labels, scores = clf.predict(pil_images)
    assert len(labels) == 5 and all(isinstance(x, str) for x in labels) and scores.shape == (5,)
    assert labels == [CLASSES[i] for i in probs.argmax(-1).tolist()]
    torch.testing.assert_close(scores, probs.max(-1).values)

    top, top_scores = clf.predict(pil_images, top_k=3)
    assert top_scores.shape == (5, 3) and [len(row) for row in top] == [3] * 5
    assert (top_scores[:, :-1] >= top_scores[:, 1:]).all()
    for row, row_scores, p in zip(top, top_scores, probs):
        assert row[0] == CLASSES[p.argmax().item()]
        torch.testing.assert_close(row_scores, p[[CLASSES.index(n) for n in row]])
    with pytest.raises(ValueError, match="top_k"):
        clf.predict(pil_images, top_k=len(CLASSES) + 1)


def test_pil_path_tensor_and_corpus_inputs_give_identical_logits(model, pil_images, tmp_path):
    from vlpretrain.data import CorpusRow

    clf = ZeroShotClassifier(model, CLASSES, templates="simple", batch_size=2, progress=False)
    paths = []
    for i, img in enumerate(pil_images):
        paths.append(tmp_path / f"img{i}.png")
        img.save(paths[-1])
    tensor = torch.stack([model.preprocess(img) for img in pil_images])
    from_pil = clf.logits(clf.encode_images(pil_images))
    from_paths = clf.logits(clf.encode_images(paths))
    from_strs = clf.logits(clf.encode_images([str(p) for p in paths]))
    from_tensor = clf.logits(clf.encode_images(tensor))
    from_rows = clf.logits(clf.encode_images([CorpusRow(image=str(p), captions=["x"]) for p in paths]))
    from_generator = clf.logits(clf.encode_images(img for img in pil_images))
    for other in (from_paths, from_strs, from_tensor, from_rows, from_generator):
        torch.testing.assert_close(other, from_pil, atol=1e-5, rtol=1e-5)
    assert clf.encode_images(pil_images[0]).shape == (1, 16)
    assert clf.encode_images(tensor[0]).shape == (1, 16)


def test_bad_image_path_raises(model, tmp_path):
    from vlpretrain.data import BadImageError

    clf = ZeroShotClassifier(model, CLASSES[:2], templates="simple", progress=False)
    with pytest.raises(BadImageError, match="missing.png"):
        clf.predict([tmp_path / "missing.png"])


@pytest.mark.parametrize("classnames, message", [
    ([], "classnames is empty; give at least one class name"),
    (["cat", "dog", "cat", "owl", "owl", "owl"], "duplicate classnames: 'cat' (x2), 'owl' (x3)"),
])
def test_classname_errors(model, classnames, message):
    with pytest.raises(ValueError) as info:
        ZeroShotClassifier(model, classnames, templates="simple", progress=False)
    assert str(info.value) == message


# -- templates ------------------------------------------------------------------------------------

def test_named_sets():
    assert [len(load_templates(n)) for n in ("openai_imagenet", "openai_imagenet_7", "simple")] == [80, 7, 1]
    assert load_templates("simple") == ["a photo of a {}."]
    assert load_templates("openai_imagenet")[0] == "a bad photo of a {}."
    assert load_templates("openai_imagenet_7")[0] == "itap of a {}."
    assert [t.format("x") for t in TEMPLATE_SETS["openai_imagenet"]] == [f("x") for f in OPENAI_IMAGENET_TEMPLATES]
    # A returned list is a copy: editing it leaves the shared set alone.
    load_templates("simple").append("a {}")
    assert TEMPLATE_SETS["simple"] == ["a photo of a {}."]


def test_both_placeholders_and_lambdas():
    assert load_templates(["a {c} toy.", "a photo of a {}."]) == ["a {c} toy.", "a photo of a {}."]
    assert render_template("a {c} toy.", "cat") == render_template("a {} toy.", "cat") == "a cat toy."
    assert render_template("a {} toy.", "set {x}") == "a set {x} toy."
    assert load_templates([lambda c: f"art of the {c}."]) == ["art of the {}."]
    assert load_templates("a photo of a {}.") == ["a photo of a {}."]


def test_per_class_dict():
    prompts = {"cat": ["a fluffy cat."], "dog": "a loyal dog.", "owl": ["an owl at night."]}
    assert load_templates(prompts, ["dog", "cat"]) == {"dog": ["a loyal dog."], "cat": ["a fluffy cat."]}
    with pytest.raises(ValueError) as info:
        load_templates(prompts, ["cat", "horse", "red heart"])
    assert str(info.value) == "per-class prompts are missing 2 of 3 classes: 'horse', 'red heart'"
    with pytest.raises(ValueError, match="non-empty list"):
        load_templates({"cat": []}, ["cat"])


def test_template_files(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps(["a {} toy.", "a photo of a {c}."]))
    (tmp_path / "cupl.json").write_text(json.dumps({"cat": ["a cat sleeping."], "dog": ["a dog running."]}))
    (tmp_path / "t.txt").write_text("a {} toy.\n\n  a photo of a {c}.  \n")
    assert load_templates(str(tmp_path / "t.json")) == ["a {} toy.", "a photo of a {c}."]
    assert load_templates(tmp_path / "t.txt") == ["a {} toy.", "a photo of a {c}."]
    assert load_templates(tmp_path / "cupl.json", ["dog"]) == {"dog": ["a dog running."]}
    with pytest.raises(ValueError, match="template file not found"):
        load_templates(str(tmp_path / "nope.json"))


def test_template_errors():
    with pytest.raises(ValueError) as info:
        load_templates("openai_imagnet")
    assert str(info.value) == ("unknown template set 'openai_imagnet'; known sets: openai_imagenet, "
                               "openai_imagenet_7, simple (did you mean 'openai_imagenet'?)")
    with pytest.raises(ValueError) as info:
        load_templates("zzz")
    assert str(info.value) == "unknown template set 'zzz'; known sets: openai_imagenet, openai_imagenet_7, simple"
    with pytest.raises(ValueError) as info:
        load_templates(["a {} toy.", "a photo of a cat."])
    assert str(info.value) == "template 'a photo of a cat.' has no class-name slot; write '{}' or '{c}' where the class name goes"
    with pytest.raises(ValueError, match="empty"):
        load_templates([])
