#!/usr/bin/env bash
# Serve a trained TRM on one GPU behind the OpenAI-compatible API that step 2 (--trm-url) calls.
# Usage: serve_vllm.sh TRM_DIR [PORT] [extra vllm flags]     (pick the GPU with CUDA_VISIBLE_DEVICES)
#   8192 tokens of context: a 1,280-token image (max 1003520 pixels) + a 1,024-token response + the prompt, with room.
set -euo pipefail
MODEL=${1:?TRM directory: the final folder of step 1}
PORT=${2:-8000}
shift $(( $# < 2 ? $# : 2 ))

exec vllm serve "$MODEL" --served-model-name thinking-reward-model --host 0.0.0.0 --port "$PORT" \
  --dtype bfloat16 --max-model-len 8192 --limit-mm-per-prompt '{"image":2,"video":0}' \
  --gpu-memory-utilization 0.9 --max-num-seqs 256 --generation-config vllm "$@"
