"""vlp export: open_clip and transformers CLIPModel folders that load without vlpretrain, equal outputs."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
import transformers
from PIL import Image

from helpers import TINY_TEXT, TINY_VISION, tiny_model_config
from vlpretrain import build_model
from vlpretrain.cli.main import main
from vlpretrain.config import ModelConfig
from vlpretrain.export import MARKER_NAME, export_model, load_line

CAPTIONS = ["a red square", "a smiling face with heart eyes", "Two cats, one dog!",
            "a very long caption that goes on and on well past the sixteen token context of the tiny model"]

SUFFIX = "is not HF-CLIP-compatible; use --format open_clip"


def _tiny(**overrides):
    torch.manual_seed(0)
    return build_model(tiny_model_config(**overrides), load_pretrained=False).eval()


@pytest.fixture(scope="module")
def tiny_model():
    return _tiny()


@pytest.fixture(scope="module")
def minilm_model():
    # ViT + the packaged MiniLM text tower, as recipes/lit-minilm-emoji.yaml (random weights: fast).
    return _tiny(text_tower="hf:minilm-l6", text={"context_length": 24})


def _image(size: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8"))


def _features(output) -> torch.Tensor:
    # transformers 5 returns a BaseModelOutputWithPooling (projected features in pooler_output), 4.x a tensor.
    return getattr(output, "pooler_output", output)


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("which", ["open_clip_text", "hf_text"])
def test_open_clip_export_loads_in_open_clip_with_equal_embeddings(which, tiny_model, minilm_model, tmp_path):
    model = tiny_model if which == "open_clip_text" else minilm_model
    out = export_model(model, "open_clip", tmp_path / "oc")
    assert (out / "open_clip_config.json").is_file() and (out / "open_clip_model.safetensors").is_file()
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["preprocess_cfg"]["size"] == 32 and config["preprocess_cfg"]["interpolation"] == "bicubic"

    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    loaded.eval()
    if which == "hf_text":
        assert config["model_cfg"]["text_cfg"]["hf_model_name"] == str(out.resolve())
        assert (out / "config.json").is_file() and isinstance(tokenizer, open_clip.tokenizer.HFTokenizer)

    tokens = model.tokenizer(CAPTIONS)
    assert torch.equal(tokenizer(CAPTIONS), tokens)
    images = torch.stack([preprocess(_image(40, seed)) for seed in range(2)])
    assert torch.allclose(images, torch.stack([model.preprocess(_image(40, seed)) for seed in range(2)]))
    with torch.no_grad():
        for normalize in (False, True):
            assert torch.allclose(loaded.encode_image(images, normalize=normalize),
                                  model.encode_image(images, normalize=normalize), atol=1e-5)
            assert torch.allclose(loaded.encode_text(tokens, normalize=normalize),
                                  model.encode_text(tokens, normalize=normalize), atol=1e-5)
    assert json.loads((out / MARKER_NAME).read_text())["format"] == "open_clip"


@pytest.mark.parametrize("variant", ["plain", "quick_gelu", "custom_text"])
def test_hf_export_matches_transformers_clip(variant, tmp_path):
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    quick_gelu = variant == "quick_gelu"
    if variant == "custom_text":
        # CustomTextCLIP keeps its text transformer under .text; deeper towers, other head counts and MLP ratio.
        arch = tmp_path / "arch.json"
        arch.write_text(json.dumps({"embed_dim": 16, "custom_text": True, "vision_cfg": {
            "image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 8, "mlp_ratio": 2.0},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}))
        torch.manual_seed(0)
        model = build_model(ModelConfig(arch=str(arch)), load_pretrained=False).eval()
        assert isinstance(model.clip, open_clip.CustomTextCLIP)
    else:
        model = _tiny(quick_gelu=True, image_mean=mean, image_std=std) if quick_gelu else _tiny()
    out = export_model(model, "hf", tmp_path / "hf")

    hf = transformers.CLIPModel.from_pretrained(str(out)).eval()
    assert hf.config.text_config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    assert hf.config.text_config.eos_token_id == 49407 and hf.config.projection_dim == 16
    images = torch.randn(3, 3, 32, 32)
    tokens = model.tokenizer(CAPTIONS)
    with torch.no_grad():
        image_features = _features(hf.get_image_features(pixel_values=images))
        text_features = _features(hf.get_text_features(input_ids=tokens))
        assert torch.allclose(image_features, model.encode_image(images, normalize=False), atol=1e-4)
        assert torch.allclose(text_features, model.encode_text(tokens, normalize=False), atol=1e-4)
        assert torch.allclose(torch.nn.functional.normalize(image_features, dim=-1), model.encode_image(images), atol=1e-4)
        assert torch.allclose(torch.nn.functional.normalize(text_features, dim=-1), model.encode_text(tokens), atol=1e-4)
    assert torch.allclose(hf.logit_scale, model.logit_scale)

    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(out))
    ids = tokenizer(CAPTIONS, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, tokens)

    processor = transformers.CLIPProcessor.from_pretrained(str(out))
    assert processor.image_processor.size["shortest_edge"] == 32
    assert np.allclose(processor.image_processor.image_mean, mean if quick_gelu else open_clip.OPENAI_DATASET_MEAN)
    assert np.allclose(processor.image_processor.image_std, std if quick_gelu else open_clip.OPENAI_DATASET_STD)
    # At the model's own size no resampling is involved, so both pipelines give the same pixels.
    pixels = processor(images=[_image(32)], return_tensors="pt").pixel_values
    assert torch.allclose(pixels, model.preprocess(_image(32))[None], atol=1e-5)
    assert json.loads((out / MARKER_NAME).read_text())["format"] == "hf"


@pytest.mark.parametrize("overrides, part", [
    (dict(image_tower="timm:test_resnet"), "timm image tower (timm:test_resnet)"),
    (dict(vision={"attentional_pool": True, "attn_pooler_heads": 2}),
     "image tower's attentional pooler (vision_cfg.attentional_pool)"),
    (dict(vision={"pool_type": "avg"}), "image tower's pool_type 'avg' (CLIPModel pools the class token)"),
    (dict(vision={"ls_init_value": 0.1}), "image tower's setting vision_cfg.ls_init_value=0.1"),
    (dict(text={"pool_type": "last"}),
     "text tower's pool_type 'last' (CLIPModel pools at the end-of-text token, like 'argmax')"),
    (dict(text={"proj_bias": True}), "text tower's setting text_cfg.proj_bias=True"),
])
def test_hf_export_refuses_what_clipmodel_cannot_express(overrides, part, tmp_path):
    vision, text = overrides.pop("vision", {}), overrides.pop("text", {})
    model = _tiny(vision={**TINY_VISION, **vision}, text={**TINY_TEXT, **text}, **overrides)
    with pytest.raises(ValueError) as error:
        export_model(model, "hf", tmp_path / "hf")
    assert str(error.value) == f"--format hf: the {part} {SUFFIX}"
    assert not (tmp_path / "hf").exists() and not _leftovers(tmp_path, "hf")


def test_hf_export_refuses_a_hugging_face_text_tower(minilm_model, tmp_path):
    with pytest.raises(ValueError) as error:
        export_model(minilm_model, "hf", tmp_path / "hf")
    assert str(error.value) == f"--format hf: the Hugging Face text tower (hf:minilm-l6) {SUFFIX}"


def test_cli_exports_a_checkpoint_and_prints_a_working_load_line(tiny_model, tmp_path, capsys):
    checkpoint = tiny_model.save_pretrained(tmp_path / "ckpt")
    images, tokens = torch.randn(2, 3, 32, 32), tiny_model.tokenizer(CAPTIONS[:2])
    for fmt in ("hf", "open_clip", "hf"):  # the second hf export replaces the first
        out = tmp_path / f"export-{fmt}"
        assert main(["export", str(checkpoint), "--format", fmt, "--out", str(out)]) == 0
        printed = capsys.readouterr().out.strip().splitlines()
        assert printed[0].startswith(f"wrote {out} (--format {fmt}): ") and printed[1] == "load it with:"
        assert printed[2].strip() == load_line(out)
        namespace = {}
        exec(printed[2].strip(), namespace)  # the printed line is real Python that loads the export
        loaded = namespace["model"].eval()
        with torch.no_grad():
            if fmt == "hf":
                assert isinstance(namespace["processor"], transformers.CLIPProcessor)
                got = _features(loaded.get_image_features(pixel_values=images))
                got_text = _features(loaded.get_text_features(input_ids=tokens))
            else:
                assert torch.equal(namespace["tokenizer"](CAPTIONS[:2]), tokens)
                got, got_text = loaded.encode_image(images), loaded.encode_text(tokens)
            assert torch.allclose(got, tiny_model.encode_image(images, normalize=False), atol=1e-4)
            assert torch.allclose(got_text, tiny_model.encode_text(tokens, normalize=False), atol=1e-4)
    assert not _leftovers(tmp_path, "export-hf")

    capsys.readouterr()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["export", str(checkpoint), "--format", "open_clip", "--out", str(other)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"vlp export: error: {other}: folder is not empty and is not a previous export "
        f"(no {MARKER_NAME}); pass --force to replace it")
    assert (other / "keep.txt").read_text() == "mine"
    assert main(["export", str(checkpoint), "--format", "open_clip", "--out", str(other), "--force"]) == 0
    assert not (other / "keep.txt").exists() and (other / "open_clip_config.json").is_file()

    assert main(["export", str(checkpoint), "--format", "open_clip", "--out", str(checkpoint)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"vlp export: error: {checkpoint}: is the checkpoint being exported; choose another --out folder")
    assert main(["export", str(checkpoint), "--format", "open_clip", "--out", str(tmp_path), "--force"]) == 2
    assert capsys.readouterr().err.strip() == (f"vlp export: error: {tmp_path}: holds the checkpoint being "
                                               f"exported ({checkpoint}); choose another --out folder")


def test_destination_and_format_errors(tiny_model, tmp_path):
    with pytest.raises(ValueError, match=r"^unknown export format 'onnx' \(use one of: open_clip, hf\)$"):
        export_model(tiny_model, "onnx", tmp_path / "x")
    target = tmp_path / "file.bin"
    target.write_text("x")
    with pytest.raises(ValueError) as error:
        export_model(tiny_model, "open_clip", target)
    assert str(error.value) == f"{target}: exists and is not a folder; choose another --out folder"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_model(tiny_model, "open_clip", empty) == empty and (empty / MARKER_NAME).is_file()


def test_crash_mid_write_leaves_the_previous_export_intact(tiny_model, tmp_path, monkeypatch):
    import vlpretrain.export.open_clip_format as open_clip_format

    out = export_model(tiny_model, "open_clip", tmp_path / "oc")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # The config is already written when the weights fail: a half-written folder must never replace `out`.
    monkeypatch.setattr(open_clip_format, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_model(_tiny(embed_dim=8), "open_clip", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not _leftovers(tmp_path, "oc")


def test_transformers_model_exports_back_to_its_own_format(tiny_model, tmp_path):
    # hf:FOLDER loads a transformers CLIPModel into HFDualTowers (vlpretrain.models.hf_towers); its hf
    # export is its own save_hf, and it has no open_clip form.
    from vlpretrain import load_model

    first = export_model(tiny_model, "hf", tmp_path / "clip-hf")
    model = load_model(f"hf:{first}").eval()
    assert torch.equal(model.tokenizer(CAPTIONS), tiny_model.tokenizer(CAPTIONS))
    with pytest.raises(ValueError) as error:
        export_model(model, "open_clip", tmp_path / "oc")
    assert str(error.value) == (f"--format open_clip: {model.clip.source} is a transformers clip model, "
                                f"not an open_clip one; use --format hf")

    out = export_model(f"hf:{first}", "hf", tmp_path / "again")
    assert json.loads((out / MARKER_NAME).read_text())["model"] == "transformers"
    namespace = {}
    exec(load_line(out), namespace)
    assert "AutoModel.from_pretrained" in load_line(out)
    tokens, images = model.tokenizer(CAPTIONS[:2]), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(_features(namespace["model"].eval().get_text_features(input_ids=tokens)),
                              tiny_model.encode_text(tokens, normalize=False), atol=1e-4)
        assert torch.allclose(_features(namespace["model"].get_image_features(pixel_values=images)),
                              tiny_model.encode_image(images, normalize=False), atol=1e-4)
