#!/usr/bin/env bash
# Trust-GRPO on the tiny Qwen2.5-VL, 2 CPU processes, hf rollout engine, tiny hyperparameters
# (docs/cpu_notes.md: lr 1e-4, KL 0.05, 16 prompts x 8 samples, ~32 new tokens).
# Usage: run_tiny_cpu.sh OUTPUT MODEL REGISTRY [TRM_URL] [extra main.py flags]
#   without TRM_URL (or with "none") it trains the GRPO baseline (no thinking reward).
set -euo pipefail
OUTPUT=${1:?output folder, e.g. outputs/tiny/step2}
MODEL=${2:?policy model dir}
REGISTRY=${3:?dataset_info.json}
TRM_URL=none
shift 3
if [[ $# -gt 0 && $1 != --* ]]; then TRM_URL=$1; shift; fi
STAGE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$(dirname "$STAGE")/.venv/bin/python}
if [ "$TRM_URL" = none ]; then REWARD=(--variant grpo); else REWARD=(--variant full --trm-url "$TRM_URL"); fi
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUTPUT"

"$(dirname "$PY")/deepspeed" --master_port "${MASTER_PORT:-29500}" --num_gpus 2 "$STAGE/main.py" \
  --model-path "$MODEL" --registry "$REGISTRY" --data-path tiny_train --eval-data-path tiny_test \
  --output-dir "$OUTPUT" --rollout-engine hf "${REWARD[@]}" \
  --num-generations 8 --rollout-batch-size 16 --micro-batch-size 32 --max-completion-length 32 \
  --max-prompt-length 512 --min-pixels 12544 --max-pixels 12544 --dtype float32 \
  --learning-rate 1e-4 --kl-coef 0.05 --entropy-coef 0 --max-steps 60 --save-every 20 --eval-every 20 \
  --eval-max-samples 200 --sample-every 10 "$@" 2>&1 | tee "$OUTPUT/training.log"
