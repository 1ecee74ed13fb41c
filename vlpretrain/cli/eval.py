"""``vlp eval zeroshot | linear-probe | knn | retrieval``: evaluations written as JSON."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from .eval_run import add_parsers as add_run_and_build, add_precision_option, add_recall_k_option, in_precision
from .options import (
    add_batch_options,
    add_corpus_options,
    corpus_config,
    add_image_column_option,
    add_model_option,
    add_progress_option,
    add_split_option,
)


def _common(p: argparse.ArgumentParser) -> None:
    add_model_option(p)
    p.add_argument("--label-column", default="label", help="label column of a table or dataset (default: label)")
    add_image_column_option(p)
    add_split_option(p)
    p.add_argument("--classnames", default=None,
                   help="class names: a .txt (one label per line, optionally 'label<TAB>readable name'), a .json "
                        "list or {label: name}, or a comma-separated list (default: the labels found)")
    add_batch_options(p)
    p.add_argument("--output", default=None, help="JSON file to write (default: print only)")
    add_progress_option(p)


def add_parser(commands) -> None:
    p = commands.add_parser("eval", help="evaluate a model: zero-shot, linear probe, k-NN, retrieval",
                            description="Evaluate a model; results are printed and written in CLIP_benchmark's JSON shape.")
    tasks = p.add_subparsers(dest="task", metavar="TASK")
    tasks.required = True

    z = tasks.add_parser("zeroshot", help="zero-shot classification with prompt templates",
                         description="Zero-shot classification. DATA: a folder of class subfolders, a CSV/TSV/JSONL/parquet "
                                     "with image and label columns, emoji:SPLIT (labels: category, subcategory), a "
                                     "Hugging Face dataset folder / hf:NAME, or WebDataset shards (a shard folder, its "
                                     "manifest.json or 'shards/{00000..00009}.tar'; streamed; the label is the "
                                     "--label-column field of each sample's .json).")
    _common(z)
    z.add_argument("--num-workers", type=int, default=0,
                   help="image decoding processes for WebDataset shards (default: 0, decode in the main one)")
    z.add_argument("--data", required=True, help="the labelled images (see above)")
    z.add_argument("--templates", default=None,
                   help="a set (openai_imagenet, openai_imagenet_7, simple), a .json / .txt file, or a template like "
                        "'an emoji of {c}.' (default: a wds: folder's own templates, else openai_imagenet)")
    z.add_argument("--confusion-png", default=None, help="also draw the confusion matrix into this PNG")
    z.add_argument("--save-clf", default=None, metavar="FILE",
                   help="save the zero-shot class weights (safetensors, with the class names and the model's signature)")
    z.add_argument("--load-clf", default=None, metavar="FILE",
                   help="use saved class weights instead of encoding the prompts (same model and class names only)")
    z.set_defaults(run=run_zeroshot)

    t = tasks.add_parser("retrieval", help="zero-shot image-text retrieval (Recall@1/5/10 both ways)",
                         description="Zero-shot image-text retrieval over every image and every caption of DATA: "
                                     "image_retrieval_recall@k (a caption finds its image) and text_retrieval_recall@k "
                                     "(an image finds any of its captions) for k = 1, 5, 10, mean and median rank, and "
                                     "chance levels, computed exactly. DATA: a CSV/TSV/JSONL/parquet with image and "
                                     "caption columns, a Hugging Face dataset folder / hf:NAME, emoji:SPLIT, or "
                                     "WebDataset shards (a shard folder, its manifest.json or "
                                     "'shards/{00000..00009}.tar'), streamed without listing them.")
    add_model_option(t)
    add_corpus_options(t, data_help="the image-caption corpus (see above)")
    add_batch_options(t, workers=0)
    t.add_argument("--rerank-itm", type=int, default=None, metavar="K",
                   help="also re-rank each query's top K by embedding with the model's image-text matching head "
                        "and report two re-ranked recalls: itm_reranked_* (by the match probability alone, as "
                        "ALBEF evaluates) and itm_itc_reranked_* (match probability times the contrastive "
                        "softmax) (models trained with fusion heads only)")
    t.add_argument("--output", default=None, help="JSON file to write (default: print only)")
    add_recall_k_option(t)
    add_progress_option(t)
    t.set_defaults(run=run_retrieval)

    add_run_and_build(tasks)

    b = tasks.add_parser("bias", help="bias probes: association, harmful labels, per-group gaps, retrieval skew",
                         description="Run the probes of a probe file (eval/probes/*.yaml) on a model: cross-modal "
                                     "association tests (effect size, permutation p), harmful-label rates, per-group "
                                     "zero-shot accuracy, retrieval skew (MaxSkew@k, NDKL@k) and the spread of each over "
                                     "the prompt templates, with 95% bootstrap intervals. A group is flagged when its "
                                     "Holm-adjusted permutation p-value and its control p-value (the same statistic "
                                     "with random control words in place of the sensitive texts) are both "
                                     "below the probe's alpha. Writes report.json, summary.md and report.png.")
    add_model_option(b)
    b.add_argument("--probe", required=True, help="probe YAML, e.g. eval/probes/emoji-skin-tone.yaml")
    b.add_argument("--out", default=None, help="output folder (default: results/bias/<probe>/<model folder name>)")
    b.add_argument("--permutations", type=int, default=None, help="permutations per test (default: the probe's, or 10000)")
    b.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples per interval (default: the probe's, or 1000)")
    b.add_argument("--controls", type=int, default=None,
                   help="control draws per test (default: the probe's, or 300; 0 turns the control test off)")
    b.add_argument("--control-words", choices=("pseudo", "vocabulary"), default=None,
                   help="control texts: pronounceable pseudo-words ('a bakil') or real whole words of the model's "
                        "tokenizer vocabulary ('a harvest', one token each, as most sensitive words are); "
                        "default: the probe's control_words, or pseudo")
    b.add_argument("--seed", type=int, default=None, help="seed of permutations, resamples and control draws")
    add_progress_option(b)
    b.set_defaults(run=run_bias)

    for name, helptext in (("linear-probe", "logistic regression on frozen image features"),
                           ("knn", "weighted k-nearest-neighbour classification on frozen image features")):
        t = tasks.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        _common(t)
        t.add_argument("--train", required=True, help="labelled images to fit on")
        t.add_argument("--test", required=True, help="labelled images to score")
        t.add_argument("--k-shot", type=int, default=None, help="use k training images per class (default: all)")
        t.add_argument("--seed", type=int, default=0)
        if name == "knn":
            t.add_argument("-k", type=int, default=20, help="neighbours (default: 20)")
        t.set_defaults(run=run_linear_probe if name == "linear-probe" else run_knn)
    for name, command in tasks.choices.items():  # every eval command encodes through inference, in --precision
        if name == "build":
            continue
        if "--precision" not in command._option_string_actions:
            add_precision_option(command)
        command.set_defaults(run=in_precision(command.get_default("run")))


def _finish(args, result: dict) -> int:
    from ..io import write_json

    m = result["metrics"]
    fmt = lambda v: "nan" if isinstance(v, float) and math.isnan(v) else f"{100 * v:.1f}%"
    line = (f"{result['task']} on {result['dataset']} ({m['num_samples']} images, {m['num_classes']} classes): "
            f"acc1 {fmt(m['acc1'])}, acc5 {fmt(m['acc5'])}, mean per-class recall {fmt(m['mean_per_class_recall'])} "
            f"(chance {fmt(1 / m['num_classes'])})")
    print(line)
    if "template_spread" in m:
        s = m["template_spread"]
        print(f"per-template mean per-class recall: {fmt(s['min'])} to {fmt(s['max'])} (std {fmt(s['std'])})")
    if args.output:
        print(f"written: {write_json(result, args.output)}")
    return 0


def run_zeroshot(args) -> int:
    from ..data.shard_format import is_shard_spec
    from ..data.wds_benchmark import open_benchmark_images
    from ..evaluation.tasks import evaluate_zeroshot
    from ..models import load_model

    if is_shard_spec(args.data):
        return _finish(args, _zeroshot_shards(args))
    data, classnames, templates = open_benchmark_images(args.data, args.label_column, args.image_column, args.split)
    model = load_model(args.model)
    result = evaluate_zeroshot(model, data, args.classnames or classnames, args.templates or templates or "openai_imagenet",
                               args.batch_size, progress=not args.no_progress, model_name=str(args.model),
                               confusion_png=args.confusion_png, save_clf=args.save_clf, load_clf=args.load_clf)
    return _finish(args, result)


def _zeroshot_shards(args) -> dict:
    from ..data.shard_corpus import ShardCorpus
    from ..evaluation.tasks import evaluate_zeroshot_shards
    from ..models import load_model

    corpus = ShardCorpus(args.data)
    result = evaluate_zeroshot_shards(load_model(args.model), corpus, args.label_column, args.classnames,
                                      args.templates or "openai_imagenet", args.batch_size, args.num_workers,
                                      not args.no_progress, str(args.model), _dataset_name(args.data),
                                      args.confusion_png, save_clf=args.save_clf, load_clf=args.load_clf)
    if result["skipped_samples"]:
        print(f"warning: {result['skipped_samples']} samples skipped (bad sample or undecodable image), e.g. "
              f"{result['skipped_examples'][0]}")
    return result


def _train_test(args):
    from ..data.wds_benchmark import open_benchmark_images
    from ..models import load_model

    train_split = "train" if args.train.startswith("wds:") else args.split  # a wds folder: its train split
    train, _, _ = open_benchmark_images(args.train, args.label_column, args.image_column, train_split)
    test, classnames, _ = open_benchmark_images(args.test, args.label_column, args.image_column, args.split)
    args.classnames = args.classnames or classnames
    return load_model(args.model), train, test


def run_linear_probe(args) -> int:
    from ..evaluation.tasks import evaluate_linear_probe

    model, train, test = _train_test(args)
    return _finish(args, evaluate_linear_probe(model, train, test, args.classnames, args.k_shot, args.batch_size,
                                               not args.no_progress, str(args.model), args.seed))


def run_knn(args) -> int:
    from ..evaluation.tasks import evaluate_knn

    model, train, test = _train_test(args)
    return _finish(args, evaluate_knn(model, train, test, args.classnames, args.k, args.k_shot, args.batch_size,
                                      not args.no_progress, str(args.model), args.seed))


def _dataset_name(spec: str) -> str:
    # How the data set is named in the report: emoji:test -> emoji-test, pairs.csv -> pairs.
    if spec.startswith("emoji:"):
        return "emoji-" + (spec.split(":", 1)[1] or "train")
    if spec.startswith("hf:"):
        return spec[3:]
    if spec.startswith("wds:"):
        return re.sub(r"^wds_", "", Path(spec[4:].rstrip("/")).name)
    from ..data.shard_format import is_shard_spec

    if is_shard_spec(spec):
        from ..data.shard_corpus import shard_set_name

        return shard_set_name(spec)
    return Path(spec.rstrip("/")).stem or spec


def run_retrieval(args) -> int:
    from ..evaluation.tasks import evaluate_retrieval
    from ..io import write_json
    from ..models import load_model
    from ..data.wds_benchmark import open_benchmark_corpus

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    data = corpus_config(args)
    corpus = open_benchmark_corpus(args.data, data, args.split)
    model = load_model(args.model)
    ks = args.recall_k or (1, 5, 10)
    result = evaluate_retrieval(model, corpus, args.batch_size, progress=not args.no_progress,
                                model_name=str(args.model), dataset_name=_dataset_name(args.data),
                                rerank_itm=args.rerank_itm, num_workers=args.num_workers, ks=ks)
    m = result["metrics"]
    at = "R@" + "/".join(map(str, ks))

    def recalls(key: str, prefix: str = "") -> str:
        return "/".join(f"{100 * m[f'{prefix}{key}_recall@{k}']:.1f}" for k in ks)

    print(f"zeroshot_retrieval on {result['dataset']} ({m['num_images']} images, {m['num_texts']} captions): "
          f"text->image {at} {recalls('image_retrieval')}% (chance {recalls('image_retrieval', 'chance_')}%), "
          f"image->text {at} {recalls('text_retrieval')}% (chance {recalls('text_retrieval', 'chance_')}%), "
          f"median rank {m['image_retrieval_median_rank']:g} / {m['text_retrieval_median_rank']:g}")
    if args.rerank_itm is not None:
        print(f"ITM re-ranked (top {m['rerank_k']}): text->image {at} {recalls('image_retrieval', 'itm_reranked_')}%, "
              f"image->text {at} {recalls('text_retrieval', 'itm_reranked_')}%")
        print(f"ITM x ITC re-ranked (top {m['rerank_k']}): "
              f"text->image {at} {recalls('image_retrieval', 'itm_itc_reranked_')}%, "
              f"image->text {at} {recalls('text_retrieval', 'itm_itc_reranked_')}%")
    if "mlm_accuracy" in m:
        print(f"masked-token accuracy of the MLM head: {100 * m['mlm_accuracy']:.1f}% "
              f"({m['mlm_masked_tokens']} masked tokens)")
    if m["bad_images"]:
        print(f"warning: {m['bad_images']} images could not be decoded; they count as misses")
    if result.get("skipped_samples"):
        print(f"warning: {result['skipped_samples']} bad shard samples skipped, e.g. {result['skipped_examples'][0]}")
    if args.output:
        print(f"written: {write_json(result, args.output)}")
    return 0


def _model_folder_name(spec: str) -> str:
    path = Path(spec.rstrip("/"))
    return path.parent.name if path.name == "final" and path.parent.name else (path.stem or spec).replace(":", "-").replace("/", "-")


def run_bias(args) -> int:
    from ..evaluation.bias import load_probe, run_bias_probe, write_bias_report
    from ..models import load_model

    for flag in ("permutations", "bootstrap", "controls"):
        value = getattr(args, flag)
        if value is not None and value < (1 if flag == "permutations" else 0):
            raise ValueError(f"--{flag} must be {'at least 1' if flag == 'permutations' else '0 or more'}, got {value}")
    probe = load_probe(args.probe)
    model = load_model(args.model)
    out = args.out or str(Path("results") / "bias" / probe["name"] / _model_folder_name(str(args.model)))
    report = run_bias_probe(model, probe, model_name=str(args.model), progress=not args.no_progress,
                            permutations=args.permutations, bootstrap=args.bootstrap, controls=args.controls,
                            seed=args.seed, control_words=args.control_words)
    m = report["metrics"]
    print(f"bias probe {probe['name']} on {report['dataset']}: {m['images']} images, groups "
          + ", ".join(f"{n} {m['group_sizes'][n]}" for n in m["groups"]))
    for test, result in (m.get("association") or {}).items():
        print(f"association {test}: effect size " + ", ".join(
            f"{n} {result['groups'][n]['effect_size']:+.2f}" for n in m["groups"]))
    if m.get("harmful_labels"):
        g = m["harmful_labels"]["groups"]
        print("sensitive-label rate: " + ", ".join(f"{n} {100 * g[n]['rate']:.1f}%" for n in m["groups"]))
    if m.get("group_performance"):
        gp = m["group_performance"]
        print("zero-shot accuracy: " + ", ".join(f"{n} {100 * gp['groups'][n]['accuracy']:.1f}%" for n in m["groups"])
              + f" (gap {100 * gp['gap']:.1f} points, worst {gp['worst_group']})")
    for set_name, result in (m.get("retrieval_skew") or {}).items():
        head = result[next(k for k in result if k.startswith("k="))]
        print(f"retrieval skew, {set_name} queries, top {head['k']}: MaxSkew {head['max_skew']:.2f}, NDKL {head['ndkl']:.3f}")
    flags = m["flags"]
    print("flagged: " + ("; ".join(f"{f['group']} ({f['probe']}: {f['test']}, p_adj {f['p_adjusted']:.1g}"
                                   + (f", control p {f['control_p_value']:.1g}" if f.get("control_p_value") else "") + ")"
                                   for f in flags) if flags else f"none at alpha {m['alpha']}"))
    paths = write_bias_report(report, out)
    print(f"written: {paths['json']}, {paths['markdown']}, {paths['png']}")
    return 0
