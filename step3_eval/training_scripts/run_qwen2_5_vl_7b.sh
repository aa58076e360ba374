#!/usr/bin/env bash
# Evaluate a Qwen2.5-VL-7B policy (e.g. step 2's final HF directory) on 8 GPUs with vLLM,
# greedy decoding and the paper's evaluation system prompt.
# Usage: run_qwen2_5_vl_7b.sh MODEL REGISTRY DATA_NAMES [OUTPUT]
set -euo pipefail
MODEL=${1:?model dir}
REGISTRY=${2:?dataset_info.json}
DATA=${3:?registry names, e.g. MathVista,ChartQA}
OUTPUT=${4:-outputs/step3_7b}
mkdir -p "$OUTPUT"
cd "$(dirname "$0")/../.."
deepspeed --num_gpus "${NUM_GPUS:-8}" step3_eval/main.py \
  --model-path "$MODEL" --registry "$REGISTRY" --data-path "$DATA" \
  --output-dir "$OUTPUT" --backend vllm --prompt-template eval \
  --batch-size 64 --max-new-tokens 2048 --max-model-len 16384 --dtype bfloat16 \
  --min-pixels 3136 --max-pixels 1003520 --attn-implementation auto &> "$OUTPUT/eval.log"
