"""Evaluation tasks as CLIP_benchmark runs them: each returns ``{"dataset", "model", "pretrained",
"task", "metrics", "language"}`` and can be written as one JSON file."""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ..data.labelled import LabelledImages
from ..data.shard_corpus import ShardCorpus
from ..io import save_figure
from ..inference_shards import shard_features
from ..inference import corpus_image_loader, current_precision, encode_corpus, encode_images
from .classification_metrics import classification_metrics
from .classnames import load_classnames, match_labels

logger = logging.getLogger(__name__)
MAX_SKIPPED_REPORTED = 20


def report(dataset: str, model: str, task: str, metrics: dict, pretrained: str = "", language: str = "en",
           **extra: Any) -> dict:
    """CLIP_benchmark's result shape, plus the precision the features were encoded in."""
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": task, "metrics": metrics,
            "language": language, "precision": current_precision(), **extra}


def evaluate_zeroshot(model, data: LabelledImages, classnames: Union[None, str, Sequence[str], dict] = None,
                      templates: Any = "openai_imagenet", batch_size: int = 256, progress: bool = True,
                      model_name: str = "", confusion_png: Optional[Union[str, Path]] = None,
                      save_clf: Optional[Union[str, Path]] = None, load_clf: Optional[Union[str, Path]] = None) -> dict:
    """Zero-shot classification of ``data`` into ``classnames`` with prompt ``templates``.

    Metrics: ``acc1``, ``acc5`` (NaN below 5 classes), ``mean_per_class_recall``, per-class recall,
    the confusion matrix, and accuracy per template with its spread (prompt sensitivity).
    ``save_clf`` writes the class weights (see :mod:`vlpretrain.evaluation.clf_store`); ``load_clf`` uses
    saved ones instead of encoding the prompts (no per-template accuracy then).

    Example:
        >>> data = open_labelled_images("emoji:test", label_column="category")
        >>> evaluate_zeroshot(model, data, templates="simple")["metrics"]["mean_per_class_recall"]
    """
    return _zeroshot(model, data.labels, data.name, lambda classifier: classifier.encode_images(data.images),
                     classnames, templates, batch_size, progress, model_name, confusion_png,
                     save_clf=save_clf, load_clf=load_clf)


def _zeroshot(model, labels: list[str], name: str, encode: Callable[[Any], torch.Tensor], classnames: Any,
              templates: Any, batch_size: int, progress: bool, model_name: str,
              confusion_png: Optional[Union[str, Path]], save_clf: Optional[Union[str, Path]] = None,
              load_clf: Optional[Union[str, Path]] = None, **extra: Any) -> dict:
    """evaluate_zeroshot's work on labels and image features (``encode(classifier)``, called after the
    labels are checked and the class weights built, loaded or saved)."""
    from .zeroshot import ZeroShotClassifier

    keys, readable, targets = match_labels(labels, load_classnames(classnames), name)
    empty = [key for key, text in zip(keys, readable) if not str(text).strip()]
    if empty:
        raise ValueError(f"{name}: {len(empty)} class names are empty (labels {', '.join(repr(k) for k in empty[:5])}); "
                         f"give every class a name (--classnames)")
    weights = None
    if load_clf:
        from .clf_store import load_classifier

        weights = load_classifier(load_clf, model, readable, model_name)
    classifier = ZeroShotClassifier(model, readable, templates=templates, batch_size=batch_size, progress=progress,
                                    weights=weights)
    if load_clf:
        extra["loaded_classifier"] = Path(load_clf).name
    if save_clf:
        from .clf_store import save_classifier

        save_classifier(save_clf, classifier, model, model_name)
    features = encode(classifier)
    logits = classifier.logits(features)
    labels = torch.tensor(targets)
    metrics = classification_metrics(logits, labels, keys)
    metrics["chance_mean_per_class_recall"] = 1 / len(keys)
    if isinstance(classifier.templates, list) and len(classifier.templates) > 1 and not classifier.loaded:
        per_template = {}
        weights = classifier.per_template_weights()  # (T, D, C)
        for template, w in zip(classifier.templates, weights):
            template_logits = 100 * features.to(w) @ w
            m = classification_metrics(template_logits, labels, keys)
            per_template[template] = {"acc1": m["acc1"], "mean_per_class_recall": m["mean_per_class_recall"]}
        values = [v["mean_per_class_recall"] for v in per_template.values()]
        metrics["per_template"] = per_template
        metrics["template_spread"] = {"min": min(values), "max": max(values), "std": statistics.pstdev(values),
                                      "metric": "mean_per_class_recall"}
    if confusion_png:
        plot_confusion_matrix(metrics["confusion_matrix"], readable, confusion_png,
                              title=f"{model_name or 'model'} on {name}")
    return report(name, model_name, "zeroshot_classification", metrics,
                  classnames=readable, num_templates=len(classifier.templates), **extra)


def plot_confusion_matrix(matrix: list[list[int]], names: list[str], path: Union[str, Path], title: str = "") -> Path:
    """Row-normalized confusion matrix as a PNG (rows: true class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = torch.tensor(matrix, dtype=torch.float)
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    size = min(4 + 0.35 * len(names), 30)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if len(names) <= 40:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return Path(path)


def _train_test(model, train: LabelledImages, test: LabelledImages, classnames, batch_size, progress):
    names = load_classnames(classnames)
    if names is None:
        names = {label: label for label in sorted(set(train.labels) | set(test.labels))}
    keys, readable, train_targets = match_labels(train.labels, names, train.name)
    unknown = sorted(set(test.labels) - set(keys))
    if unknown:
        raise ValueError(f"{test.name}: labels {unknown[:5]} do not occur in the training set {train.name}")
    index = {k: i for i, k in enumerate(keys)}
    train_features = encode_images(model, train.images, batch_size, progress=progress)
    test_features = encode_images(model, test.images, batch_size, progress=progress)
    return keys, train_features, torch.tensor(train_targets), test_features, torch.tensor([index[l] for l in test.labels])


def evaluate_linear_probe(model, train: LabelledImages, test: LabelledImages, classnames=None, k_shot: Optional[int] = None,
                          batch_size: int = 256, progress: bool = True, model_name: str = "", seed: int = 0) -> dict:
    """Logistic regression on frozen image features; weight decay chosen on a split of ``train``."""
    from .linear_probe import linear_probe

    keys, xtr, ytr, xte, yte = _train_test(model, train, test, classnames, batch_size, progress)
    fit = linear_probe(xtr, ytr, xte, yte, num_classes=len(keys), k_shot=k_shot, seed=seed)
    metrics = classification_metrics(fit["logits"], yte, keys)
    metrics.update({"weight_decay": fit["weight_decay"], "k_shot": k_shot, "num_train": fit["num_train"],
                    "val_acc_by_weight_decay": {str(k): v for k, v in fit["val_acc_by_weight_decay"].items()}})
    return report(test.name, model_name, "linear_probe", metrics, train_dataset=train.name)


def evaluate_knn(model, train: LabelledImages, test: LabelledImages, classnames=None, k: int = 20,
                 k_shot: Optional[int] = None, batch_size: int = 256, progress: bool = True,
                 model_name: str = "", seed: int = 0) -> dict:
    """Weighted k-nearest-neighbour classification on frozen image features."""
    from .knn import knn_classify
    from .linear_probe import few_shot_indices

    keys, xtr, ytr, xte, yte = _train_test(model, train, test, classnames, batch_size, progress)
    if k_shot is not None:
        keep = few_shot_indices(ytr, k_shot, seed)
        xtr, ytr = xtr[keep], ytr[keep]
    scores = knn_classify(xtr, ytr, xte, num_classes=len(keys), k=k)
    metrics = classification_metrics(scores, yte, keys)
    metrics.update({"k": k, "k_shot": k_shot, "num_train": int(len(ytr))})
    return report(test.name, model_name, "knn", metrics, train_dataset=train.name)


def _short_name(name: str) -> str:
    # Corpora are named by their file path; a report names the data set, not where it lives.
    text = str(name).rstrip("/")
    return Path(text).stem if ("/" in text or "\\" in text) else text


def evaluate_retrieval(model, corpus: Any, batch_size: int = 256, progress: bool = True, model_name: str = "",
                       dataset_name: Optional[str] = None, ks: Sequence[int] = (1, 5, 10),
                       rerank_itm: Optional[int] = None, num_workers: int = 0) -> dict:
    """Zero-shot image-text retrieval over a corpus with one or several captions per image.

    Every image and every caption is encoded once; Recall@k is then computed exactly, in chunks:
    ``image_retrieval_recall@k`` (a caption finds its image among all images) and
    ``text_retrieval_recall@k`` (an image finds any of its captions among all captions), with mean
    and median rank and the chance level of each recall. ``rerank_itm=K`` (models with an ITM fusion
    head) also re-scores each query's top K candidates with the head and reports
    ``itm_reranked_image_retrieval_recall@k`` / ``itm_reranked_text_retrieval_recall@k`` (by the match
    probability), ``itm_itc_reranked_*`` (by match probability times the contrastive softmax) and
    ``rerank_k`` (see :mod:`vlpretrain.evaluation.rerank`).

    Example:
        >>> corpus = open_named_corpus("emoji:test", DataConfig())
        >>> evaluate_retrieval(model, corpus, dataset_name="emoji-test")["metrics"]["image_retrieval_recall@5"]
    """
    from .retrieval import retrieval_metrics

    if rerank_itm is not None:
        if isinstance(rerank_itm, bool) or not isinstance(rerank_itm, int) or rerank_itm < 1:
            raise ValueError(f"--rerank-itm must be a positive number of candidates, got {rerank_itm!r}")
        if isinstance(corpus, ShardCorpus):
            raise ValueError(f"{corpus.spec}: --rerank-itm reads images by row number, which streamed WebDataset "
                             f"shards do not offer; leave it out, or evaluate the table the shards were written from")
        if not getattr(model, "has_itm", False):
            raise ValueError("--rerank-itm needs a model with an ITM fusion head; this model has none")
    name = dataset_name or _short_name(getattr(corpus, "name", "corpus"))
    shards = isinstance(corpus, ShardCorpus)
    if not shards and len(corpus) == 0:
        raise ValueError(f"{name}: the corpus has no rows to evaluate")
    if shards:
        feats = encode_corpus(model, corpus, batch_size, num_workers=num_workers, progress=progress)
        if len(feats["image_features"]) == 0:
            raise ValueError(f"{name}: the shards hold no usable samples ({len(feats['skipped'])} skipped)")
    else:
        feats = encode_corpus(model, corpus, batch_size=batch_size, num_workers=num_workers, progress=progress)
    if len(feats["text_features"]) == 0:
        raise ValueError(f"{name}: no captions found; check --caption-column")
    metrics = retrieval_metrics(feats["image_features"], feats["text_features"], feats["text_to_image"], ks=ks)
    metrics["bad_images"] = len(feats["bad_images"])
    extra = _skipped_report(feats["skipped"]) if shards else _bad_images_report(corpus, feats["bad_images"], name)
    if rerank_itm is not None:
        from .rerank import reranked_retrieval_metrics

        metrics.update(reranked_retrieval_metrics(
            model, corpus_image_loader(corpus, model.preprocess), feats["captions"], feats["image_features"],
            feats["text_features"], feats["text_to_image"], rerank_itm, ks=ks, batch_size=min(batch_size, 64),
            progress=progress))
        metrics["rerank_k"] = rerank_itm
    fusion = getattr(model, "fusion", None)
    if fusion is not None and fusion.settings.mlm and shards:
        logger.warning("%s: masked-token accuracy reads images by row number; not measured on shards", name)
    elif fusion is not None and fusion.settings.mlm:
        from .mlm import masked_token_accuracy

        metrics.update(masked_token_accuracy(model, corpus, feats["captions"], feats["text_to_image"],
                                             batch_size=min(batch_size, 64), progress=progress))
    return report(name, model_name, "zeroshot_retrieval", metrics, **extra)


# ----------------------------------------------------------------------------- WebDataset shards, streamed


def _bad_images_report(corpus: Any, bad: Sequence[int], name: str) -> dict:
    """Name the images that did not decode (counted as misses): the first 20 in the log and the report
    (``bad_image_examples``), then how many more. Their reasons are read again from the images themselves."""
    from ..data.images import BadImageError, load_rgb

    if not len(bad):
        return {}
    examples = []
    for i in list(bad)[:MAX_SKIPPED_REPORTED]:
        row = corpus[int(i)]
        try:
            load_rgb(row.image)
            reason = "failed while being encoded (it loads now)"
        except BadImageError as e:
            reason = str(e)  # names the image: its path, or its size in bytes
        examples.append(f"{row.source}: {reason}")
        logger.warning("%s: bad image, counted as a miss: %s", name, examples[-1])
    if len(bad) > MAX_SKIPPED_REPORTED:
        logger.warning("%s: %d more bad images not listed (%d in all)", name, len(bad) - MAX_SKIPPED_REPORTED, len(bad))
    return {"bad_image_examples": examples}


def _skipped_report(skipped: list[tuple[str, str]]) -> dict:
    """The report fields naming the bad shard samples that were skipped (the first 20 of them)."""
    return {"skipped_samples": len(skipped),
            "skipped_examples": [f"{source}: {reason}" for source, reason in skipped[:MAX_SKIPPED_REPORTED]]}


def evaluate_zeroshot_shards(model, corpus: ShardCorpus, label_column: str = "label",
                             classnames: Union[None, str, Sequence[str], dict] = None,
                             templates: Any = "openai_imagenet", batch_size: int = 256, num_workers: int = 0,
                             progress: bool = True, model_name: str = "", dataset_name: Optional[str] = None,
                             confusion_png: Optional[Union[str, Path]] = None, save_clf: Optional[Union[str, Path]] = None,
                             load_clf: Optional[Union[str, Path]] = None) -> dict:
    """:func:`evaluate_zeroshot` on WebDataset shards, streamed: each sample's label is the field
    ``label_column`` of its ``.json`` member; samples whose image does not decode are skipped and named
    in the report (``skipped_samples``, ``skipped_examples``), as are bad samples.

    Example:
        >>> evaluate_zeroshot_shards(model, ShardCorpus("shards/emoji-test"), "category", templates="simple")
    """
    labels: list[str] = []
    undecodable: list[tuple[str, str]] = []

    def on_rows(batch: dict, rows: list[int], first: int) -> None:
        for i in rows:
            if not batch["ok"][i]:
                undecodable.append((batch["source"][i], batch["error"][i]))
            if batch["label"][i] is None:
                raise ValueError(f"{batch['source'][i]}: no field '{label_column}' in its .json (fields: "
                                 f"{batch['fields'][i]}); set --label-column")
            labels.append(str(batch["label"][i]))

    def describe(index: int, row: Any) -> dict:
        return {"label": row.extras.get(label_column), "fields": sorted(row.extras)}

    name = dataset_name or corpus.name
    images = shard_features(model, corpus, batch_size, num_workers, progress, describe=describe, on_rows=on_rows)
    ordered = [labels[i] for i in torch.argsort(images["rank"]).tolist()]
    ok = images["ok"].tolist()
    skipped = images["skipped"] + undecodable
    if not any(ok):
        raise ValueError(f"{name}: the shards hold no usable labelled samples ({len(skipped)} skipped)")
    features = images["features"][images["ok"]]
    return _zeroshot(model, [label for label, good in zip(ordered, ok) if good], name, lambda classifier: features,
                     classnames, templates, batch_size, progress, model_name, confusion_png,
                     save_clf=save_clf, load_clf=load_clf, **_skipped_report(skipped))
