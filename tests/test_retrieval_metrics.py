"""Exact chunked retrieval recall equals a naive full-matrix computation."""

import torch

from vlpretrain.evaluation.retrieval import retrieval_metrics


def naive(images, texts, owner, k):
    scores = texts @ images.T  # text queries
    topk = scores.topk(k, dim=1).indices
    image_recall = (topk == owner[:, None]).any(1).float().mean().item()
    scores = images @ texts.T  # image queries: any of its captions in the top k
    topk = scores.topk(k, dim=1).indices
    hits = [(owner[topk[i]] == i).any().item() for i in range(len(images))]
    return image_recall, sum(hits) / len(hits)


def test_matches_naive_reference_with_several_captions_per_image():
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(57, 12), dim=-1)
    owner = torch.randint(0, 57, (140,))
    owner[:57] = torch.arange(57)  # every image has at least one caption
    texts = torch.nn.functional.normalize(images[owner] + 0.8 * torch.randn(140, 12), dim=-1)
    metrics = retrieval_metrics(images, texts, owner, ks=(1, 5, 10), chunk_size=16)
    for k in (1, 5, 10):
        image_recall, text_recall = naive(images, texts, owner, k)
        assert abs(metrics[f"image_retrieval_recall@{k}"] - image_recall) < 1e-6
        assert abs(metrics[f"text_retrieval_recall@{k}"] - text_recall) < 1e-6


def test_collapsed_embeddings_score_chance_not_perfect():
    same = torch.nn.functional.normalize(torch.ones(20, 4), dim=-1)
    metrics = retrieval_metrics(same, same)
    assert metrics["image_retrieval_recall@1"] == 0.0 and metrics["image_retrieval_mean_rank"] == 20
