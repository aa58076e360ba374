#!/usr/bin/env bash
# Evaluate a Qwen2.5-VL-7B policy (e.g. step 2's final HF directory) on 8 GPUs with vLLM,
# greedy decoding and the paper's evaluation system prompt.
# Usage: run_qwen2_5_vl_7b.sh OUTPUT MODEL REGISTRY DATA_NAMES [extra main.py flags]
set -euo pipefail
OUTPUT=${1:?output folder, e.g. outputs/step3_7b}
MODEL=${2:?model dir}
REGISTRY=${3:?dataset_info.json}
DATA=${4:?registry names, e.g. MathVista,ChartQA}
shift 4
STAGE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUTPUT"

deepspeed --num_gpus "${NUM_GPUS:-8}" "$STAGE/main.py" \
  --model-path "$MODEL" --registry "$REGISTRY" --data-path "$DATA" \
  --output-dir "$OUTPUT" --backend vllm --prompt-template eval \
  --batch-size 64 --max-new-tokens 2048 --max-model-len 16384 --dtype bfloat16 \
  --min-pixels 3136 --max-pixels 1003520 --attn-implementation auto "$@" 2>&1 | tee "$OUTPUT/training.log"
