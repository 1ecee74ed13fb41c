"""Bad inputs made visible or refused: image decoding (EXIF, 16-bit, pixel limit), table bytes and lines,
placeholder / duplicate / over-long captions in training, named bad images in eval, empty queries, and the
transformers load report of a LiT text tower."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image, ImageFile

from helpers import huge_header_png, tiny_model_config, write_image_csv
from vlpretrain.config import DataConfig
from vlpretrain.data import BadImageError, ImageTextDataset, TableCorpus, load_rgb, open_corpus
from vlpretrain.data import images as images_module
from vlpretrain.data.corpus_audit import audit_training_corpus, truncated_captions
from vlpretrain.data.images import DEFAULT_MAX_PIXELS
from vlpretrain.data.named import open_named_corpus

HUGE = 10_000  # a 10000 x 10000 header: 100 megapixels, over the default limit


def _huge_png(path: Path, width: int = HUGE, height: int = HUGE) -> Path:
    return huge_header_png(path, width, height)


@pytest.fixture()
def decoded(monkeypatch) -> list:
    """Every image PIL decodes from a file while the test runs (ImageFile.load is where pixels are read)."""
    calls: list = []
    real = ImageFile.ImageFile.load

    def spy(self):
        calls.append(self.size)
        return real(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


# ----------------------------------------------------------------------------- images


def test_16bit_png_mid_grey_loads_as_128_not_white(tmp_path):
    values = np.array([[0, 32768, 65535, 257 * 200]], dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as opened:
        assert opened.mode in ("I;16", "I")  # what PIL makes of it: the mode the fix is for
    img = load_rgb(path)
    assert img.mode == "RGB"
    assert [img.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255), (200, 200, 200)]


@pytest.mark.parametrize("mode, values, want", [
    ("I;16B", [0, 32768, 65535], [0, 128, 255]),
    ("I", [0, 32768, 65535], [0, 128, 255]),          # 16-bit data in a 32-bit image (older PIL's 16-bit PNG)
    ("I", [0, 100, 255], [0, 100, 255]),              # 8-bit data in a 32-bit image: kept
    ("I", [-1000, 0, 1000], [0, 128, 255]),           # any other range: stretched from min..max
    ("F", [0.0, 0.5, 1.0], [0, 128, 255]),            # 0..1 floats
    ("F", [0.0, 100.0, 255.0], [0, 100, 255]),        # 0..255 floats: kept
    ("F", [float("nan"), 0.25, 1.0], [0, 64, 255]),   # NaN: 0
])
def test_wide_modes_are_scaled_to_8_bits(mode, values, want):
    if mode == "I;16B":
        img = Image.frombytes("I;16B", (3, 1), np.array(values, ">u2").tobytes())
    else:
        img = Image.fromarray(np.array([values], np.int32 if mode == "I" else np.float32), mode)
    assert img.mode == mode
    out = load_rgb(img)
    assert [out.getpixel((x, 0)) for x in range(3)] == [(v, v, v) for v in want]


def _landscape_jpeg_rotated(path: Path) -> Path:
    """A 40x20 JPEG, left half red and right half blue, whose EXIF says: turn 90 degrees clockwise (6)."""
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(array).save(path, "JPEG", exif=exif, quality=95)
    return path


def test_exif_orientation_6_comes_out_portrait(tmp_path):
    path = _landscape_jpeg_rotated(tmp_path / "portrait.jpg")
    img = load_rgb(path)
    assert img.size == (20, 40)  # portrait, as a viewer shows it
    top, bottom = img.getpixel((10, 5)), img.getpixel((10, 34))
    assert top[0] > 200 and top[2] < 60  # the left (red) edge turned to the top
    assert bottom[2] > 200 and bottom[0] < 60
    assert load_rgb(path.read_bytes()).size == (20, 40)
    with Image.open(path) as opened:  # a caller's own image: turned in a copy, never changed
        assert load_rgb(opened).size == (20, 40) and opened.size == (40, 20)


def test_100_megapixel_png_is_refused_from_its_header(tmp_path, decoded):
    path = _huge_png(tmp_path / "huge.png")
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL must not be how we find out
        with pytest.raises(BadImageError) as e:
            load_rgb(path)
        with pytest.raises(BadImageError) as from_bytes:
            load_rgb(path.read_bytes())
    assert str(e.value) == (f"{path}: 10000x10000 = 100000000 pixels, over the limit of 89478485 "
                            f"(data.max_pixels); not decoded")
    assert e.value.kind == "too_large" and from_bytes.value.kind == "too_large"
    assert str(from_bytes.value).startswith(f"{path.stat().st_size} bytes: 10000x10000 = ")
    assert decoded == []  # refused before a pixel was read
    assert Image.MAX_IMAGE_PIXELS == before  # PIL's own limit restored
    assert DEFAULT_MAX_PIXELS == DataConfig().max_pixels == before  # one default, PIL's


def test_real_100_megapixel_paletted_png_is_refused_without_decoding(tmp_path, decoded):
    path = tmp_path / "clipart.png"
    Image.new("1", (HUGE, HUGE)).save(path)  # a real PNG of 100 MP: compresses to a few kB
    decoded.clear()
    with pytest.raises(BadImageError, match=r"clipart.png: 10000x10000 = 100000000 pixels, over the limit"):
        load_rgb(path)
    assert decoded == []


def test_pixel_limit_is_configurable_and_none_means_no_limit(tmp_path):
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 40), (10, 20, 30)).save(small)
    with pytest.raises(BadImageError, match=r"small.png: 40x40 = 1600 pixels, over the limit of 1500 \(--max-pixels\)"):
        load_rgb(small, max_pixels=1500, setting="--max-pixels")
    assert load_rgb(small, max_pixels=1600).getpixel((0, 0)) == (10, 20, 30)
    assert load_rgb(small, max_pixels=None).size == (40, 40)
    with Image.open(small) as opened, pytest.raises(BadImageError, match="in-memory image: 40x40 = 1600 pixels"):
        load_rgb(opened, max_pixels=100)


def test_shard_writer_uses_the_same_pixel_check(tmp_path, monkeypatch):
    from vlpretrain.data.shard_writer import ShardSettings, _Skip, convert_image

    seen: list = []
    real = images_module.check_pixel_limit
    monkeypatch.setattr(images_module, "check_pixel_limit", lambda *a, **k: seen.append(a) or real(*a, **k))
    path = _huge_png(tmp_path / "huge.png", 2000, 1000)
    with pytest.raises(_Skip) as e:
        convert_image(str(path), ShardSettings(max_pixels=1_000_000))
    assert (e.value.kind, e.value.reason) == (
        "too_large", "2000x1000 = 2000000 pixels, over the limit of 1000000 (--max-pixels); not decoded")
    assert seen == [((2000, 1000), 1_000_000, str(path), "--max-pixels")]


def _fake_model(context_length: int = 16) -> SimpleNamespace:
    """What build_train_dataset reads of a model: transforms, tokenizer, context length."""
    from torchvision.transforms.functional import to_tensor

    return SimpleNamespace(preprocess_train=lambda img: to_tensor(img.resize((8, 8))),
                           tokenizer=SimpleTokenizer(context_length=context_length), context_length=context_length)


def test_training_dataset_skips_images_over_data_max_pixels(tmp_path):
    from vlpretrain.training.data import build_train_dataset

    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    Image.new("RGB", (10, 10)).save(tmp_path / "b.png")
    table = tmp_path / "pairs.csv"
    table.write_text("image,caption\na.png,big\nb.png,small\n")
    dataset = build_train_dataset(DataConfig(train=str(table), max_pixels=1000), _fake_model(), seed=0)
    assert isinstance(dataset, ImageTextDataset) and dataset.max_pixels == 1000
    sample = dataset[0]
    assert sample["index"] == 1
    assert sample["skipped"] == [(f"{table}:row 1", f"{tmp_path / 'a.png'}: 40x40 = 1600 pixels, over the limit "
                                                    f"of 1000 (data.max_pixels); not decoded")]


# ----------------------------------------------------------------------------- tables


def _csv_with_bad_byte(folder: Path) -> Path:
    """A CSV whose line 7 (data row 6) holds a 0xff byte at column 12."""
    for name in "abcdefg":
        Image.new("RGB", (4, 4)).save(folder / f"{name}.png")
    lines = [b"image,caption"] + [f"{n}.png,caption {n}".encode() for n in "abcde"]
    lines.append(b"f.png,caf\xc3\xa9 \xff au lait")  # "f.png,café " is 11 characters: 0xff is column 12
    lines.append(b"g.png,caption g")
    path = folder / "pairs.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_non_utf8_byte_names_file_line_and_column(tmp_path):
    path = _csv_with_bad_byte(tmp_path)
    with pytest.raises(ValueError) as e:
        TableCorpus(path)
    assert str(e.value) == (f"{path} line 7: bytes are not valid UTF-8 (0xff at column 12); set data.encoding "
                            f"(e.g. latin-1) or data.on_bad_lines=skip")


def test_bad_byte_line_skipped_counted_and_logged(tmp_path, caplog):
    path = _csv_with_bad_byte(tmp_path)
    caplog.set_level(logging.WARNING, logger="vlpretrain")
    corpus = open_named_corpus(str(path), DataConfig(on_bad_lines="skip"))
    assert [row.captions for row in corpus] == [[f"caption {n}"] for n in "abcdeg"]
    assert corpus.skipped == [(f"{path}:line 7", "bytes are not valid UTF-8 (0xff at column 12)")]
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: skipped 1 bad lines (data.on_bad_lines=skip), e.g. line 7: bytes are not valid UTF-8 "
        f"(0xff at column 12)"]
    latin = open_named_corpus(str(path), DataConfig(encoding="latin-1"))  # the other way: read every line
    assert len(latin) == 7 and latin[5].captions == ["cafÃ© ÿ au lait"]


def test_lines_with_too_many_fields_are_named_or_skipped(tmp_path, caplog):
    for name in "abc":
        Image.new("RGB", (4, 4)).save(tmp_path / f"{name}.png")
    path = tmp_path / "pairs.csv"
    path.write_text("image,caption\na.png,one\nb.png,two,extra\nc.png,three\n")
    with pytest.raises(ValueError) as e:
        TableCorpus(path)
    assert str(e.value) == (f"{path} line 3: expected 2 fields, saw 3 (quote cells that hold the separator); "
                            f"set data.on_bad_lines=skip to drop such lines")
    caplog.set_level(logging.WARNING, logger="vlpretrain")
    corpus = TableCorpus(path, on_bad_lines="skip")
    assert [row.captions for row in corpus] == [["one"], ["three"]]
    assert corpus.skipped == [(f"{path}:line 3", "expected 2 fields, saw 3")]
    assert f"{path}: skipped 1 bad lines (data.on_bad_lines=skip), e.g. line 3: expected 2 fields, saw 3" in caplog.text


def test_tsv_and_jsonl_bad_lines(tmp_path):
    for name in "abc":
        Image.new("RGB", (4, 4)).save(tmp_path / f"{name}.png")
    tsv = tmp_path / "pairs.tsv"
    tsv.write_bytes(b"image\tcaption\na.png\tone\nb.png\tt\xffwo\nc.png\tthree\n")
    with pytest.raises(ValueError, match=r"pairs.tsv line 3: bytes are not valid UTF-8 \(0xff at column 8\)"):
        TableCorpus(tsv)
    assert [r.captions for r in TableCorpus(tsv, on_bad_lines="skip")] == [["one"], ["three"]]

    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_bytes(b'{"image": "a.png", "caption": "one"}\n{"image": "b.png", "caption": \n'
                      b'{"image": "c.png", "caption": "thr\xffee"}\n[1, 2]\n')
    with pytest.raises(ValueError) as e:
        TableCorpus(jsonl)
    assert str(e.value) == (f"{jsonl} line 2: not valid JSON (Expecting value at column 31); "
                            f"set data.on_bad_lines=skip to drop such lines")
    corpus = TableCorpus(jsonl, on_bad_lines="skip")
    assert [r.captions for r in corpus] == [["one"]]
    assert corpus.skipped == [(f"{jsonl}:line 2", "not valid JSON (Expecting value at column 31)"),
                              (f"{jsonl}:line 3", "bytes are not valid UTF-8 (0xff at column 35)"),
                              (f"{jsonl}:line 4", "not a JSON object (a list)")]


def test_reader_options_are_checked(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("image,caption\n")
    with pytest.raises(ValueError) as e:
        open_corpus(path, encoding="utf9")
    assert str(e.value) == "data.encoding: unknown text encoding 'utf9' (e.g. utf-8, latin-1, cp1252)"
    with pytest.raises(ValueError) as e:
        open_corpus(path, on_bad_lines="ignore")
    assert str(e.value) == "data.on_bad_lines: expected one of ['error', 'skip'], got 'ignore'"


# ----------------------------------------------------------------------------- training corpus checks


def test_placeholder_duplicate_and_long_captions_counted_once(tmp_path, caplog):
    for name in "abcd":
        Image.new("RGB", (4, 4)).save(tmp_path / f"{name}.png")
    long = " ".join(["word"] * 20)  # 20 BPE tokens + 2: over a context of 16
    path = tmp_path / "pairs.jsonl"
    rows = [{"image": "a.png", "caption": ["nan", "a dog"]},
            {"image": "b.png", "caption": ["None", " null "]},
            {"image": "c.png", "caption": "a cat"},
            {"image": "c.png", "caption": "a cat"},
            {"image": "d.png", "caption": long},
            {"image": "c.png", "caption": "another cat"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    caplog.set_level(logging.INFO, logger="vlpretrain")
    corpus, counts = audit_training_corpus(open_corpus(path), SimpleTokenizer(context_length=16), 16)
    assert counts == {"rows": 6, "captions": 5, "placeholder_captions": 3, "placeholder_rows": 1,
                      "duplicate_rows": 1, "truncated_captions": 1, "truncated_estimated": False, "context_length": 16}
    assert [r.captions for r in corpus] == [["a dog"], ["a cat"], ["a cat"], [long], ["another cat"]]
    assert [r.source for r in corpus][0] == f"{path}:row 1"
    assert corpus.skipped == [(f"{path}:row 2", "no caption but placeholders ('nan', 'None', 'null')")]
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: dropped 3 placeholder captions ('nan', 'None', 'null'), e.g. {path}:row 1 ('nan'), "
        f"{path}:row 2 ('None'); 1 rows had no other caption and are skipped (e.g. {path}:row 2)",
        f"{path}: 1 duplicate rows (same image and captions as an earlier row), kept, e.g. {path}:row 4 = {path}:row 3",
        f"{path}: 1 of 5 captions are longer than the context length (16 tokens) and are truncated, e.g. {path}:row 5",
        f"{path}: 5 rows, 5 captions; placeholder captions dropped: 3 (rows skipped: 1); duplicate rows: 1; "
        f"captions truncated: 1",
    ]


def test_truncation_estimated_from_a_sample_of_a_big_corpus(tmp_path, monkeypatch, caplog):
    from vlpretrain.data import corpus_audit

    monkeypatch.setattr(corpus_audit, "MAX_TOKENIZED", 4)
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    path = tmp_path / "pairs.csv"
    long = " ".join(["word"] * 20)
    path.write_text("image,caption\n" + "".join(f"a.png,{long} {i}\n" for i in range(10)) + "a.png,short\n")
    caplog.set_level(logging.WARNING, logger="vlpretrain")
    _, counts = audit_training_corpus(open_corpus(path), SimpleTokenizer(context_length=16), 16)
    assert (counts["truncated_captions"], counts["truncated_estimated"]) == (10, True)
    assert f"{path}: about 10 of 11 captions are longer than the context length (16 tokens)" in caplog.text


def test_duplicates_counted_against_the_first_copy():
    from vlpretrain.data.corpus_audit import _duplicates

    keys = np.array([7, 5, 7, 7, 5, 9, 7], np.int64)
    known = np.array([True, True, True, True, True, True, False])  # row 6: an in-memory image, not compared
    assert _duplicates(keys, known) == (3, [(2, 0), (3, 0), (4, 1)])


def test_clean_corpus_is_returned_unchanged():
    corpus = open_named_corpus("emoji:test")
    same, counts = audit_training_corpus(corpus, log=False)
    assert same is corpus and counts["truncated_captions"] is None


def test_truncation_counted_exactly_at_the_context_boundary():
    tokenizer = SimpleTokenizer(context_length=16)
    fits, cut = " ".join(["a"] * 14), " ".join(["a"] * 15)  # start + 14 + end = 16 tokens
    assert truncated_captions(["short", fits, cut, cut + " more"], tokenizer, 16) == [2, 3]


def test_training_log_counts_when_the_run_builds_its_dataset(tmp_path, caplog):
    from vlpretrain.training.data import build_train_dataset

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    table = tmp_path / "pairs.csv"
    table.write_text("image,caption\na.png,nan\na.png,a red square\na.png,a red square\n")
    caplog.set_level(logging.WARNING, logger="vlpretrain")
    dataset = build_train_dataset(DataConfig(train=str(table)), _fake_model(), seed=0)
    assert len(dataset) == 2
    assert f"{table}: dropped 1 placeholder captions" in caplog.text
    assert f"{table}: 1 duplicate rows" in caplog.text
    caplog.clear()
    build_train_dataset(DataConfig(train=str(table)), _fake_model(), seed=0, rank=1)  # other processes: quiet
    assert caplog.records == []


# ----------------------------------------------------------------------------- evaluation and queries


def test_eval_retrieval_names_its_bad_images(tmp_path, caplog):
    from vlpretrain.evaluation.tasks import evaluate_retrieval
    from vlpretrain.models.factory import build_model

    table = write_image_csv(tmp_path, 4)
    bad = tmp_path / "images" / "img2.png"
    bad.write_bytes(b"not an image")
    model = build_model(tiny_model_config(), load_pretrained=False).eval()
    caplog.set_level(logging.WARNING, logger="vlpretrain")
    result = evaluate_retrieval(model, open_corpus(table), batch_size=4, progress=False, dataset_name="pairs")
    example = f"{table}:row 3: {bad.resolve()}: not a readable image (unknown or corrupt format)"
    assert result["metrics"]["bad_images"] == 1
    assert result["bad_image_examples"] == [example]
    assert f"pairs: bad image, counted as a miss: {example}" in caplog.text


def test_empty_text_queries_are_refused():
    from vlpretrain.retrieval.index_search import check_query_texts, encode_queries

    with pytest.raises(ValueError) as e:
        encode_queries(None, ["a red heart", "   "], None)  # refused before the model is used
    assert str(e.value) == "search: text query 2 of 2 is empty; give some words to search for"
    with pytest.raises(ValueError, match=r"^search: the text query is empty; give some words to search for$"):
        check_query_texts([""])
    check_query_texts(["a red heart"])


@pytest.mark.parametrize("text", ["", "  "])
def test_vlp_index_query_refuses_empty_text(tmp_path, capsys, text):
    from vlpretrain.cli.main import main

    code = main(["index", "query", str(tmp_path / "no-index"), "--text", text])
    assert code == 2
    assert capsys.readouterr().err == "vlp index: error: --text: the text query is empty; give some words to search for\n"


def test_zeroshot_refuses_an_empty_class_name():
    from vlpretrain.evaluation.tasks import evaluate_zeroshot

    data = SimpleNamespace(labels=["a", "b"], name="toy", images=[])
    with pytest.raises(ValueError) as e:
        evaluate_zeroshot(None, data, classnames={"a": "cat", "b": "  "})  # refused before the model is used
    assert str(e.value) == "toy: 1 class names are empty (labels 'b'); give every class a name (--classnames)"


# ----------------------------------------------------------------------------- expected warnings


def test_unused_pooler_report_silenced_other_reports_kept(caplog):
    from transformers import AutoModel

    from vlpretrain.models.hf_towers import _only_unused_pooler, quiet_unused_pooler
    from vlpretrain.models.towers import resolve_hf_name

    folder = resolve_hf_name("minilm-l6")
    caplog.set_level(logging.WARNING)
    AutoModel.from_pretrained(folder, add_pooling_layer=False)  # as open_clip loads a LiT text tower
    assert "pooler.dense" in caplog.text  # the report this is about (so the test below can fail)
    caplog.clear()
    with quiet_unused_pooler():
        AutoModel.from_pretrained(folder, add_pooling_layer=False)
    assert "pooler" not in caplog.text
    report = ("BertModel LOAD REPORT from: x\nKey | Status | \n----+--------+-\n"
              "pooler.dense.{bias, weight} | UNEXPECTED | \nembeddings.word_embeddings.weight | MISSING | \n\nNotes:")
    assert not _only_unused_pooler(report)  # anything else in the report is kept
    assert _only_unused_pooler(report.replace("embeddings.word_embeddings.weight | MISSING | \n", ""))
    assert _only_unused_pooler("Some weights of the model checkpoint at x were not used when initializing "
                               "BertModel: ['pooler.dense.bias', 'pooler.dense.weight']\n- This IS expected")


def test_shared_corpus_options_give_the_reading_settings():
    import argparse

    from vlpretrain.cli.options import add_corpus_options, corpus_config

    p = argparse.ArgumentParser()
    add_corpus_options(p)
    data = corpus_config(p.parse_args(["--data", "pairs.csv", "--caption-column", "c1,c2", "--encoding", "latin-1",
                                       "--on-bad-lines", "skip"]))
    assert (data.caption_column, data.encoding, data.on_bad_lines) == (["c1", "c2"], "latin-1", "skip")
    assert corpus_config(p.parse_args(["--data", "pairs.csv"])) == DataConfig()


def test_open_clip_augmentation_keys_it_applies_give_no_unused_warning():
    """open_clip lists gray_scale_prob / color_jitter as "unused" although it applies them: silenced; a
    key it really ignores without use_timm (ratio) still warns."""
    import warnings

    from vlpretrain.data.transforms import ImageSettings, build_transforms

    settings = ImageSettings(size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_transforms(settings, {"scale": [0.5, 1.0], "gray_scale_prob": 0.2, "color_jitter": [0.1, 0.1, 0.1, 0.0],
                                    "color_jitter_prob": 0.5})
    with pytest.warns(UserWarning, match=r"Unused augmentation cfg items.*'ratio'"):
        build_transforms(settings, {"ratio": [0.75, 1.33]})
