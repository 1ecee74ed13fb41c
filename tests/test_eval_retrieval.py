"""`vlp eval retrieval` and the retrieval metrics it reports, against a naive full-matrix reference and
against CLIP_benchmark's definition (test_retrieval_metrics.py covers recall@k with random captions per
image and the collapsed-model case; here: 1-3 captions per image, ranks, ties, the CLI)."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlpretrain.cli.main import main
from vlpretrain.evaluation.retrieval import retrieval_metrics
from vlpretrain.evaluation.tasks import evaluate_retrieval
from vlpretrain.models import load_model

from helpers import vlp, write_image_csv

KS = (1, 5, 10)
CLIP_BENCHMARK_KEYS = {"dataset", "model", "pretrained", "task", "metrics", "language"}


def owners_with_1_to_3_captions(num_images: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 4, (num_images,), generator=g)
    assert set(counts.tolist()) == {1, 2, 3}
    return torch.repeat_interleave(torch.arange(num_images), counts)


def naive_metrics(images: torch.Tensor, texts: torch.Tensor, owner: torch.Tensor) -> dict[str, float]:
    """Full score matrix, full sort: 1-based rank of the positive (best-placed caption for an image).
    Only valid without ties (the sort order of tied scores is arbitrary)."""
    scores = texts @ images.T
    text_ranks = [int((scores[j].argsort(descending=True) == owner[j]).nonzero()) + 1 for j in range(len(texts))]
    image_ranks = []
    for i in range(len(images)):
        order = scores[:, i].argsort(descending=True)
        image_ranks.append(min(int((order == j).nonzero()) + 1 for j in (owner == i).nonzero().flatten().tolist()))
    out = {}
    for k in KS:
        out[f"image_retrieval_recall@{k}"] = sum(r <= k for r in text_ranks) / len(text_ranks)
        out[f"text_retrieval_recall@{k}"] = sum(r <= k for r in image_ranks) / len(image_ranks)
        out[f"chance_image_retrieval_recall@{k}"] = min(1.0, k / len(images))
    out["image_retrieval_mean_rank"] = statistics.mean(text_ranks)
    out["text_retrieval_mean_rank"] = statistics.mean(image_ranks)
    # torch.median's convention: the lower of the two middle ranks for an even count, so ranks stay whole.
    out["image_retrieval_median_rank"] = statistics.median_low(text_ranks)
    out["text_retrieval_median_rank"] = statistics.median_low(image_ranks)
    out["num_images"], out["num_texts"] = len(images), len(texts)
    return out


@pytest.mark.parametrize("num_images, chunk_size", [(41, 7), (40, 1024)])  # odd and even query counts
def test_metrics_equal_naive_full_matrix_with_1_to_3_captions_per_image(num_images, chunk_size):
    torch.manual_seed(num_images)
    owner = owners_with_1_to_3_captions(num_images, seed=num_images)
    images = F.normalize(torch.randn(num_images, 12), dim=-1)
    texts = F.normalize(images[owner] + 0.9 * torch.randn(len(owner), 12), dim=-1)
    got = retrieval_metrics(images, texts, owner, ks=KS, chunk_size=chunk_size)
    want = naive_metrics(images, texts, owner)
    assert 0 < want["image_retrieval_recall@1"] < want["image_retrieval_recall@10"] < 1  # not trivially 0 or 1
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


# --- CLIP_benchmark's zero-shot retrieval metric, as clip_benchmark/metrics/zeroshot_retrieval.py computes it:
# recall_at_k over the full (texts x images) score matrix and a boolean positive-pair matrix, batched over
# queries; a query counts as found when recall_at_k > 0, i.e. any positive is among the top k.

def cb_recall_at_k(scores: torch.Tensor, positive_pairs: torch.Tensor, k: int) -> torch.Tensor:
    nb_queries, nb_candidates = scores.shape
    topk_indices = torch.topk(scores, k, dim=1)[1]
    nb_positive = positive_pairs.sum(dim=1)
    topk_onehot = F.one_hot(topk_indices, num_classes=nb_candidates)
    nb_true_positive = (topk_onehot * positive_pairs.view(nb_queries, 1, nb_candidates)).sum(dim=(1, 2))
    return nb_true_positive / nb_positive  # 0/0 = nan for a query without positives: never counted as found


def cb_batchify(func, X, Y, batch_size, *args, **kwargs) -> torch.Tensor:
    return torch.cat([func(X[s:s + batch_size], Y[s:s + batch_size], *args, **kwargs)
                      for s in range(0, len(X), batch_size)])


def cb_matrices(images, texts, texts_image_index, tie_shift=0.0):
    """Score and positive-pair matrices (texts x images). ``tie_shift`` is added to positive scores:
    -0.5 / +0.5 on integer scores breaks every tie against / in favour of the positive."""
    scores = texts @ images.T
    positive_pairs = torch.zeros_like(scores, dtype=torch.bool)
    positive_pairs[torch.arange(len(scores)), texts_image_index] = True
    return scores + tie_shift * positive_pairs, positive_pairs


def cb_found(images, texts, texts_image_index, k, batch_size=5, tie_shift=0.0):
    """Per-query found flags: (text queries, image queries)."""
    scores, positive_pairs = cb_matrices(images, texts, texts_image_index, tie_shift)
    text_found = cb_batchify(cb_recall_at_k, scores, positive_pairs, batch_size, k=k) > 0
    image_found = cb_batchify(cb_recall_at_k, scores.T, positive_pairs.T, batch_size, k=k) > 0
    return text_found, image_found


def cb_ranks(images, texts, texts_image_index, tie_shift):
    """Rank = the smallest k at which CLIP_benchmark finds the query (candidates + 1 if never)."""
    scores, positive_pairs = cb_matrices(images, texts, texts_image_index, tie_shift)
    ranks = []
    for s, p in ((scores, positive_pairs), (scores.T, positive_pairs.T)):
        candidates = s.shape[1]
        found = torch.stack([cb_batchify(cb_recall_at_k, s, p, 5, k=k) > 0 for k in range(1, candidates + 1)])
        first = found.float().argmax(0) + 1
        ranks.append(torch.where(found.any(0), first, torch.tensor(candidates + 1)))
    return ranks


@pytest.fixture
def tied_data():
    """Integer features in {-1, 0, 1}: scores are small integers, so ties are everywhere and exact in float32.
    Images 0-29 have 1-3 captions each; image 30 has none (CLIP_benchmark: nan recall, never found)."""
    g = torch.Generator().manual_seed(3)
    owner = owners_with_1_to_3_captions(30, seed=3)
    images = torch.randint(-1, 2, (31, 4), generator=g).float()
    texts = (images[owner] + torch.randint(-1, 2, (len(owner), 4), generator=g)).clamp(-1, 1)
    return images, texts, owner


def test_ties_count_against_the_positive_as_clip_benchmark_with_worst_case_tie_order(tied_data):
    images, texts, owner = tied_data
    scores = texts @ images.T
    assert (scores == scores[:, :1]).sum() > len(texts)  # many ties, not just the diagonal
    got = retrieval_metrics(images, texts, owner, ks=KS, chunk_size=7)
    for k in KS:
        text_found, image_found = cb_found(images, texts, owner, k, tie_shift=-0.5)
        assert got[f"image_retrieval_recall@{k}"] == pytest.approx(text_found.float().mean().item(), abs=1e-6)
        assert got[f"text_retrieval_recall@{k}"] == pytest.approx(image_found.float().mean().item(), abs=1e-6)
        # Whatever order torch.topk gives tied scores, CLIP_benchmark lands between worst and best case.
        plain = [f.float().mean().item() for f in cb_found(images, texts, owner, k)]
        best = [f.float().mean().item() for f in cb_found(images, texts, owner, k, tie_shift=0.5)]
        assert got[f"image_retrieval_recall@{k}"] <= plain[0] + 1e-6 and plain[0] <= best[0] + 1e-6
        assert got[f"text_retrieval_recall@{k}"] <= plain[1] + 1e-6 and plain[1] <= best[1] + 1e-6
    assert any(cb_found(images, texts, owner, 1, tie_shift=0.5)[0] != cb_found(images, texts, owner, 1, tie_shift=-0.5)[0])


def test_mean_and_median_rank_match_clip_benchmark_first_hit(tied_data):
    images, texts, owner = tied_data
    got = retrieval_metrics(images, texts, owner, ks=KS, chunk_size=4)
    text_ranks, image_ranks = cb_ranks(images, texts, owner, tie_shift=-0.5)
    assert image_ranks[30] == len(texts) + 1  # the image without captions is never found
    assert got["image_retrieval_mean_rank"] == pytest.approx(text_ranks.float().mean().item())
    assert got["text_retrieval_mean_rank"] == pytest.approx(image_ranks.float().mean().item())
    assert got["image_retrieval_median_rank"] == statistics.median_low(text_ranks.tolist())
    assert got["text_retrieval_median_rank"] == statistics.median_low(image_ranks.tolist())


def test_matches_clip_benchmark_without_ties_several_captions():
    torch.manual_seed(5)
    owner = owners_with_1_to_3_captions(35, seed=5)
    images = F.normalize(torch.randn(35, 8), dim=-1)
    texts = F.normalize(images[owner] + 0.8 * torch.randn(len(owner), 8), dim=-1)
    got = retrieval_metrics(images, texts, owner, ks=KS, chunk_size=6)
    for k in KS:
        text_found, image_found = cb_found(images, texts, owner, k)
        assert got[f"image_retrieval_recall@{k}"] == pytest.approx(text_found.float().mean().item(), abs=1e-6)
        assert got[f"text_retrieval_recall@{k}"] == pytest.approx(image_found.float().mean().item(), abs=1e-6)


# --- the command line

def _multi_caption_csv(folder: Path) -> tuple[Path, list[str], list[list[str]]]:
    """7 images; captions from a JSON-list cell plus an optional second column: 1-3 per image."""
    write_image_csv(folder, 7)
    images, captions = [], []
    with open(folder / "multi.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "alt"])
        for i in range(7):
            main = [f"picture {i}"] + ([f"square {i} again"] if i % 2 else [])
            alt = f"alternative text {i}" if i % 3 == 0 else ""
            writer.writerow([f"images/img{i}.png", json.dumps(main), alt])
            images.append(str(folder / "images" / f"img{i}.png"))
            captions.append(main + ([alt] if alt else []))
    return folder / "multi.csv", images, captions


@pytest.mark.slow
def test_cli_end_to_end_writes_clip_benchmark_json(tmp_path, checkpoint):
    table, image_paths, captions = _multi_caption_csv(tmp_path)
    assert sorted({len(c) for c in captions}) == [1, 2, 3]
    out = tmp_path / "results" / "retrieval.json"
    proc = vlp("eval", "retrieval", "--model", str(checkpoint), "--data", str(table), "--caption-column", "caption,alt",
               "--batch-size", "64", "--output", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report) == CLIP_BENCHMARK_KEYS | {"precision"} and report["precision"] == "fp32"  # ours, stated
    assert (report["dataset"], report["model"], report["pretrained"], report["task"], report["language"]) == (
        "multi", str(checkpoint), "", "zeroshot_retrieval", "en")

    # Reference: the model itself on every image and every caption, then the naive full-matrix metrics.
    model = load_model(checkpoint).eval()
    flat = [c for row in captions for c in row]
    owner = torch.tensor([i for i, row in enumerate(captions) for _ in row])
    with torch.no_grad():
        images = model.encode_image(torch.stack([model.preprocess(Image.open(p).convert("RGB")) for p in image_paths]))
        texts = model.encode_text(model.tokenizer(flat))
    want = naive_metrics(images.float(), texts.float(), owner)
    m = report["metrics"]
    for key, value in want.items():
        assert m[key] == pytest.approx(value, abs=1e-6), key
    assert (m["num_images"], m["num_texts"], m["bad_images"]) == (7, len(flat), 0)
    assert m["chance_text_retrieval_recall@1"] == pytest.approx(1 / 7)
    summary = proc.stdout.splitlines()[0]
    r = lambda key: "/".join(f"{100 * m[f'{key}@{k}']:.1f}" for k in KS)
    assert summary == (
        f"zeroshot_retrieval on multi (7 images, {len(flat)} captions): "
        f"text->image R@1/5/10 {r('image_retrieval_recall')}% (chance {r('chance_image_retrieval_recall')}%), "
        f"image->text R@1/5/10 {r('text_retrieval_recall')}% (chance {r('chance_text_retrieval_recall')}%), "
        f"median rank {m['image_retrieval_median_rank']:g} / {m['text_retrieval_median_rank']:g}")
    assert proc.stdout.splitlines()[1] == f"written: {out}"


def test_rerank_itm_needs_an_itm_head(tmp_path, checkpoint, capsys):
    table = write_image_csv(tmp_path, 3)
    code = main(["eval", "retrieval", "--model", str(checkpoint), "--data", str(table), "--rerank-itm", "20",
                 "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err == "vlp eval: error: --rerank-itm needs a model with an ITM fusion head; this model has none\n"
    assert captured.out == ""


def test_evaluate_retrieval_checks_rerank_before_encoding(checkpoint):
    class Unreadable:
        name = "unreadable"

        def __len__(self):
            return 2

        def __getitem__(self, index):
            raise AssertionError("the corpus must not be read when the model cannot re-rank")

    with pytest.raises(ValueError, match=r"^--rerank-itm needs a model with an ITM fusion head; this model has none$"):
        evaluate_retrieval(load_model(checkpoint), Unreadable(), rerank_itm=5)
