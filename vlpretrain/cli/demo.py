"""``vlp demo``: build the offline emoji corpus, train the demo recipe, report test-split retrieval."""

from __future__ import annotations

from pathlib import Path


def find_recipe(name: str) -> Path:
    """A recipe by path, or by name from ./recipes or the recipes/ folder beside the package."""
    path = Path(name)
    if path.is_file():
        return path
    file_name = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    for folder in (Path.cwd() / "recipes", Path(__file__).resolve().parents[2] / "recipes"):
        if (folder / file_name).is_file():
            return folder / file_name
    raise FileNotFoundError(f"recipe '{name}' not found in ./recipes or beside the package")


def add_parser(commands) -> None:
    p = commands.add_parser(
        "demo", help="train a small CLIP on the offline emoji corpus and report retrieval recall",
        description="Builds the emoji corpus (twemoji graphics + Unicode names, split by base emoji), trains "
                    "the recipe (default: demo-emoji, about 5 minutes on 2 CPU cores) and prints test-split "
                    "Recall@1/5/10 in both directions beside chance, then indexes the whole emoji corpus with "
                    "FAISS and answers a text query. Results go to OUTPUT_DIR/test_retrieval.json and "
                    "OUTPUT_DIR/index (query it again with `vlp index query OUTPUT_DIR/index --text ...`).")
    p.add_argument("--recipe", default="demo-emoji", help="recipe name or path (default: demo-emoji)")
    p.add_argument("--output-dir", default=None, help="where to write the run (default: the recipe's train.output_dir)")
    p.add_argument("--query", default="a smiling cat",
                   help="text query answered from the emoji index at the end (default: 'a smiling cat')")
    p.add_argument("--no-index", action="store_true", help="skip building the emoji index")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. train.epochs=2")
    p.set_defaults(run=run)


def format_retrieval_table(metrics: dict, ks=(1, 5, 10)) -> str:
    lines = [f"{'direction':<22}" + "".join(f"{'R@' + str(k):>8}{'chance':>8}" for k in ks)]
    for label, key in (("text -> image", "image_retrieval"), ("image -> text", "text_retrieval")):
        cells = "".join(f"{100 * metrics[f'{key}_recall@{k}']:7.1f}%{100 * metrics[f'chance_{key}_recall@{k}']:7.1f}%"
                        for k in ks)
        lines.append(f"{label:<22}{cells}")
    return "\n".join(lines)


def run(args) -> int:
    from ..config import load_recipe
    from ..data import build_emoji_corpus
    from ..evaluation.tasks import evaluate_retrieval
    from ..io import write_json
    from ..models import load_model
    from ..training import train
    from ..data.named import open_named_corpus

    recipe_path = find_recipe(args.recipe)
    # The demo owns its run folder: running it again starts over (so `make demo` is repeatable).
    overrides = ["train.overwrite=true", *args.overrides]
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    cfg = load_recipe(recipe_path, overrides)
    root = build_emoji_corpus()
    print(f"emoji corpus: {root}")
    result = train(cfg)

    model = load_model(result.final_dir)
    report = evaluate_retrieval(model, open_named_corpus("emoji:test", cfg.data), model_name=recipe_path.stem,
                                dataset_name="emoji-test")
    report["pretrained"] = str(result.final_dir)
    metrics = report["metrics"]
    out = write_json(report, Path(cfg.train.output_dir) / "test_retrieval.json")
    print(f"\nemoji test split: {metrics['num_images']} images, {metrics['num_texts']} captions "
          f"({recipe_path.stem}, {result.step} steps)")
    print(format_retrieval_table(metrics))
    print(f"\nwritten: {out}")
    if not args.no_index:
        index_dir = Path(cfg.train.output_dir) / "index"
        demo_index(model, str(result.final_dir), index_dir, args.query, cfg.data)
        import shlex

        served = shlex.quote(f"{Path(cfg.train.output_dir).name}={index_dir}")
        print(f"\nsearch it in a browser: vlp index serve {served}   (then open http://127.0.0.1:8000/)")
    return 0


def demo_index(model, spec: str, out: Path, query: str, data_cfg, k: int = 5) -> None:
    """Index every emoji image (train, val and test) and print the top ``k`` images for ``query``."""
    from ..retrieval import RetrievalIndex
    from ..data.named import open_named_corpus

    # The demo starts over each time: an export left by an interrupted earlier run (another model) goes.
    index = RetrievalIndex.build_from_corpus(model, open_named_corpus("emoji:all", data_cfg), out, spec=spec,
                                             data_spec="emoji:all", fresh=True)
    print(f"\nindex: {out} ({index.ntotal} images, {index.info['kind']}); query {query!r}:")
    for hit in index.search(texts=[query], k=k)[0]:
        print(f"  {hit['rank']}. {hit['score']:.3f}  {hit['caption']}  ({Path(hit['image']).name})")
