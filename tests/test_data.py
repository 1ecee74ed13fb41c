"""Corpus readers, image loading, dataset / collate / sampler (all fast, no network)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vlpretrain.data import (
    BadImageError,
    EpochPermutationSampler,
    HFDatasetCorpus,
    ImageTextDataset,
    TableCorpus,
    collate_image_text,
    load_rgb,
    open_corpus,
)

CTX = 8


def fake_tokenizer(texts: list[str]) -> torch.Tensor:
    """list[str] -> LongTensor[n, CTX], like open_clip tokenizers: char codes, zero padded."""
    out = torch.zeros(len(texts), CTX, dtype=torch.long)
    for i, t in enumerate(texts):
        codes = [ord(c) for c in t[:CTX]]
        out[i, : len(codes)] = torch.tensor(codes)
    return out


def decode(tokens: torch.Tensor) -> str:
    return "".join(chr(int(c)) for c in tokens if int(c))


def transform(img: Image.Image) -> torch.Tensor:
    """PIL -> FloatTensor[3, 8, 8] in [0, 1], a stand-in for a model's preprocess."""
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255


def make_png(path: Path, color=(255, 0, 0), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (10, 10), color).save(path)
    return path


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    """tmp/imgs/{a,b,c}.png with three colours. (No 'train'/'test'/'val' in names: datasets would
    read them as split markers.)"""
    for name, color in (("a", (255, 0, 0)), ("b", (0, 255, 0)), ("c", (0, 0, 255))):
        make_png(tmp_path / "imgs" / f"{name}.png", color)
    return tmp_path


ROWS = [
    {"image": "imgs/a.png", "caption": ["a red square", "red"], "label": 0},
    {"image": "imgs/b.png", "caption": ["a green square"], "label": 1},
    {"image": "imgs/c.png", "caption": ["a blue square", "blue", "azure"], "label": 2},
]


def write_table(folder: Path, fmt: str) -> Path:
    path = folder / f"pairs.{fmt}"
    df = pd.DataFrame(ROWS)
    if fmt in ("csv", "tsv", "tab"):
        df["caption"] = [json.dumps(c) for c in df["caption"]]  # a CSV cell holds a JSON list
        df.to_csv(path, sep="," if fmt == "csv" else "\t", index=False)
    elif fmt in ("jsonl", "json"):
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path)
    return path


# ----------------------------------------------------------------------------- tables


@pytest.mark.parametrize("fmt", ["csv", "tsv", "tab", "jsonl", "json", "parquet"])
def test_table_formats_relative_paths_and_multi_captions(images: Path, fmt: str):
    path = write_table(images, fmt)
    corpus = open_corpus(path)
    assert isinstance(corpus, TableCorpus) and len(corpus) == 3 and corpus.skipped == []
    row = corpus[2]
    assert row.image == str((images / "imgs" / "c.png").resolve())
    assert row.captions == ["a blue square", "blue", "azure"]
    assert row.extras == {"label": 2}
    assert row.source == f"{path}:row 3"
    assert corpus[-1].source == row.source


def test_caption_columns_as_list_root_and_absolute_paths(images: Path, tmp_path: Path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    path = other / "pairs.csv"
    pd.DataFrame({
        "file": ["imgs/a.png", str(images / "imgs" / "b.png")],
        "cap1": ["first a", "first b"],
        "cap2": ["second a", ""],
        "group": ["x", "y"],
    }).to_csv(path, index=False)
    corpus = TableCorpus(path, image_column="file", caption_column=["cap1", "cap2"], root=images)
    assert corpus[0].image == str((images / "imgs" / "a.png").resolve())
    assert corpus[1].image == str(images / "imgs" / "b.png")  # absolute: kept as is
    assert corpus[0].captions == ["first a", "second a"]
    assert corpus[1].captions == ["first b"]  # the empty second caption is not a caption
    assert corpus[0].extras == {"group": "x"}
    assert TableCorpus(path, image_column="file", caption_column="cap1", root=images,
                       extra_columns=[])[0].extras == {}


def test_json_array_of_records(images: Path):
    path = images / "pairs.json"
    path.write_text(json.dumps(ROWS))
    corpus = open_corpus(path)
    assert [r.captions for r in corpus] == [r["caption"] for r in ROWS]
    assert corpus[1].image == str((images / "imgs" / "b.png").resolve())


def test_captions_that_look_like_missing_values_stay_text(images: Path):
    path = images / "pairs.csv"
    pd.DataFrame({"image": ["imgs/a.png", "imgs/b.png"], "caption": ["NA", "None"]}).to_csv(path, index=False)
    assert [r.captions for r in open_corpus(path)] == [["NA"], ["None"]]


def test_missing_column_message_is_exact(images: Path):
    path = write_table(images, "csv")
    with pytest.raises(ValueError) as e:
        TableCorpus(path, image_column="img")
    assert str(e.value) == (
        f"{path}: no column 'img'; columns are ['image', 'caption', 'label'] "
        "(did you mean 'image'? set image_column=...)"
    )
    with pytest.raises(ValueError) as e:
        TableCorpus(path, caption_column="text")
    assert str(e.value) == (
        f"{path}: no column 'text'; columns are ['image', 'caption', 'label'] (set caption_column=...)"
    )
    with pytest.raises(ValueError, match=r"no column 'Label'.*did you mean 'label'\? set extra_columns"):
        TableCorpus(path, extra_columns=["Label"])


def test_unsupported_extension_and_missing_file(tmp_path: Path):
    (tmp_path / "pairs.xlsx").write_bytes(b"")
    with pytest.raises(ValueError, match=r"pairs.xlsx: unsupported table format '.xlsx'; use one of"):
        open_corpus(tmp_path / "pairs.xlsx")
    with pytest.raises(FileNotFoundError, match="nope.csv: no such file"):
        open_corpus(tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError, match="write hf:nope"):
        open_corpus("nope")


def test_missing_images_and_empty_captions_are_dropped_counted_and_logged_once(images: Path, caplog):
    path = images / "pairs.csv"
    pd.DataFrame({
        "image": ["imgs/a.png", "imgs/gone.png", "imgs/b.png", "imgs/c.png", "imgs/gone2.png"],
        "caption": ["a", "lost", "  ", "c", "lost too"],
    }).to_csv(path, index=False)
    with caplog.at_level(logging.WARNING, logger="vlpretrain.data.corpus"):
        corpus = TableCorpus(path)
    assert [r.captions for r in corpus] == [["a"], ["c"]]
    assert [r.source for r in corpus] == [f"{path}:row 1", f"{path}:row 4"]
    assert corpus.skipped == [
        (f"{path}:row 2", "image file missing"),
        (f"{path}:row 5", "image file missing"),
        (f"{path}:row 3", "empty caption"),
    ]
    missing_logs = [r.getMessage() for r in caplog.records if "image file missing" in r.getMessage()]
    assert missing_logs == [f"{path}: dropped 2 of 5 rows (image file missing), e.g. {path}:row 2, {path}:row 5"]


# ----------------------------------------------------------------------------- images


def test_rgba_is_composited_on_white(tmp_path: Path):
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    img.putpixel((0, 0), (255, 0, 0, 255))
    img.putpixel((1, 0), (0, 0, 255, 128))
    path = tmp_path / "emoji.png"
    img.save(path)
    for source in (path, str(path), path.read_bytes(), Image.open(path)):
        rgb = load_rgb(source)
        assert rgb.mode == "RGB"
        assert rgb.getpixel((3, 3)) == (255, 255, 255)
        assert rgb.getpixel((0, 0)) == (255, 0, 0)
        assert rgb.getpixel((1, 0)) == (127, 127, 255)  # half blue over white
    la = Image.new("LA", (2, 2), (0, 0))
    assert load_rgb(la).getpixel((0, 0)) == (255, 255, 255)
    p = Image.new("P", (2, 2), 0)
    p.putpalette([0, 0, 0] * 256)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png")
    assert load_rgb(tmp_path / "p.png").getpixel((1, 1)) == (255, 255, 255)
    assert load_rgb(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_bad_images_raise_bad_image_error_with_reason(tmp_path: Path):
    (tmp_path / "garbage.png").write_bytes(b"this is not a png at all")
    with pytest.raises(BadImageError, match="garbage.png: not a readable image"):
        load_rgb(tmp_path / "garbage.png")
    with pytest.raises(BadImageError, match="gone.png: file not found"):
        load_rgb(tmp_path / "gone.png")
    noise = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    noise.save(tmp_path / "noise.png")
    data = (tmp_path / "noise.png").read_bytes()
    with pytest.raises(BadImageError, match=r"\d+ bytes: cannot decode image"):
        load_rgb(data[: len(data) // 2])  # truncated: the header reads, the pixels do not


# ----------------------------------------------------------------------------- dataset


def corrupt_corpus(folder: Path, n_good: int = 5, bad: tuple[int, ...] = (1, 2)) -> TableCorpus:
    names = []
    for i in range(n_good + len(bad)):
        p = folder / "imgs" / f"{i}.png"
        if i in bad:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"\x89PNG garbage")
        else:
            make_png(p, (i * 30, 0, 0))
        names.append(f"imgs/{i}.png")
    path = folder / "pairs.csv"
    pd.DataFrame({"image": names, "caption": [f"pic {i}" for i in range(len(names))]}).to_csv(path, index=False)
    return TableCorpus(path)


def test_corrupt_image_is_skipped_with_its_source_and_batch_stays_full(tmp_path: Path):
    corpus = corrupt_corpus(tmp_path)
    ds = ImageTextDataset(corpus, transform, fake_tokenizer, caption_choice="first")
    sample = ds[1]
    assert sample["index"] == 3 and decode(sample["tokens"]) == "pic 3"
    assert [s for s, _ in sample["skipped"]] == [f"{corpus.path}:row 2", f"{corpus.path}:row 3"]
    assert "not a readable image" in sample["skipped"][0][1]
    loader = DataLoader(ds, batch_size=len(ds), collate_fn=collate_image_text)
    batch = next(iter(loader))
    assert batch["image"].shape == (7, 3, 8, 8)
    assert batch["tokens"].shape == (7, CTX) and batch["tokens"].dtype == torch.long
    assert batch["index"].tolist() == [0, 3, 3, 3, 4, 5, 6]
    assert len(batch["skipped"]) == 3  # index 1 met rows 2, 3; index 2 met row 3


def test_all_bad_images_raise_runtime_error_naming_the_corpus(tmp_path: Path):
    corpus = corrupt_corpus(tmp_path, n_good=0, bad=(0, 1, 2))
    ds = ImageTextDataset(corpus, transform, fake_tokenizer)
    with pytest.raises(RuntimeError, match=r"pairs.csv: 3 images in a row failed to load"):
        ds[0]


def test_caption_choice_random_is_reproducible_and_varies_with_epoch(images: Path):
    corpus = open_corpus(write_table(images, "jsonl"))

    def captions(epoch: int, seed: int = 0) -> list[str]:
        ds = ImageTextDataset(corpus, transform, fake_tokenizer, caption_choice="random", seed=seed)
        ds.set_epoch(epoch)
        return [decode(ds[2]["tokens"]) for _ in range(2)]

    runs = {e: captions(e) for e in range(12)}
    assert all(a == b for a, b in runs.values())  # same (seed, epoch, index): same caption
    assert runs == {e: captions(e) for e in range(12)}  # and again from a fresh dataset
    assert {r[0] for r in runs.values()} == {"a blue s", "blue", "azure"}  # all get chosen
    first = ImageTextDataset(corpus, transform, fake_tokenizer, caption_choice="first")
    assert decode(first[2]["tokens"]) == "a blue s"


def test_caption_choice_all_collates_every_caption_with_its_image(images: Path):
    corpus = open_corpus(write_table(images, "parquet"))
    ds = ImageTextDataset(corpus, transform, fake_tokenizer, caption_choice="all")
    batch = collate_image_text([ds[i] for i in range(3)])
    assert batch["tokens"].shape == (6, CTX)
    assert batch["text_image_index"].tolist() == [0, 0, 1, 2, 2, 2]
    assert batch["image"][0, 0, 0, 0] == 1.0 and batch["image"][1, 1, 0, 0] == 1.0


def test_dataset_in_worker_processes(images: Path):
    corpus = open_corpus(write_table(images, "csv"))
    ds = ImageTextDataset(corpus, transform, fake_tokenizer, caption_choice="first")
    loader = DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate_image_text)
    batches = list(loader)
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2]]


def test_epoch_permutation_sampler_depends_only_on_seed_and_epoch():
    s = EpochPermutationSampler(50, seed=3)
    orders = []
    for epoch in range(3):
        s.set_epoch(epoch)
        orders.append(list(s))
    assert all(sorted(o) == list(range(50)) for o in orders)
    assert orders[0] != orders[1] != orders[2]
    resumed = EpochPermutationSampler(50, seed=3)
    resumed.set_epoch(2)
    assert list(resumed) == orders[2] == list(EpochPermutationSampler(50, seed=3, epoch=2))
    assert list(EpochPermutationSampler(50, seed=4)) != orders[0]
    assert list(EpochPermutationSampler(50, seed=1, epoch=0)) != list(EpochPermutationSampler(50, seed=0, epoch=1))
    assert len(s) == 50


# ----------------------------------------------------------------------------- HF datasets


def test_hf_imagefolder_with_metadata(images: Path):
    with open(images / "imgs" / "metadata.jsonl", "w") as f:
        for r in ROWS:
            f.write(json.dumps({"file_name": Path(r["image"]).name, "text": r["caption"], "label": r["label"]}) + "\n")
    corpus = open_corpus(images / "imgs", caption_column="text")
    assert isinstance(corpus, HFDatasetCorpus) and len(corpus) == 3
    rows = sorted(corpus, key=lambda r: r.extras["label"])
    assert rows[2].captions == ["a blue square", "blue", "azure"]
    assert load_rgb(rows[2].image).getpixel((0, 0)) == (0, 0, 255)
    assert rows[0].source.startswith(f"hf:{images / 'imgs'}[train]#")
    with pytest.raises(ValueError, match=r"no column 'caption'; columns are \['image', 'text', 'label'\] "
                                         r"\(set caption_column=...\)"):
        open_corpus(images / "imgs")


def test_hf_save_to_disk_round_trip_and_split_choice(images: Path, tmp_path: Path):
    import datasets

    features = datasets.Features({
        "image": datasets.Image(),
        "caption": datasets.Sequence(datasets.Value("string")),
        "label": datasets.Value("int64"),
    })
    ds = datasets.Dataset.from_dict(
        {"image": [str(images / r["image"]) for r in ROWS], "caption": [r["caption"] for r in ROWS],
         "label": [r["label"] for r in ROWS]},
        features=features,
    )
    ds.save_to_disk(str(tmp_path / "single"))
    corpus = open_corpus(tmp_path / "single")
    assert [r.captions for r in corpus] == [r["caption"] for r in ROWS]
    assert [r.extras for r in corpus] == [{"label": 0}, {"label": 1}, {"label": 2}]
    assert isinstance(corpus[0].image, bytes)  # embedded by save_to_disk, decoded by load_rgb
    assert load_rgb(corpus[1].image).getpixel((0, 0)) == (0, 255, 0)

    datasets.DatasetDict({"train": ds, "validation": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert len(open_corpus(tmp_path / "dict")) == 3
    val = open_corpus(tmp_path / "dict", split="validation")
    assert len(val) == 1 and val[0].source == f"hf:{tmp_path / 'dict'}[validation]#0"
    with pytest.raises(ValueError, match=r"no split 'test'; available splits are \['train', 'validation'\]"):
        open_corpus(tmp_path / "dict", split="test")


def test_folder_of_split_tables(images: Path):
    path = write_table(images, "csv")
    path.rename(images / "val.csv")
    assert len(open_corpus(images, split="val")) == 3
    with pytest.raises(ValueError, match=r"not a corpus folder.*train.csv"):
        open_corpus(images)
