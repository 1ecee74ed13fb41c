#!/usr/bin/env bash
# The checks that need a GPU, as one short script for a lent GPU machine; results as JSON under $OUT
# (default results/device/). CHECKS picks which run (default: all of them, in this order):
#   demo       the demo recipe trained on CUDA in bf16 (test retrieval JSON, median samples/s)
#   bench      tools/bench_train.py on CUDA: pairs/s and torch.cuda.max_memory_allocated, vlp vs open_clip_train
#   vitb32     the same at open_clip's ViT-B/32 (224 px, batch 256, bf16) with --flops: achieved TFLOP/s and MFU
#   fsdp       3 steps under FSDP (recipes/accelerate/fsdp.yaml) against DDP on min(2, GPUs) GPUs, fp32:
#              losses and weights side by side, each run's max_memory_allocated; final/ loads
#   deepspeed  a 3-step DeepSpeed ZeRO-2 launch (recipes/accelerate/deepspeed-zero2.yaml); skipped with the
#              reason when deepspeed does not import
# Needs, carried beside the tree: .whl/ (open_clip_torch, ftfy, wcwidth, braceexpand, webdataset wheels; add a
# deepspeed wheel for that check) and, for demo, .device/emoji-v1 (a built emoji corpus).
#   CHECKS="fsdp deepspeed" bash tools/device_check.sh
set -euo pipefail
CHECKS="${CHECKS:-demo bench vitb32 fsdp deepspeed}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 VLP_CACHE_DIR="$PWD/.device"
OUT="${OUT:-results/device}"; mkdir -p "$OUT"
WORK="$(mktemp -d /tmp/device-check.XXXXXX)"; trap 'rm -rf "$WORK"' EXIT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
GPUS=$(nvidia-smi -L | wc -l)
python3 -c "import torch, open_clip, timm, transformers, accelerate; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'accelerate', accelerate.__version__)"
launch() { python3 -m accelerate.commands.launch "$@"; }
wants() { [[ " $CHECKS " == *" $1 "* ]]; }

if wants demo; then
    python3 -m vlpretrain.cli.main demo --output-dir "$WORK/gpu-demo" train.progress=false > "$OUT/demo.log" 2>&1 \
        || { tail -40 "$OUT/demo.log"; exit 1; }
    grep -E "training|epoch 15 val|->|emoji test" "$OUT/demo.log"
    cp "$WORK/gpu-demo/test_retrieval.json" "$OUT/demo_test_retrieval_cuda.json"
    python3 - "$WORK/gpu-demo/metrics.jsonl" <<'PY' | tee "$OUT/demo_speed.txt"
import json, sys
r = [json.loads(l) for l in open(sys.argv[1]) if '"samples_per_s"' in l]
print("demo-emoji on CUDA: median samples/s over logged intervals:", sorted(x["samples_per_s"] for x in r)[len(r) // 2])
PY
fi

if wants bench; then
    # Records pairs/s and max_memory_allocated (GPU) beside peak RSS for both trainers.
    python3 tools/bench_train.py --device cuda --precision amp_bf16 --batch-size 256 --steps 60 --log-every 10 \
        --workers 4 --threads 8 --out "$OUT/bench_train_cuda_bf16.json"
fi

if wants vitb32; then
    # A model of the size GPUs are bought for: both trainers' model FLOPs utilization of the card's bf16 peak.
    VITB32="$(python3 -c "import open_clip, pathlib; print(pathlib.Path(open_clip.__file__).parent / 'model_configs' / 'ViT-B-32.json')")"
    python3 tools/bench_train.py --device cuda --precision amp_bf16 --model-config "$VITB32" --batch-size 256 \
        --steps 60 --log-every 10 --workers 8 --threads 8 --flops --out "$OUT/bench_train_vitb32_cuda_bf16.json"
fi

# A tiny corpus and a 3-step recipe (tests/helpers.py builds both in a second).
tiny_recipe() {  # tiny_recipe NAME [key=value ...]: writes $WORK/NAME.yaml training into $WORK/NAME
    python3 - "$WORK" "$@" <<'PY'
import sys, yaml
from pathlib import Path
sys.path.insert(0, "tests")
from helpers import tiny_recipe, write_image_csv
work, name, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
csv = work / "pairs.csv"
if not csv.exists():
    write_image_csv(work, 64)
recipe = tiny_recipe(work / name, csv, batch_size=8, max_steps=3, precision="no", threads=4)
for item in overrides:
    key, value = item.split("=", 1)
    recipe["train"][key] = yaml.safe_load(value)
(work / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
PY
}

if wants fsdp; then
    N=$(( GPUS < 2 ? GPUS : 2 ))
    tiny_recipe ddp checkpoint_every=2 keep_checkpoints=5
    tiny_recipe fsdp checkpoint_every=2 keep_checkpoints=5
    status=0
    launch --config_file recipes/accelerate/multi-gpu.yaml --num_processes "$N" --mixed_precision no \
        -m vlpretrain.cli.main train "$WORK/ddp.yaml" > "$OUT/fsdp_check_ddp.log" 2>&1 || status=$?
    launch --config_file recipes/accelerate/fsdp.yaml --num_processes "$N" --mixed_precision no \
        -m vlpretrain.cli.main train "$WORK/fsdp.yaml" > "$OUT/fsdp_check_fsdp.log" 2>&1 || status=$?
    [ "$status" = 0 ] || tail -30 "$OUT/fsdp_check_fsdp.log" "$OUT/fsdp_check_ddp.log"
    python3 - "$WORK" "$N" "$status" "$OUT/fsdp_vs_ddp_cuda.json" <<'PY'
import json, sys
from pathlib import Path
work, n, status, out = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
result = {"check": "fsdp_vs_ddp", "gpus": n, "steps": 3, "precision": "fp32", "exit_status": status,
          "command": f"accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes {n} "
                     "--mixed_precision no -m vlpretrain.cli.main train RECIPE (against multi-gpu.yaml)"}
if status == 0:
    import torch
    from safetensors.torch import load_file
    import vlpretrain
    records = {name: [json.loads(l) for l in open(work / name / "metrics.jsonl") if '"loss"' in l]
               for name in ("ddp", "fsdp")}
    weights = {name: load_file(str(work / name / "final" / "model.safetensors")) for name in ("ddp", "fsdp")}
    diffs = {k: (weights["fsdp"][k] - weights["ddp"][k]).abs().max().item() for k in weights["ddp"]}
    worst = max(diffs, key=diffs.get)
    result.update(
        losses={name: [r["loss"] for r in rs] for name, rs in records.items()},
        max_loss_difference=max(abs(a["loss"] - b["loss"]) for a, b in zip(records["ddp"], records["fsdp"])),
        max_weight_difference=diffs[worst], worst_weight=worst,
        max_memory_allocated_mib={name: rs[-1].get("max_memory_allocated_mib") for name, rs in records.items()},
        final_loads=bool(vlpretrain.load_model(str(work / "fsdp" / "final")) is not None),
        sharded_checkpoint=sorted(p.name for p in (work / "fsdp" / "checkpoints" / "step_00000002").iterdir()))
    result["within_1e-4"] = result["max_loss_difference"] <= 1e-4 and result["max_weight_difference"] <= 1e-4
out.write_text(json.dumps(result, indent=1))
print(json.dumps({k: v for k, v in result.items() if k != "sharded_checkpoint"}))
PY
fi

if wants deepspeed; then
    if python3 -c "import deepspeed" > "$WORK/deepspeed_import.txt" 2>&1; then
        tiny_recipe zero2 precision=bf16  # as the config's mixed_precision
        status=0
        launch --config_file recipes/accelerate/deepspeed-zero2.yaml --num_processes "$GPUS" \
            -m vlpretrain.cli.main train "$WORK/zero2.yaml" > "$OUT/deepspeed_zero2.log" 2>&1 || status=$?
        python3 - "$WORK" "$status" "$GPUS" "$OUT/deepspeed_zero2.json" <<'PY'
import json, sys
from pathlib import Path
work, status, gpus, out = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
metrics = work / "zero2" / "metrics.jsonl"
records = [json.loads(l) for l in open(metrics) if '"loss"' in l] if metrics.exists() else []
result = {"check": "deepspeed_zero2", "gpus": gpus, "exit_status": status, "steps_logged": len(records),
          "losses": [r["loss"] for r in records],
          "max_memory_allocated_mib": records[-1].get("max_memory_allocated_mib") if records else None,
          "final_written": (work / "zero2" / "final" / "model.safetensors").exists()}
out.write_text(json.dumps(result, indent=1))
print(json.dumps(result))
PY
    else
        python3 - "$OUT/deepspeed_zero2.json" "$(tail -1 "$WORK/deepspeed_import.txt")" <<'PY'
import json, sys
json.dump({"check": "deepspeed_zero2", "skipped": f"deepspeed does not import here: {sys.argv[2]}"},
          open(sys.argv[1], "w"), indent=1)
print("deepspeed_zero2 skipped:", sys.argv[2])
PY
    fi
fi
echo "results under $OUT"
