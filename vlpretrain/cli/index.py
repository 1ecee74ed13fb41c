"""``vlp index build | add | query | info | serve``: FAISS indexes over embedding exports, and searching them."""

from __future__ import annotations

import argparse
import json
import sys

from .options import (CORPUS_HELP, add_batch_options, add_corpus_options, add_model_option, add_progress_option,
                      corpus_config)


def add_parser(commands) -> None:
    p = commands.add_parser("index", help="build, grow, query and describe FAISS retrieval indexes",
                            description="FAISS retrieval indexes over embeddings written by `vlp embed` (or "
                                        "embedded on the fly from --model and --data).")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    _add_build_parser(actions)
    _add_add_parser(actions)
    _add_query_parser(actions)
    _add_info_parser(actions)
    _add_serve_parser(actions)


def _add_build_parser(actions) -> None:
    b = actions.add_parser(
        "build", help="build an index from embedding folders, or from a model and data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build an index into --out (replaced atomically; it must be missing, empty or an index\n"
                    "folder, and one build or add at a time writes it).\n\n"
                    "  vlp index build emb/pairs --out indexes/pairs\n"
                    "  vlp index build --model runs/demo/final --data emoji:test --out indexes/emoji\n"
                    "  vlp index build --model runs/demo/final --data shards/cc3m --out indexes/cc3m\n\n"
                    "--kind auto is exact (flat) below a million vectors that fit the memory budget, else\n"
                    "IVF-SQ8; embeddings larger than the budget are indexed shard by shard with the inverted\n"
                    "lists on disk (ivf-ondisk). Approximate indexes are trained on a\n"
                    "seeded sample, nprobe / efSearch are tuned to recall@10 >= 0.95, and recall@10 against\n"
                    "exact search is measured on up to 1000 held-out image and 1000 text queries; a warning\n"
                    "is given when cross-modal queries lose recall. With --model and --data the embeddings\n"
                    "are exported first and kept in OUT/embeddings (staged in OUT.embeddings-partial, so an\n"
                    "interrupted export resumes when the command is run again). WebDataset shards (a shard\n"
                    "folder, its manifest.json or 'shards/{00000..00099}.tar') are streamed, one embedding\n"
                    "shard per input shard; hits name each sample's original path (else shard.tar:key).\n"
                    "An ivf-ondisk build leaves glibc's malloc trim/mmap thresholds at 128 KiB for the rest\n"
                    "of the process (so freed buffers return to the system).")
    b.add_argument("embeddings", nargs="*", metavar="EMB_DIR", help="embedding folders written by `vlp embed`")
    add_model_option(b, required=False, help="embed --data with this model first (checkpoint folder, recipe "
                                             ".yaml, open_clip:ARCH[/TAG] or hf:NAME)")
    add_corpus_options(b, data_help="the corpus to embed with --model (" + CORPUS_HELP + ")", required=False,
                       columns=False)
    b.add_argument("--out", required=True, metavar="INDEX_DIR", help="index folder to write")
    b.add_argument("--kind", default="auto",
                   choices=["auto", "flat", "hnsw", "ivf", "ivfpq", "ivfpq-refine", "ivfsq8", "ivf-ondisk"],
                   help="index kind (default: auto, chosen from size and memory budget: flat below 1M vectors, "
                        "ivfsq8 (IVF over 8-bit scalar codes) above, ivf-ondisk (built shard by shard, lists on "
                        "disk) when the vectors do not fit the budget)")
    b.add_argument("--memory-budget", default="4GB",
                   help="memory the index may take, e.g. 4GB, 512MB, 2GiB (default: 4GB)")
    b.add_argument("--modality", default="image", choices=["image", "text", "both"],
                   help="what the index holds: image embeddings (search images by text or image), caption "
                        "embeddings, or both: a joint index OUT/joint.json + OUT/image/ + OUT/text/ (default: image)")
    b.add_argument("--seed", type=int, default=0, help="seed of training sample and recall queries (default: 0)")
    add_batch_options(b, workers=0, what="with --model")
    add_progress_option(b)
    b.set_defaults(run=run_build)


def _add_add_parser(actions) -> None:
    a = actions.add_parser("add", help="add embedding folders to an existing index",
                           description="Add the vectors of more embedding folders (made with the same model) to "
                                       "INDEX_DIR; ids continue, an IVF index keeps its trained quantizer, recall@10 "
                                       "is measured again, and the folder is rewritten atomically (one build or add "
                                       "at a time: a second is refused).")
    a.add_argument("index", metavar="INDEX_DIR")
    a.add_argument("embeddings", nargs="+", metavar="EMB_DIR")
    add_progress_option(a)
    a.set_defaults(run=run_add)


def _add_query_parser(actions) -> None:
    q = actions.add_parser("query", help="search an index by text or image",
                           description="Print the top -k hits: rank, score, image path, caption.")
    q.add_argument("index", metavar="INDEX_DIR")
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", default=None, help="query text")
    what.add_argument("--image", default=None, metavar="PATH", help="query image file")
    q.add_argument("-k", type=int, default=10, help="number of hits (default: 10)")
    add_model_option(q, required=False, help="model that embeds the query (default: the model spec stored with the index)")
    q.add_argument("--rerank", type=int, default=None, metavar="K",
                   help="re-score the top K hits with the model's image-text matching head and re-sort them "
                        "(models trained with fusion heads; text queries on an image index read the hit images "
                        "from their paths)")
    q.add_argument("--rerank-score", choices=("itm", "itm+itc"), default="itm",
                   help="how --rerank sorts: itm = by the match probability (ALBEF); itm+itc = by the match "
                        "probability times the contrastive softmax, so a head near its prior keeps the "
                        "embedding order (default: itm)")
    q.add_argument("--part", choices=("image", "text"), default="image",
                   help="which part of a joint index to search: image (find images) or text (find captions)")
    q.add_argument("--json", action="store_true", help="print the hits as a JSON list")
    q.set_defaults(run=run_query)


def _add_info_parser(actions) -> None:
    i = actions.add_parser("info", help="describe an index: kind, size, model, search parameters, recall",
                           description="Print INDEX_DIR/info.json readably (or as JSON with --json).")
    i.add_argument("index", metavar="INDEX_DIR")
    i.add_argument("--json", action="store_true", help="print info.json as it is")
    i.set_defaults(run=run_info)


def _add_serve_parser(actions) -> None:
    s = actions.add_parser(
        "serve", help="serve indexes over HTTP: a JSON search API and a web page",
        description="Serve INDEX folders (NAME=PATH names one; a joint index serves NAME/image and NAME/text) "
                    "with uvicorn: POST /search, GET /image/{index}/{id}, GET /indexes, GET /health, the API docs at "
                    "/docs and a search page at /. Binds 127.0.0.1 unless --host says otherwise; any other address "
                    "needs --api-key (or VLP_API_KEY). Needs the serve extra: pip install 'vlpretrain[serve]'.")
    s.add_argument("indexes", nargs="+", metavar="INDEX", help="index folder, or NAME=INDEX_DIR")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    s.add_argument("--api-key", default=None, help="key that /search, /indexes and /image require (X-API-Key "
                                                   "header); required when --host is not a loopback address")
    s.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body, e.g. an uploaded "
                                                                     "image, in MB (default: 10; above it: 413)")
    s.add_argument("--max-k", type=int, default=100, help="largest k and rerank a query may ask for (default: 100)")
    add_model_option(s, required=False, help="model that embeds the queries of every index (default: the model "
                                             "spec each index stores; give it when that model has moved)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level; info logs every request (default: info)")
    s.set_defaults(run=run_serve)


def _print_warnings(info: dict) -> None:
    for warning in info.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)


def _recall_line(recall: dict) -> str:
    if recall.get("exact"):
        return "exact (flat index): 1.0 by construction"
    parts = [f"{name} queries {recall[f'{name}_queries']:.3f}" for name in ("image", "text")
             if recall.get(f"{name}_queries") is not None]
    stale = " (not re-measured after the last add)" if recall.get("stale") else ""
    return f"{', '.join(parts) or 'not measured'} ({recall.get('num_queries', 0)} queries){stale}"


def _summary(index) -> str:
    info = index.info
    params = ", ".join(f"{k}={v}" for k, v in info["search_params"].items()) or "none"
    return (f"{index.path}: {info['kind']} index ({info['factory']}) of {info['ntotal']} {info['modality']} "
            f"vectors, dim {info['dim']}; search {params}; recall@10 {_recall_line(info['recall@10'])}")


def run_build(args) -> int:
    from ..retrieval.index import RetrievalIndex

    if args.embeddings and (args.model or args.data):
        raise ValueError("give embedding folders or --model with --data, not both")
    if not args.embeddings and not (args.model and args.data):
        raise ValueError("nothing to index: give embedding folders (EMB_DIR), or --model and --data to embed first")
    options = dict(kind=args.kind, memory_budget=args.memory_budget, modality=args.modality, seed=args.seed,
                   progress=not args.no_progress)
    builder = RetrievalIndex
    if args.modality == "both":
        from ..retrieval.joint_index import JointIndex as builder

        options.pop("modality")
    if args.embeddings:
        index = builder.build(args.embeddings, args.out, **options)
    else:
        from ..models import load_model
        from ..retrieval.faiss_index import parse_memory
        from ..data.named import data_spec, open_named_corpus

        parse_memory(args.memory_budget)  # a typo fails before loading the model
        data = corpus_config(args)
        corpus = open_named_corpus(args.data, data, args.split)
        model = load_model(args.model)
        index = builder.build_from_corpus(model, corpus, args.out, spec=str(args.model),
                                                 data_spec=data_spec(args.data, args.split, data),
                                                 batch_size=args.batch_size, num_workers=args.num_workers, **options)
    for part in getattr(index, "parts", {"": index}).values():
        print(_summary(part))
        _print_warnings(part.info)
    return 0


def run_add(args) -> int:
    from ..retrieval.index import RetrievalIndex

    index = RetrievalIndex.load(args.index)
    before = index.ntotal
    index.add(args.embeddings, progress=not args.no_progress)
    print(f"added {index.ntotal - before} vectors (ids {before}..{index.ntotal - 1})")
    print(_summary(index))
    _print_warnings(index.info)
    return 0


def run_query(args) -> int:
    if args.k < 1:
        raise ValueError(f"-k must be at least 1, got {args.k}")
    if args.rerank is not None and args.rerank < 1:
        raise ValueError(f"--rerank must be at least 1, got {args.rerank}")
    if args.text is not None:
        from ..retrieval.index_search import check_query_texts

        check_query_texts([args.text], where="--text")  # before loading the index and its model
    from ..retrieval.joint_index import is_joint, open_index

    index = open_index(args.index, model_spec=args.model)
    if is_joint(args.index):
        index = index.parts[args.part]
    if args.text is not None:
        hits = index.search(texts=[args.text], k=args.k, rerank=args.rerank,
                            rerank_score=args.rerank_score)[0]
    else:
        from pathlib import Path

        if not Path(args.image).is_file():
            raise FileNotFoundError(f"--image {args.image}: no such file")
        hits = index.search(images=[args.image], k=args.k, rerank=args.rerank,
                            rerank_score=args.rerank_score)[0]
    if args.json:
        print(json.dumps(hits, indent=2, default=str))
        return 0
    for hit in hits:
        itm = "" if args.rerank is None else ("  itm -     " if hit.get("itm_score") is None
                                              else f"  itm {hit['itm_score']:.4f}")
        print(f"{hit['rank']:>4}  {hit['score']:.4f}{itm}  {hit['image'] or '(in-memory image)'}  {hit['caption']}")
    return 0


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # not reached


def run_info(args) -> int:
    from pathlib import Path

    from ..retrieval.index_files import INDEX_NAME, read_info
    from ..retrieval.joint_index import PARTS, is_joint

    path = Path(args.index)
    if is_joint(path):  # a joint index: each part as an index of its own
        for part in PARTS:
            if not args.json:
                print(f"[{part}]")
            run_info(argparse.Namespace(index=str(path / part), json=args.json))
        return 0
    info = read_info(path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    index_file = path / INDEX_NAME
    actual = index_file.stat().st_size if index_file.is_file() else 0
    health = "" if actual == info.get("index_bytes") else \
        f"  (the file is {actual} bytes, expected {info.get('index_bytes')}: truncated or corrupt)"
    params = ", ".join(f"{k}={v}" for k, v in info.get("search_params", {}).items()) or "none"
    signature = info.get("signature", {})
    rows = [
        ("index", str(path)),
        ("kind", f"{info.get('kind')} ({info.get('factory')})"),
        ("vectors", f"{info.get('ntotal')} {info.get('modality')} embeddings, dim {info.get('dim')}"),
        ("model", f"{signature.get('model') or '(unnamed)'} (dim {signature.get('dim')})"),
        ("search params", params),
        ("recall@10", _recall_line(info.get("recall@10", {}))),
        ("size on disk", f"{_size(info.get('index_bytes', 0))} index.faiss, {_size(on_disk)} in all{health}"),
        ("memory budget", _size(info.get("memory_budget", 0))),
        ("build time", f"{info.get('build_seconds', 0):.1f} s"
                       + (f", created {info['created']}" if info.get("created") else "")),
        ("sources", ", ".join(info.get("sources", [])) or "-"),
    ]
    width = max(len(name) for name, _ in rows) + 1
    for name, value in rows:
        print(f"{name + ':':<{width}} {value}")
    warnings = info.get("warnings", [])
    print(f"{'warnings:':<{width}} {'none' if not warnings else ''}".rstrip())
    for warning in warnings:
        print(f"  - {warning}")
    return 0


def run_serve(args) -> int:
    from ..serve import serve

    serve(args.indexes, host=args.host, port=args.port, api_key=args.api_key, max_upload_mb=args.max_upload_mb,
          max_k=args.max_k, model=args.model, log_level=args.log_level)
    return 0
