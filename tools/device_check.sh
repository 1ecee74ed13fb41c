#!/usr/bin/env bash
# One short check on a lent GPU machine: the demo recipe trained on CUDA in bf16, then the training
# benchmark (vlp vs open_clip_train) on CUDA. Needs, carried beside the tree: .whl/ (open_clip_torch,
# ftfy, wcwidth, braceexpand, webdataset wheels) and .device/emoji-v1 (a built emoji corpus).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 VLP_CACHE_DIR="$PWD/.device"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, open_clip, timm, transformers, accelerate; print('torch', torch.__version__, 'open_clip', open_clip.__version__)"
python3 -m vlpretrain.cli.main demo --output-dir /tmp/gpu-demo train.progress=false > "$OUT/demo.log" 2>&1 || { tail -40 "$OUT/demo.log"; exit 1; }
grep -E "training|epoch 15 val|->|emoji test" "$OUT/demo.log"
cp /tmp/gpu-demo/test_retrieval.json "$OUT/demo_test_retrieval_cuda.json"
python3 - <<'PY' | tee "$OUT/demo_speed.txt"
import json
r = [json.loads(l) for l in open("/tmp/gpu-demo/metrics.jsonl") if '"samples_per_s"' in l]
print("demo-emoji on CUDA: median samples/s over logged intervals:", sorted(x["samples_per_s"] for x in r)[len(r) // 2])
PY
python3 tools/bench_train.py --device cuda --precision amp_bf16 --batch-size 256 --steps 60 --log-every 10 \
    --workers 4 --threads 8 --out "$OUT/bench_train_cuda_bf16.json"
