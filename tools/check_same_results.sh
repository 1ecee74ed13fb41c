#!/usr/bin/env bash
# Checks that a change did not move the demo's numbers: trains both demo recipes for a few fp32 steps from a
# clean export of BEFORE (default: HEAD~1) and of AFTER (default: the working tree), evaluates test-split
# retrieval, and compares final weights (SHA-256), every metrics.jsonl record (timing fields aside) and the
# retrieval JSON. Exit status 0 when all are the same.
#   bash tools/check_same_results.sh [BEFORE] [AFTER]        (STEPS=16 by default)
# fp32 so that it runs at the same speed on every CPU (bf16 is slow without AVX512-BF16 / AMX); a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
before=${1:-HEAD~1}
after=${2:-}
steps=${STEPS:-16}
py="$PWD/.venv/bin/python"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$work/before" "$work/after"
git archive "$before" | tar -x -C "$work/before"
if [ -n "$after" ]; then
  git archive "$after" | tar -x -C "$work/after"
else
  git ls-files -z --cached --others --exclude-standard | tar --null -T - -c | tar -x -C "$work/after"
fi
for side in before after; do
  for recipe in demo-emoji lit-minilm-emoji; do
    (cd "$work/$side" && PYTHONPATH="$work/$side" "$py" -m vlpretrain.cli.main train "recipes/$recipe.yaml" \
        train.max_steps="$steps" train.log_every=4 train.precision=no train.progress=false \
        train.output_dir="$work/$side/runs/$recipe" > "$work/$side/$recipe.log" 2>&1 &&
     PYTHONPATH="$work/$side" "$py" -m vlpretrain.cli.main eval retrieval --model "$work/$side/runs/$recipe/final" \
        --data emoji:test --no-progress --output "$work/$side/$recipe-test.json" > /dev/null)
  done
done
"$py" - "$work" <<'PY'
import hashlib, json, sys
work = sys.argv[1]
timing = {"samples_per_s", "elapsed_s"}
same = True
for recipe in ("demo-emoji", "lit-minilm-emoji"):
    def load(side):
        run = f"{work}/{side}/runs/{recipe}"
        weights = hashlib.sha256(open(f"{run}/final/model.safetensors", "rb").read()).hexdigest()
        records = [{k: v for k, v in json.loads(line).items() if k not in timing} for line in open(f"{run}/metrics.jsonl")]
        return weights, records, json.load(open(f"{work}/{side}/{recipe}-test.json"))["metrics"]
    before, after = load("before"), load("after")
    # A field one side added (a new counter) is listed, not a difference: the values both record must match.
    added = sorted({k for r in after[1] for k in r} - {k for r in before[1] for k in r})
    removed = sorted({k for r in before[1] for k in r} - {k for r in after[1] for k in r})
    shared = [[{k: v for k, v in r.items() if k not in added + removed} for r in side[1]] for side in (before, after)]
    checks = {"weights": before[0] == after[0], "metrics.jsonl": shared[0] == shared[1], "test retrieval": before[2] == after[2]}
    same &= all(checks.values())
    print(recipe, " ".join(f"{k}: {'same' if v else 'DIFFERENT'}" for k, v in checks.items()),
          f"(text->image R@1 {100 * after[2]['image_retrieval_recall@1']:.1f}%)",
          *([f"new metrics fields: {', '.join(added)}"] if added else []),
          *([f"removed metrics fields: {', '.join(removed)}"] if removed else []))
sys.exit(0 if same else 1)
PY
