"""Hugging Face CLIP and SigLIP models as a model source (hf:FOLDER, model.hf_model), on tiny random
models written to tmp_path: embeddings equal transformers' own, checkpoints reload, errors are one line,
and the trainer fine-tunes them (SigLIP with loss.name=siglip).

SigLIP's real tokenizer is SentencePiece (the sentencepiece package, not installed here); the tiny SigLIP
folder ships a `tokenizers` word-level tokenizer instead, which AutoTokenizer loads the same way.
"""

from __future__ import annotations

import gzip
import importlib.util
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from pathlib import Path

from vlpretrain.config import ModelConfig, load_recipe
from vlpretrain.losses import create_loss
from vlpretrain.models import build_model, load_model
from vlpretrain.models.hf_towers import HFDualTowers
from vlpretrain.training import train

from helpers import write_image_csv

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TEXTS = ["a red square", "a photo of the cat", "a much longer caption " * 30]


def _clip_tokenizer():
    """A real CLIP BPE tokenizer over the first 200 merges of open_clip's CLIP vocabulary."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:201]
    merges = [tuple(m.split()) for m in merges]
    byte_chars = list(bytes_to_unicode().values())
    words = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    words += ["<|startoftext|>", "<|endoftext|>"]
    return transformers.CLIPTokenizer(vocab={w: i for i, w in enumerate(words)}, merges=merges)


def _siglip_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<pad>", "</s>", "<unk>", "a", "photo", "of", "the", "cat", "red", "square", "number", "blue"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="</s>", eos_token="</s>",
                                                unk_token="<unk>", model_max_length=64)


def tiny_clip_config(tokenizer) -> "transformers.CLIPConfig":
    """A tiny transformers CLIPConfig (32 px images) for ``tokenizer``'s vocabulary and special tokens."""
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    return transformers.CLIPConfig(
        text_config=dict(TINY, vocab_size=len(tokenizer), max_position_embeddings=77, **ids),
        vision_config=dict(TINY, image_size=32, patch_size=8), projection_dim=16)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = _clip_tokenizer()
    model = transformers.CLIPModel(tiny_clip_config(tokenizer))
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    folder = tmp_path_factory.mktemp("hf") / "tiny-clip"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory):
    torch.manual_seed(1)
    tokenizer = _siglip_tokenizer()
    ids = dict(bos_token_id=None, eos_token_id=1, pad_token_id=1)
    config = transformers.SiglipConfig(
        text_config=dict(TINY, vocab_size=len(tokenizer), max_position_embeddings=64, **ids),
        vision_config=dict(TINY, image_size=32, patch_size=8))
    model = transformers.SiglipModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-5.0)
    folder = tmp_path_factory.mktemp("hf") / "tiny-siglip"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _assert_matches_transformers(model, folder, context_length: int) -> None:
    hf = transformers.AutoModel.from_pretrained(folder).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokens = model.tokenizer(TEXTS)
    expected_tokens = hf_tokenizer(TEXTS, padding="max_length", truncation=True, max_length=context_length,
                                   return_tensors="pt")["input_ids"]
    assert tokens.shape == (len(TEXTS), context_length) and torch.equal(tokens, expected_tokens)
    assert model.context_length == context_length
    images = _images()
    model.eval()
    with torch.no_grad():
        image_ref = F.normalize(hf.get_image_features(pixel_values=images).pooler_output, dim=-1)
        text_ref = F.normalize(hf.get_text_features(input_ids=tokens).pooler_output, dim=-1)
        torch.testing.assert_close(model.encode_image(images), image_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(tokens), text_ref, atol=1e-5, rtol=0)
    assert torch.equal(model.logit_scale.detach(), hf.logit_scale.detach())


def test_clip_folder_gives_transformers_embeddings(clip_folder):
    model = load_model(f"hf:{clip_folder}")
    assert isinstance(model.clip, HFDualTowers) and model.clip.model_type == "clip"
    assert model.clip.source == str(clip_folder) and model.clip.logit_bias is None
    assert model.embed_dim == 16 and float(model.logit_scale.detach()) == 3.0
    _assert_matches_transformers(model, clip_folder, context_length=77)
    # CLIP's eval preprocessing: shortest side to 32, centre crop, OpenAI mean / std.
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    pixels = model.preprocess(image)
    expected = transformers.CLIPImageProcessor.from_pretrained(clip_folder)(image, return_tensors="pt")["pixel_values"][0]
    assert pixels.shape == (3, 32, 32)
    torch.testing.assert_close(pixels, expected, atol=2e-2, rtol=0)
    assert "logit_bias" not in model(_images(), model.tokenizer(TEXTS[:2]))


def test_siglip_folder_gives_transformers_embeddings_and_logit_bias(siglip_folder):
    model = build_model(ModelConfig(hf_model=str(siglip_folder)))
    assert model.clip.model_type == "siglip" and model.embed_dim == 32
    assert float(model.logit_scale.detach()) == pytest.approx(2.3) and float(model.clip.logit_bias.detach()) == -5.0
    _assert_matches_transformers(model, siglip_folder, context_length=64)
    out = model(_images(), model.tokenizer(TEXTS[:2]))
    assert out["logit_bias"] is model.clip.logit_bias
    # SigLIP resizes the whole image to a square (no crop), mean / std 0.5.
    image = Image.new("RGB", (64, 48), (10, 200, 30))
    pixels = model.preprocess(image)
    assert pixels.shape == (3, 32, 32)
    torch.testing.assert_close(pixels[:, 0, 0], torch.tensor([10, 200, 30]) / 127.5 - 1, atol=1e-2, rtol=0)


def test_checkpoint_reloads_without_the_source_folder_and_exports_to_transformers(clip_folder, siglip_folder, tmp_path):
    for source in (clip_folder, siglip_folder):
        copy = tmp_path / f"src-{source.name}"
        shutil.copytree(source, copy)
        model = load_model(f"hf:{copy}").eval()
        with torch.no_grad():
            model.clip.logit_scale.add_(0.5)  # a trained value must come back, not the source's
        model.save_pretrained(tmp_path / f"ckpt-{source.name}")
        shutil.rmtree(copy)
        reloaded = load_model(tmp_path / f"ckpt-{source.name}").eval()
        tokens, images = model.tokenizer(TEXTS), _images()
        with torch.no_grad():
            torch.testing.assert_close(reloaded.encode_image(images), model.encode_image(images), atol=0, rtol=0)
            torch.testing.assert_close(reloaded.encode_text(tokens), model.encode_text(tokens), atol=0, rtol=0)
        assert torch.equal(reloaded.tokenizer(TEXTS), tokens)
        assert torch.equal(reloaded.logit_scale, model.logit_scale)

        exported = reloaded.clip.save_hf(tmp_path / f"export-{source.name}")
        hf = transformers.AutoModel.from_pretrained(exported).eval()
        assert transformers.AutoTokenizer.from_pretrained(exported)(TEXTS[0])["input_ids"]
        assert transformers.AutoImageProcessor.from_pretrained(exported) is not None
        with torch.no_grad():
            ref = F.normalize(hf.get_image_features(pixel_values=images).pooler_output, dim=-1)
            torch.testing.assert_close(reloaded.encode_image(images), ref, atol=1e-5, rtol=0)
        assert torch.equal(hf.logit_scale, model.logit_scale)
    assert transformers.AutoProcessor.from_pretrained(tmp_path / "export-tiny-clip") is not None


def test_errors_are_one_line_and_name_the_path(clip_folder, siglip_folder, tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(ValueError) as error:
        load_model(f"hf:{missing}")
    assert str(error.value) == (f"{missing}: no such folder; model.hf_model takes a transformers CLIP or SigLIP "
                                f"folder or a hub id (e.g. openai/clip-vit-base-patch32)")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError) as error:
        load_model(f"hf:{empty}")
    assert str(error.value) == f"{empty}: not a transformers model folder (no config.json)"

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError) as error:
        load_model(f"hf:{bert}")
    assert str(error.value) == (f"{bert}: model_type 'bert' is not a CLIP or SigLIP model "
                                f"(model.hf_model takes transformers CLIPModel or SiglipModel folders)")

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(clip_folder / name, no_weights)
    with pytest.raises(ValueError) as error:
        load_model(f"hf:{no_weights}")
    assert str(error.value) == (f"{no_weights}: no weights file (model.safetensors or pytorch_model.bin); "
                                f"pass a folder written by save_pretrained")

    # Without tokenizer files AutoTokenizer would build an empty CLIP vocabulary: refused instead.
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    shutil.copy(clip_folder / "config.json", no_tokenizer)
    shutil.copy(clip_folder / "model.safetensors", no_tokenizer)
    with pytest.raises(ValueError) as error:
        load_model(f"hf:{no_tokenizer}")
    assert str(error.value) == (f"{no_tokenizer}: no tokenizer files (tokenizer.json, vocab.json, spiece.model); "
                                f"save the model's tokenizer into the folder with tokenizer.save_pretrained")

    if importlib.util.find_spec("sentencepiece") is None:
        spiece = tmp_path / "spiece"
        shutil.copytree(siglip_folder, spiece)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (spiece / name).unlink()
        (spiece / "tokenizer_config.json").write_text('{"tokenizer_class": "SiglipTokenizer"}')
        (spiece / "spiece.model").write_bytes(b"not read")
        with pytest.raises(ValueError) as error:
            load_model(f"hf:{spiece}")
        assert str(error.value) == (f"{spiece}: its tokenizer is SentencePiece (SigLIP's), which needs the "
                                    f"sentencepiece package: pip install sentencepiece")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(clip_folder, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError) as error:
        load_model(f"hf:{corrupt}")
    assert str(error.value) == f"{corrupt / 'model.safetensors'}: unreadable or truncated weights file"

    # A CLIP config.json beside SigLIP weights.
    mixed = tmp_path / "mixed"
    shutil.copytree(clip_folder, mixed)
    shutil.copy(siglip_folder / "model.safetensors", mixed / "model.safetensors")
    with pytest.raises(ValueError) as error:
        load_model(f"hf:{mixed}")
    assert str(error.value) == (f"{mixed}: the weights do not fit its clip config.json (5 missing, 4 of another "
                                f"shape, e.g. text_projection.weight); are they another model's?")

    # Our checkpoint: a SigLIP model's weights under a CLIP model's vlp_config.json.
    clip_ckpt = load_model(f"hf:{clip_folder}").save_pretrained(tmp_path / "clip-ckpt")
    siglip_ckpt = load_model(f"hf:{siglip_folder}").save_pretrained(tmp_path / "siglip-ckpt")
    shutil.copy(siglip_ckpt / "model.safetensors", clip_ckpt / "model.safetensors")
    with pytest.raises(ValueError) as error:
        load_model(clip_ckpt)
    assert str(error.value) == (f"{clip_ckpt / 'model.safetensors'}: weights do not match the model in "
                                f"vlp_config.json (4 of another shape, e.g. clip.hf_model.logit_scale)")

    with pytest.raises(ValueError) as error:
        load_model("hf:nobody-at-all/no-such-model")
    assert str(error.value).startswith("nobody-at-all/no-such-model: not a local folder, and the Hugging Face hub "
                                       "copy cannot be loaded (")
    assert "\n" not in str(error.value)

    with pytest.raises(ValueError, match="loss.name=siglip needs a model with a learnable logit_bias"):
        create_loss("siglip")(image_features=torch.randn(2, 4), text_features=torch.randn(2, 4),
                              logit_scale=torch.tensor(10.0))


def test_locks_leave_the_last_groups_trainable(clip_folder):
    model = build_model(ModelConfig(hf_model=str(clip_folder), lock_image=True, lock_image_unlocked_groups=2,
                                    lock_text=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "clip.hf_model.visual_projection.weight" in trainable
    assert "clip.hf_model.vision_model.post_layernorm.weight" in trainable
    assert any(n.startswith("clip.hf_model.vision_model.encoder.layers.1.") for n in trainable)
    assert not any(n.startswith(("clip.hf_model.vision_model.encoder.layers.0.", "clip.hf_model.vision_model.embeddings"))
                   for n in trainable)
    assert not any(n.startswith(("clip.hf_model.text_model.", "clip.hf_model.text_projection")) for n in trainable)
    assert "clip.hf_model.logit_scale" in trainable
    with pytest.raises(ValueError, match=r"model.lock_image_unlocked_groups=5, but the image tower has 4 groups"):
        model.lock_image_tower(5)


@pytest.mark.parametrize("kind,loss", [("clip", "contrastive"), ("siglip", "siglip")])
def test_trainer_fine_tunes_hf_models(kind, loss, clip_folder, siglip_folder, tmp_path):
    """The shipped recipe, with the tiny model, a tiny CSV, layer decay and EMA: 3 steps."""
    folder = clip_folder if kind == "clip" else siglip_folder
    csv = write_image_csv(tmp_path, 12)
    recipe = Path(__file__).parents[1] / "recipes" / "finetune-hf-clip.yaml"
    cfg = load_recipe(recipe, [f"model.hf_model={folder}", f"loss.name={loss}", f"data.train={csv}", "data.val=null",
                               "data.num_workers=0", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3",
                               "train.batch_size=4", "train.lr=1e-3", "train.precision=no", "train.threads=1",
                               "train.progress=false", "train.checkpoint_every=null", "train.layer_decay=0.8",
                               "train.ema_decay=0.9"])
    result = train(cfg)
    assert result.step == 3 and (result.output_dir / "final-online" / "model.safetensors").is_file()
    before = transformers.AutoModel.from_pretrained(folder).state_dict()
    after = load_file(str(result.final_dir / "model.safetensors"))
    changed = [k for k, v in before.items() if not torch.equal(after[f"clip.hf_model.{k}"], v)]
    assert any("encoder.layers" in k for k in changed)
    if kind == "siglip":
        assert "logit_bias" in changed
    reloaded = load_model(result.final_dir)
    assert reloaded.clip.model_type == kind
