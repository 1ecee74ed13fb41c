"""Fusion heads (ALBEF / FLAVA): token features of every tower kind, the training forward with ITM and
MLM outputs, the mask token, ITM scores, re-ranking (evaluation, index, CLI) and a short training run."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from PIL import Image
from torch import nn

from helpers import read_metrics, spawn_gloo, tiny_model_config, tiny_recipe, write_image_csv
from vlpretrain import load_model
from vlpretrain.config import DataConfig, ModelConfig
from vlpretrain.distributed import get_rank
from vlpretrain.losses import create_loss
from vlpretrain.models.fusion_sampling import mask_tokens
from vlpretrain.models import build_model
from vlpretrain.models.dual_encoder import ITM_MISSING
from vlpretrain.models.fusion import SAMPLING_SEED, fusion_settings
from vlpretrain.models.tower_tokens import image_features_and_tokens, text_features_and_tokens

CAPTIONS = ["a red heart", "grinning face", "a frog on a log", "a blue square", "cat with wry smile", "flag: france"]
PLAIN_KEYS = {"image_features", "text_features", "logit_scale"}
FUSION_KEYS = PLAIN_KEYS | {"itm_logits", "itm_labels", "mlm_logits", "mlm_labels"}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(tiny_model_config(fusion={"layers": 1}))


@pytest.fixture(scope="module")
def timm_hf():
    cfg = ModelConfig(arch="ViT-B-32", embed_dim=24, image_tower="timm:resnet10t", text_tower="hf:minilm-l6",
                      vision={"image_size": 64}, text={"context_length": 16}, fusion={"layers": 1, "width": 64})
    return build_model(cfg)


def _batch(model, n: int = 4, size: int = 32):
    torch.manual_seed(1)
    return torch.randn(n, 3, size, size), model.tokenizer(CAPTIONS[:n])


# ----------------------------------------------------------------------------- token features


def test_open_clip_vit_and_text_tokens(tiny):
    images, tokens = _batch(tiny)
    with torch.no_grad():
        image_tokens = tiny.encode_image_tokens(images)
        hidden, padding = tiny.encode_text_tokens(tokens)
        pooled_image, _ = image_features_and_tokens(tiny.clip, images)
        pooled_text, _, _ = text_features_and_tokens(tiny.clip, tokens)
        raw_image, raw_text = tiny.encode_image(images, normalize=False), tiny.encode_text(tokens, normalize=False)
    assert image_tokens.shape == (4, 1 + (32 // 8) ** 2, 32)  # class token + 4x4 patches, ViT width
    assert hidden.shape == (4, 16, 32) and padding.dtype == torch.bool
    assert torch.equal(padding, tokens == 0)
    # The same pass gives the towers' own pooled features; the class token is the ViT's pooled one.
    assert torch.allclose(pooled_image, raw_image, atol=1e-6) and torch.allclose(pooled_text, raw_text, atol=1e-6)
    assert torch.allclose(image_tokens[:, 0] @ tiny.clip.visual.proj, raw_image, atol=1e-5)


def test_timm_cnn_and_hugging_face_text_tokens(timm_hf):
    assert timm_hf.fusion.settings.summary_token == "first"  # a bidirectional BERT-style tower
    images, tokens = _batch(timm_hf, size=64)
    with torch.no_grad():
        image_tokens = timm_hf.encode_image_tokens(images)
        hidden, padding = timm_hf.encode_text_tokens(tokens)
        pooled_image, _ = image_features_and_tokens(timm_hf.clip, images)
        pooled_text, _, _ = text_features_and_tokens(timm_hf.clip, tokens)
        assert torch.allclose(pooled_image, timm_hf.encode_image(images, normalize=False), atol=1e-5)
        assert torch.allclose(pooled_text, timm_hf.encode_text(tokens, normalize=False), atol=1e-5)
    assert image_tokens.shape == (4, 2 * 2, 512)  # resnet10t: 64 px / stride 32 = a 2x2 map of 512 channels
    assert hidden.shape == (4, 16, 384)  # MiniLM width
    assert torch.equal(padding, tokens == 0)  # BERT's [PAD] is 0
    tokenizer = timm_hf.tokenizer.tokenizer
    assert timm_hf.mask_token_id == tokenizer.mask_token_id == 103
    assert {0, 101, 102, 103} <= timm_hf.special_token_ids and timm_hf.vocab_size == 30522
    assert timm_hf.fusion.encoder.text_proj.in_features == 384 and timm_hf.fusion.encoder.image_proj.in_features == 512
    timm_hf.train()
    out = timm_hf(images, tokens)
    assert set(out) == FUSION_KEYS and out["mlm_logits"].shape[1] == 30522


# ----------------------------------------------------------------------------- forward


def test_forward_with_fusion_returns_itm_and_mlm(tiny):
    images, tokens = _batch(tiny)
    tiny.train()
    out = tiny(images, tokens, image_ids=torch.arange(4))
    assert set(out) == FUSION_KEYS
    assert out["itm_logits"].shape == (12, 2)
    assert out["itm_labels"].tolist() == [1] * 4 + [0] * 8 and out["itm_labels"].dtype == torch.long
    chosen = out["mlm_labels"].shape[0]
    assert out["mlm_logits"].shape == (chosen, tiny.vocab_size) and out["mlm_labels"].dtype == torch.long
    losses = create_loss("albef")(**out)
    sum(v for k, v in losses.items() if k.endswith("_loss")).backward()
    assert all(p.grad is not None for p in tiny.fusion.parameters() if p.requires_grad)
    tiny.zero_grad()
    tiny.eval()
    with torch.no_grad():
        plain = tiny(images, tokens)
        assert set(plain) == PLAIN_KEYS
        assert torch.allclose(plain["image_features"], out["image_features"].detach(), atol=1e-5)


def test_forward_without_fusion_is_unchanged():
    model = build_model(tiny_model_config()).train()
    assert model.fusion is None and not model.has_itm and model.mask_token_id is None
    images, tokens = _batch(model)
    assert set(model(images, tokens)) == PLAIN_KEYS
    assert not any(name.startswith("fusion.") for name in model.state_dict())
    assert model.clip.token_embedding.num_embeddings == 49408


def test_pairs_without_allowed_negatives_are_left_out(tiny):
    images, tokens = _batch(tiny)
    tiny.train()
    # Every pair shows the same image: no negative is allowed anywhere.
    out = tiny(images, tokens, image_ids=torch.zeros(4, dtype=torch.long))
    assert out["itm_labels"].tolist() == [1, 1, 1, 1]
    # Identical captions of distinct images are not negatives of each other either.
    same = tiny.tokenizer(["a red heart"] * 4)
    out = tiny(images, same, image_ids=torch.arange(4))
    assert out["itm_labels"].tolist() == [1, 1, 1, 1]
    # Images 0 and 1 are one picture: each of them has 2 allowed negatives (of 3 others), 2 and 3 have 2.
    out = tiny(images, tokens, image_ids=torch.tensor([0, 0, 1, 2]))
    assert out["itm_labels"].tolist() == [1] * 4 + [0] * 8


def test_global_random_negatives_in_one_process():
    model = build_model(tiny_model_config(fusion={"layers": 1, "negatives_from": "global", "negatives": "random"}))
    images, tokens = _batch(model)
    model.train()
    out = model(images, tokens)
    assert out["itm_logits"].shape == (12, 2) and int(model.fusion.step) == 1


def test_mask_token_and_mlm_labels_only_at_masked_positions(tiny):
    tokenizer = tiny.tokenizer
    assert tokenizer.encoder["<mask>"] == tiny.mask_token_id == 49408
    assert tiny.vocab_size == 49409 == tiny.clip.token_embedding.num_embeddings
    assert tiny.special_token_ids == {0, 49406, 49407, 49408}
    # Ordinary text tokenizes as before the mask token was added.
    from open_clip.tokenizer import SimpleTokenizer

    assert torch.equal(tokenizer(CAPTIONS), SimpleTokenizer(context_length=16)(CAPTIONS))

    images = torch.randn(6, 3, 32, 32)
    tokens = tokenizer(CAPTIONS)
    tiny.train()
    step = int(tiny.fusion.step)
    out = tiny(images, tokens, image_ids=torch.arange(6))
    # The forward masks with a generator seeded from its step counter: reproduce its draw.
    # Local negatives consume the same (per-rank) generator first.
    generator = torch.Generator().manual_seed(SAMPLING_SEED + step + 1_000_003 * (get_rank() + 1))
    from vlpretrain.models.fusion_sampling import caption_keys, negative_pairs

    negative_pairs(out["image_features"], out["text_features"], out["logit_scale"], torch.arange(6),
                   caption_keys(tokens), generator=generator)
    _, labels = mask_tokens(tokens, tiny.mask_token_id, tiny.special_token_ids, tiny.vocab_size, 0.15,
                            generator=generator)
    chosen = labels != -100
    assert torch.equal(out["mlm_labels"], labels[chosen]) and torch.equal(out["mlm_labels"], tokens[chosen])
    specials = torch.tensor(sorted(tiny.special_token_ids))
    assert not torch.isin(tokens[chosen], specials).any()  # pad / sot / eot never predicted


def test_mlm_off_keeps_the_vocabulary():
    model = build_model(tiny_model_config(fusion={"layers": 1, "mlm": False}))
    assert model.mask_token_id is None and model.vocab_size == 49408 and model.fusion.mlm_head is None
    model.train()
    images, tokens = _batch(model)
    assert set(model(images, tokens)) == PLAIN_KEYS | {"itm_logits", "itm_labels"}


def test_itm_scores(tiny):
    images, tokens = _batch(tiny)
    tiny.eval()
    with torch.no_grad():
        scores = tiny.itm_scores(images, tokens)
        same = tiny.itm_scores(tiny.encode_image_tokens(images), tokens)
    assert scores.shape == (4,) and ((scores > 0) & (scores < 1)).all()
    assert torch.allclose(scores, same)
    with pytest.raises(ValueError, match=r"^itm_scores: 4 images but 2 captions; pass aligned pairs"):
        tiny.itm_scores(images, tokens[:2])
    with pytest.raises(ValueError, match=f"^{re.escape(ITM_MISSING)}$"):
        build_model(tiny_model_config()).itm_scores(images, tokens)


def test_itm_reads_the_last_text_position_when_asked():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(fusion={"layers": 1, "summary_token": "last"})).eval()
    images, tokens = _batch(model)
    with torch.no_grad():
        image_tokens = model.encode_image_tokens(images)
        hidden, padding = model.encode_text_tokens(tokens)
        fused = model.fusion.encoder(hidden, padding, image_tokens)  # untrimmed: the same values at kept positions
        last = (~padding).sum(1) - 1  # the end-of-text token of each caption
        expected = model.fusion.itm_head(fused[torch.arange(4), last]).float().softmax(-1)[:, 1]
        assert torch.allclose(model.itm_scores(image_tokens, tokens), expected, atol=1e-6)
        assert (tokens[torch.arange(4), last] == tokens.max(1).values).all()  # open_clip's EOT has the top id
    with pytest.raises(ValueError, match=r"^model\.fusion\.summary_token: 'cls' is not one of \['auto', 'first', 'last'\]$"):
        fusion_settings({"summary_token": "cls"})
    # auto: the end-of-text position for open_clip's causal text tower, [CLS] for a BERT-style one.
    assert build_model(tiny_model_config(fusion={"layers": 1})).fusion.settings.summary_token == "last"


def test_fusion_settings_errors():
    with pytest.raises(ValueError, match=r"^model\.fusion: unknown key 'layer' \(did you mean 'layers'\?\); keys: "):
        fusion_settings({"layer": 2})
    with pytest.raises(ValueError, match=r"^model\.fusion\.negatives: 'hardest' is not one of \['hard', 'random'\]$"):
        fusion_settings({"negatives": "hardest"})
    with pytest.raises(ValueError, match=r"^model\.fusion: itm and mlm are both false"):
        fusion_settings({"itm": False, "mlm": False})
    with pytest.raises(ValueError, match=r"^model\.fusion is not available with model\.hf_model"):
        build_model(ModelConfig(hf_model="openai/clip-vit-base-patch32", fusion={"layers": 1}))
    with pytest.raises(ValueError, match=r"^model\.fusion: width 30 is not divisible by heads 4"):
        build_model(tiny_model_config(fusion={"width": 30, "heads": 4}))


def test_save_and_load_keeps_fusion_heads(tmp_path, tiny):
    tiny.eval()
    folder = tiny.save_pretrained(tmp_path / "fusion-model")
    loaded = load_model(folder).eval()
    images, tokens = _batch(tiny)
    assert loaded.mask_token_id == 49408 and loaded.has_itm
    with torch.no_grad():
        assert torch.allclose(loaded.itm_scores(images, tokens), tiny.itm_scores(images, tokens), atol=1e-6)


# ----------------------------------------------------------------------------- re-ranking


class OracleITM(nn.Module):
    """Scores 1 for a matching pair: image i's tokens are filled with i, caption j's first id is its image."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def itm_scores(self, image_tokens, tokens):
        return (image_tokens[:, 0, 0].long() == tokens[:, 0]).float()


def test_reranked_metrics_with_an_oracle_head():
    from vlpretrain.evaluation.rerank import reranked_retrieval_metrics
    from vlpretrain.inference import itm_rerank
    from vlpretrain.evaluation.retrieval import retrieval_ranks

    torch.manual_seed(0)
    n, k = 30, 5
    image_features = nn.functional.normalize(torch.randn(n, 8), dim=-1)
    text_to_image = torch.arange(n).repeat_interleave(2)  # two captions per image
    text_features = nn.functional.normalize(image_features[text_to_image] + 0.9 * torch.randn(2 * n, 8), dim=-1)
    images = torch.arange(n, dtype=torch.float)[:, None, None].expand(n, 3, 4)
    texts = text_to_image[:, None].repeat(1, 5)
    metrics = reranked_retrieval_metrics(OracleITM(), images, texts, image_features, text_features, text_to_image, k,
                                         logit_scale=10.0)
    text_ranks, image_ranks = retrieval_ranks(image_features, text_features, text_to_image)
    # With a perfect head every positive within the top k moves to rank 1 (by ITM alone, and times the
    # contrastive softmax: log 0 outweighs any similarity); beyond k nothing changes.
    for prefix in ("itm_reranked_", "itm_itc_reranked_"):
        assert metrics[f"{prefix}image_retrieval_recall@1"] == pytest.approx((text_ranks < k).float().mean().item())
        assert metrics[f"{prefix}text_retrieval_recall@1"] == pytest.approx((image_ranks < k).float().mean().item())
        assert metrics[f"{prefix}image_retrieval_recall@10"] == pytest.approx((text_ranks < 10).float().mean().item())
    order, scores = itm_rerank(OracleITM(), images, texts, torch.tensor([[4, 0, 7], [1, 2, 3]]), query="text")
    assert order.tolist() == [[0, 4, 7], [1, 2, 3]] and scores.tolist() == [[1, 0, 0], [0, 0, 0]]


class HashITM(nn.Module):
    """A fixed, arbitrary match probability per (image, caption): image i's tokens hold i, caption j's tokens j."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)

    def itm_scores(self, image_tokens, tokens):
        return self.table[image_tokens[:, 0, 0].long(), tokens[:, 0]]


def naive_reranked_recall(query_features, key_features, is_positive, score, k, cutoff):
    """Per query: sort all keys by similarity, re-sort the first k by ``score(query, key, similarity)``,
    and check whether a positive lands in the first ``cutoff``; queries whose positive is beyond k keep
    the embedding order."""
    hits = []
    for q in range(len(query_features)):
        similarity = key_features @ query_features[q]
        order = sorted(range(len(key_features)), key=lambda j: -float(similarity[j]))
        head = order[:k]
        if any(is_positive(q, j) for j in head):
            head = sorted(head, key=lambda j: -score(q, j, float(similarity[j])))
        hits.append(any(is_positive(q, j) for j in (head + order[k:])[:cutoff]))
    return sum(hits) / len(hits)


def test_reranked_metrics_equal_a_naive_reranking():
    from vlpretrain.evaluation.rerank import reranked_retrieval_metrics

    torch.manual_seed(1)
    n, k, scale = 24, 6, 12.0
    image_features = nn.functional.normalize(torch.randn(n, 8), dim=-1)
    text_to_image = torch.arange(n)
    text_features = nn.functional.normalize(image_features + 1.2 * torch.randn(n, 8), dim=-1)
    probability = torch.rand(n, n) * 0.98 + 0.01  # [image, caption]
    images = torch.arange(n, dtype=torch.float)[:, None, None].expand(n, 3, 4)
    texts = torch.arange(n)[:, None].repeat(1, 5)
    metrics = reranked_retrieval_metrics(HashITM(probability), images, texts, image_features, text_features,
                                         text_to_image, k, logit_scale=scale)
    itm = {"text": lambda q, j, sim: float(probability[j, q]), "image": lambda q, j, sim: float(probability[q, j])}
    both = {"text": lambda q, j, sim: math.log(probability[j, q]) + scale * sim,
            "image": lambda q, j, sim: math.log(probability[q, j]) + scale * sim}
    for prefix, score in (("itm_reranked_", itm), ("itm_itc_reranked_", both)):
        for cutoff in (1, 5, 10):
            want_image = naive_reranked_recall(text_features, image_features, lambda q, j: j == q, score["text"], k, cutoff)
            want_text = naive_reranked_recall(image_features, text_features, lambda q, j: j == q, score["image"], k, cutoff)
            assert metrics[f"{prefix}image_retrieval_recall@{cutoff}"] == pytest.approx(want_image)
            assert metrics[f"{prefix}text_retrieval_recall@{cutoff}"] == pytest.approx(want_text)
    # A head at its prior (the same probability everywhere) leaves the ITM x ITC order = the embedding order.
    flat = reranked_retrieval_metrics(HashITM(torch.full((n, n), 0.33)), images, texts, image_features, text_features,
                                      text_to_image, k, logit_scale=scale)
    plain = {"image": naive_reranked_recall(text_features, image_features, lambda q, j: j == q,
                                            lambda q, j, sim: sim, k, 1),
             "text": naive_reranked_recall(image_features, text_features, lambda q, j: j == q,
                                           lambda q, j, sim: sim, k, 1)}
    assert flat["itm_itc_reranked_image_retrieval_recall@1"] == pytest.approx(plain["image"])
    assert flat["itm_itc_reranked_text_retrieval_recall@1"] == pytest.approx(plain["text"])


@pytest.fixture(scope="module")
def corpus_and_model(tmp_path_factory):
    from vlpretrain.data.named import open_named_corpus

    root = tmp_path_factory.mktemp("rerank")
    table = write_image_csv(root, 12)
    torch.manual_seed(0)
    model = build_model(tiny_model_config(fusion={"layers": 1})).eval()
    folder = model.save_pretrained(root / "model")
    return open_named_corpus(str(table), DataConfig(), None), model, folder, table


def test_evaluate_retrieval_with_itm_reranking(corpus_and_model, capsys):
    from vlpretrain.cli.main import main
    from vlpretrain.evaluation.tasks import evaluate_retrieval

    corpus, model, folder, table = corpus_and_model
    plain = evaluate_retrieval(model, corpus, progress=False)["metrics"]
    one = evaluate_retrieval(model, corpus, progress=False, rerank_itm=1)["metrics"]
    assert {k: one[k] for k in plain} == plain  # existing keys unchanged
    assert one["rerank_k"] == 1
    for k in (1, 5, 10):  # re-ranking one candidate changes nothing
        assert one[f"itm_reranked_image_retrieval_recall@{k}"] == plain[f"image_retrieval_recall@{k}"]
        assert one[f"itm_reranked_text_retrieval_recall@{k}"] == plain[f"text_retrieval_recall@{k}"]
    five = evaluate_retrieval(model, corpus, progress=False, rerank_itm=5)["metrics"]
    assert five["rerank_k"] == 5 and five["itm_reranked_image_retrieval_recall@10"] == plain["image_retrieval_recall@10"]
    with pytest.raises(ValueError, match=r"^--rerank-itm must be a positive number of candidates, got 0$"):
        evaluate_retrieval(model, corpus, progress=False, rerank_itm=0)

    assert main(["eval", "retrieval", "--model", str(folder), "--data", str(table), "--rerank-itm", "5",
                 "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    r = lambda key: "/".join(f"{100 * five[f'itm_reranked_{key}_recall@{k}']:.1f}" for k in (1, 5, 10))
    assert lines[1] == (f"ITM re-ranked (top 5): text->image R@1/5/10 {r('image_retrieval')}%, "
                        f"image->text R@1/5/10 {r('text_retrieval')}%")
    r = lambda key: "/".join(f"{100 * five[f'itm_itc_reranked_{key}_recall@{k}']:.1f}" for k in (1, 5, 10))
    assert lines[2] == (f"ITM x ITC re-ranked (top 5): text->image R@1/5/10 {r('image_retrieval')}%, "
                        f"image->text R@1/5/10 {r('text_retrieval')}%")


def test_index_search_reranks_with_itm(tmp_path, corpus_and_model, capsys):
    pytest.importorskip("faiss")
    from vlpretrain.cli.main import main
    from vlpretrain.retrieval.index import RetrievalIndex

    corpus, model, folder, table = corpus_and_model
    index = RetrievalIndex.build_from_corpus(model, corpus, tmp_path / "idx", spec=str(folder), progress=False)
    query = "a red square number 3"
    plain = index.search(texts=query, k=5)[0]
    hits = index.search(texts=query, k=5, rerank=5)[0]
    assert sorted(h["id"] for h in hits) == sorted(h["id"] for h in plain)  # the same 5, re-sorted
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    scores = [h["itm_score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    with torch.no_grad():
        images = torch.stack([model.preprocess(Image.open(h["image"]).convert("RGB")) for h in hits])
        want = model.itm_scores(images, model.tokenizer([query] * 5))
    assert scores == pytest.approx(want.tolist(), abs=1e-5)
    top2 = index.search(texts=query, k=2, rerank=5)[0]
    assert [h["id"] for h in top2] == [h["id"] for h in hits[:2]]
    wide = index.search(texts=query, k=7, rerank=3)[0]
    assert len(wide) == 7 and [h["itm_score"] is None for h in wide] == [False] * 3 + [True] * 4
    with pytest.raises(ValueError, match=r"^search: rerank needs the queries themselves \(texts or images\)"):
        index.search(vectors=index.index.reconstruct(0), rerank=3)
    with pytest.raises(ValueError, match=r"^search: rerank scores image-text pairs: give texts for an index of "
                                         r"images or images for an index of captions \(this index holds image"):
        index.search(images=[hits[0]["image"]], rerank=3)
    with pytest.raises(ValueError, match=r"^search: rerank must be a positive integer \(candidates to re-score\), "
                                         r"got 0$"):
        index.search(texts=query, rerank=0)

    combined = index.search(texts=query, k=5, rerank=5, rerank_score="itm+itc")[0]
    scale = model.logit_scale.exp().item()
    for hit in combined:
        assert hit["rerank_score"] == pytest.approx(math.log(hit["itm_score"]) + scale * hit["score"], abs=1e-4)
    assert [h["rerank_score"] for h in combined] == sorted((h["rerank_score"] for h in combined), reverse=True)
    assert sorted(h["id"] for h in combined) == sorted(h["id"] for h in plain)
    with pytest.raises(ValueError, match=r"^search: rerank_score must be one of \['itm', 'itm\+itc'\], got 'itc'$"):
        index.search(texts=query, rerank=3, rerank_score="itc")

    assert main(["index", "query", str(tmp_path / "idx"), "--text", query, "-k", "3", "--rerank", "5", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [h["id"] for h in printed] == [h["id"] for h in hits[:3]] and "itm_score" in printed[0]
    assert main(["index", "query", str(tmp_path / "idx"), "--text", query, "-k", "2", "--rerank", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and re.match(r"^   1  -?\d\.\d{4}  itm \d\.\d{4}  \S+  a \w+ square number \d+$", lines[0])


def test_text_index_reranks_image_queries(tmp_path, corpus_and_model):
    pytest.importorskip("faiss")
    from vlpretrain.retrieval.index import RetrievalIndex

    corpus, model, folder, table = corpus_and_model
    index = RetrievalIndex.build_from_corpus(model, corpus, tmp_path / "tidx", spec=str(folder), modality="text",
                                             progress=False)
    image = str(table.parent / "images" / "img3.png")
    hits = index.search(images=[image], k=4, rerank=4)[0]
    scores = [h["itm_score"] for h in hits]
    assert len(hits) == 4 and scores == sorted(scores, reverse=True)


# ----------------------------------------------------------------------------- training


def test_three_training_steps_with_albef_loss(tmp_path):
    from vlpretrain.config import recipe_from_dict
    from vlpretrain.training import train

    table = write_image_csv(tmp_path, 12)
    values = tiny_recipe(tmp_path / "run", table, max_steps=3, validate_every_epoch=False)
    values["model"]["fusion"] = {"layers": 1}
    values["loss"] = {"name": "albef"}
    result = train(recipe_from_dict(values))
    steps = [r for r in read_metrics(tmp_path / "run") if "itm_loss" in r]
    assert len(steps) == 3 and all("mlm_loss" in r and "itc_loss" in r for r in steps)
    model = load_model(result.final_dir)
    assert model.has_itm and model.mask_token_id == 49408


# ----------------------------------------------------------------------------- global negatives


GLOBAL_CFG = {"layers": 1, "negatives_from": "global", "mlm": False}


def _global_batch(n: int = 8):
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    tokens = torch.randint(1, 400, (n, 16), generator=generator)
    tokens[:, 0], tokens[:, -1] = 49406, 49407
    return images, tokens


def _itm_loss_and_grads(images, tokens, image_ids):
    torch.manual_seed(0)
    model = build_model(tiny_model_config(fusion=dict(GLOBAL_CFG))).train()
    out = model(images, tokens, image_ids=image_ids)
    loss = nn.functional.cross_entropy(out["itm_logits"], out["itm_labels"])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["itm_logits"].detach(), loss.detach(), grads


def _global_worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    images, tokens = _global_batch()
    local = len(images) // world
    rows = slice(rank * local, (rank + 1) * local)
    logits, loss, grads = _itm_loss_and_grads(images[rows], tokens[rows], torch.arange(len(images))[rows])
    parts = [torch.empty_like(logits) for _ in range(world)]
    dist.all_gather(parts, logits)
    dist.all_reduce(loss)
    for g in grads.values():  # DDP averages gradients over ranks
        dist.all_reduce(g)
        g /= world
    return {"logits": parts, "loss": loss / world, "grads": grads}


@pytest.mark.slow
def test_global_negatives_two_processes_equal_one_process():
    two = spawn_gloo(_global_worker, 2)
    images, tokens = _global_batch()
    logits, loss, grads = _itm_loss_and_grads(images, tokens, torch.arange(8))
    # One process orders rows [positives, image + negative text, negative image + text] over all 8 pairs;
    # rank r holds the same three blocks for its 4 pairs.
    blocks = [torch.cat([part[4 * b:4 * b + 4] for part in two["logits"]]) for b in range(3)]
    assert torch.allclose(torch.cat(blocks), logits, atol=1e-5)
    assert torch.allclose(two["loss"], loss, atol=1e-5)
    assert set(two["grads"]) == set(grads)
    for name, grad in grads.items():
        assert torch.allclose(two["grads"][name], grad, atol=1e-5), name
