#!/usr/bin/env bash
# README's comparison at equal wall-clock on the emoji corpus, 3 seeds each: the demo recipe, + SLIP, FLIP and
# LiT. Each setting trains MINUTES minutes per seed (steps from a probe run, tools/seeds.py --minutes), then
# test retrieval R@1 / R@10 and zero-shot category balanced accuracy; mean and standard deviation per setting.
# About 4 x (3 x (MINUTES + 1) + 1) minutes on 2 CPU cores; run alone.
#   bash tools/seeds_table.sh [MINUTES]   -> results/seeds_table.md / .json (the table), results/seeds_curves.png / .json
#                                            (seed 0's training curves from vlp plot)
set -euo pipefail
MINUTES="${1:-5}"
PY="${PYTHON:-.venv/bin/python}"
for setting in demo:recipes/demo-emoji.yaml slip:recipes/slip-emoji.yaml flip:recipes/flip-emoji.yaml \
               lit:recipes/lit-minilm-emoji.yaml; do
  name="${setting%%:*}"
  "$PY" tools/seeds.py --recipe "${setting#*:}" --label "$name" --seeds 0,1,2 --minutes "$MINUTES" \
      --out "runs/seeds/$name" --overwrite train.monitor_every=50
done
"$PY" tools/seeds.py --combine runs/seeds/demo runs/seeds/slip runs/seeds/flip runs/seeds/lit \
    --out results/seeds_table.md
"$PY" -m vlpretrain.cli.main plot runs/seeds/demo/seed_0 runs/seeds/slip/seed_0 runs/seeds/flip/seed_0 \
    runs/seeds/lit/seed_0 --labels demo,slip,flip,lit --out results/seeds_curves.png --overwrite
