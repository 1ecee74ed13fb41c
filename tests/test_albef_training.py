"""ALBEF in the trainer: momentum distillation with a queue (loss.momentum, loss.queue_size) trains,
resumes to the same weights, and evaluation reports the MLM head's masked-token accuracy."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from vlpretrain.config import DataConfig, recipe_from_dict
from vlpretrain.training import train

from helpers import interrupt_at_step, read_metrics, tiny_recipe, write_image_csv


def _albef_recipe(out, table, **train_overrides) -> dict:
    values = tiny_recipe(out, table, epochs=2, validate_every_epoch=False, **train_overrides)
    values["model"]["fusion"] = {"layers": 1}
    values["loss"] = {"name": "albef", "momentum": 0.9, "queue_size": 8, "distill_alpha": 0.4}
    return values


def test_momentum_distillation_with_a_queue_trains_and_resumes_exactly(tmp_path):
    table = write_image_csv(tmp_path, 16)  # 4 steps per epoch, 8 in all; the queue (8) fills after 2
    full = train(recipe_from_dict(_albef_recipe(tmp_path / "full", table, checkpoint_every=3)))
    steps = [r for r in read_metrics(tmp_path / "full") if "itc_loss" in r]
    assert len(steps) == 8 and all(k in steps[0] for k in ("itm_loss", "mlm_loss", "itm_accuracy", "mlm_accuracy"))

    interrupt_at_step(recipe_from_dict(_albef_recipe(tmp_path / "cut", table, checkpoint_every=3)), 5)
    resumed = train(recipe_from_dict(_albef_recipe(tmp_path / "cut", table, checkpoint_every=3, resume="latest")))
    a = load_file(str(full.final_dir / "model.safetensors"))
    b = load_file(str(resumed.final_dir / "model.safetensors"))
    for key in a:  # the momentum model, the queue and the sampling step all came back with the checkpoint
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_retrieval_report_has_masked_token_accuracy(tmp_path):
    """evaluate_retrieval adds mlm_accuracy for a model with an MLM head; it equals the same seeded masking
    scored through the full (B, T, vocab) logits."""
    from vlpretrain.data.images import load_rgb
    from vlpretrain.inference import encode_corpus
    from vlpretrain.evaluation.tasks import evaluate_retrieval
    from vlpretrain.models.fusion_sampling import mask_tokens
    from vlpretrain.models import build_model
    from vlpretrain.models.tower_tokens import text_features_and_tokens
    from vlpretrain.data.named import open_named_corpus

    from helpers import tiny_model_config

    table = write_image_csv(tmp_path, 10)
    corpus = open_named_corpus(str(table), DataConfig(), None)
    torch.manual_seed(0)
    model = build_model(tiny_model_config(fusion={"layers": 1, "mlm_probability": 0.5})).eval()
    metrics = evaluate_retrieval(model, corpus, progress=False)["metrics"]

    feats = encode_corpus(model, corpus, progress=False)
    images = torch.stack([model.preprocess(load_rgb(corpus[i].image)) for i in feats["text_to_image"].tolist()])
    tokens = model.tokenizer(list(feats["captions"]))
    masked, labels = mask_tokens(tokens, model.mask_token_id, model.special_token_ids, model.vocab_size, 0.5,
                                 generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, hidden, padding = text_features_and_tokens(model.clip, masked, pooled=False)
        logits = model.fusion.mlm_logits(hidden, padding, model.encode_image_tokens(images))
    chosen = labels != -100
    expected = (logits[chosen].argmax(-1) == labels[chosen]).float().mean().item()
    assert metrics["mlm_masked_tokens"] == int(chosen.sum()) > 0
    assert metrics["mlm_accuracy"] == pytest.approx(expected, abs=1e-9)
