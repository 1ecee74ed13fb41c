"""Planted-bias check: train a small CLIP on people emoji whose captions of one skin tone carry an
extra word, and one on the same corpus without it; run the bias probes on both; write both reports and
a JSON of the flags and key statistics.

    python tools/planted_bias.py --out results/planted-bias          # about 3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def key_numbers(report: dict, word: str) -> dict:
    m = report["metrics"]
    out = {"flags": [{k: f[k] for k in ("probe", "test", "group", "p_adjusted", "control_p_value")} for f in m["flags"]]}
    out["association_effect_size"] = {n: g["effect_size"] for n, g in m["association"][word]["groups"].items()}
    out["association_p_adjusted"] = {n: g["p_adjusted"] for n, g in m["association"][word]["groups"].items()}
    out["sensitive_label_rate"] = {n: g["rate"] for n, g in m["harmful_labels"]["groups"].items()}
    out["harmful_label_p_adjusted"] = {n: g["p_adjusted"] for n, g in m["harmful_labels"]["groups"].items()}
    head = m["retrieval_skew"][word]["k=50"]
    out["top50_share"] = {n: g["share"] for n, g in head["groups"].items()}
    out["top50_p_adjusted"] = {n: g["p_adjusted"] for n, g in head["groups"].items()}
    out["top50_max_skew"] = head["max_skew"]
    return out


def main() -> int:
    from vlpretrain.evaluation.bias.planted import run_planted_check
    from vlpretrain.evaluation.tasks import write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/planted-bias", help="output folder")
    parser.add_argument("--word", default="criminal")
    parser.add_argument("--group", default="dark")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--name-tones", action="store_true",
                        help="keep the corpus' '...: dark skin tone' caption endings (the model then encodes tone "
                             "along every text direction; see README)")
    parser.add_argument("--control-words", choices=("pseudo", "vocabulary"), default="pseudo",
                        help="control texts of the probe (see vlp eval bias --help)")
    args = parser.parse_args()
    start = time.time()
    reports = run_planted_check(args.out, args.word, args.group, args.epochs, name_tones=args.name_tones,
                                control_words=args.control_words)
    summary = {"word": args.word, "group": args.group, "epochs": args.epochs, "name_tones": args.name_tones,
               "control_words": args.control_words,
               "seconds": round(time.time() - start, 1),
               **{kind: key_numbers(report, args.word) for kind, report in reports.items()}}
    path = write_json(summary, Path(args.out) / "planted_bias.json")
    print(json.dumps({k: summary[k]["flags"] for k in ("planted", "clean")}, indent=1))
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
