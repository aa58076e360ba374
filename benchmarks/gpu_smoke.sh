#!/usr/bin/env bash
# Real ZeRO-3 Trust-GRPO steps on ONE GPU (NCCL, bf16, hf rollout engine), then step timings on a
# random-init model with Qwen2.5-VL-3B's shapes. Run from the repo root on a GPU machine:
#   bash benchmarks/gpu_smoke.sh [WORKDIR]        # prints metrics; writes WORKDIR/gpu_smoke.json
set -euo pipefail
WORK=${1:-/tmp/gpu_smoke}
PY=${PYTHON:-python3}
mkdir -p "$WORK"
export WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=${MASTER_PORT:-29511}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PY" demo/build_tiny_assets.py --out "$WORK/assets" --num-train 64 --num-test 16 > /dev/null
COMMON=(--registry "$WORK/assets/data/dataset_info.json" --data-path tiny_train --rollout-engine hf --variant grpo
        --dtype bfloat16 --num-generations 8 --rollout-batch-size 8 --micro-batch-size 16 --min-pixels 12544
        --max-pixels 12544 --learning-rate 1e-5 --kl-coef 0.04 --save-every 0 --max-prompt-length 512)
summary() {
  "$PY" - "$1" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
keys = ["step", "loss", "kl", "entropy", "reward/outcome", "completions/mean_length", "timing/rollout",
        "timing/update", "timing/sync", "step_time", "tokens_per_s"]
for r in rows:
    print("  ".join(f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in keys))
PY
}
echo "== tiny Qwen2.5-VL, 3 steps =="
t0=$(date +%s)
"$PY" step2_trust_grpo/main.py --model-path "$WORK/assets/model" --output-dir "$WORK/tiny" --max-steps 3 \
  --max-completion-length 32 "${COMMON[@]}" > "$WORK/tiny.log" 2>&1 || { tail -40 "$WORK/tiny.log"; exit 1; }
summary "$WORK/tiny"
echo "tiny run: $(( $(date +%s) - t0 )) s wall"
echo "== 3B-shaped random model, 3 steps, gradient checkpointing =="
"$PY" benchmarks/shaped_model.py --tiny "$WORK/assets/model" --shape 3b --output "$WORK/shaped3b"
t0=$(date +%s)
"$PY" step2_trust_grpo/main.py --model-path "$WORK/shaped3b" --output-dir "$WORK/b3" --max-steps 3 \
  --max-completion-length 128 --gradient-checkpointing "${COMMON[@]}" > "$WORK/b3.log" 2>&1 \
  || { tail -40 "$WORK/b3.log"; exit 1; }
summary "$WORK/b3"
echo "3B run: $(( $(date +%s) - t0 )) s wall (load, 3 steps, final HF save)"
nvidia-smi --query-gpu=memory.used --format=csv,noheader
