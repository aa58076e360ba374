#!/usr/bin/env bash
# Serve a trained TRM on one GPU behind the OpenAI-compatible API that step 2 (--trm-url) calls.
# Usage: serve_vllm.sh TRM_DIR PORT REGISTRY DATA [extra vllm flags]     (pick the GPU with CUDA_VISIBLE_DEVICES)
#   REGISTRY DATA: step 2's --registry and --data-path. Step 2 sends all of a prompt's images, and vLLM answers a
#   request with more than its --limit-mm-per-prompt with HTTP 400 (that group's R^t is then 0 at every step), so
#   the server takes the most images any of those prompts has; give step 2 the printed --trm-max-images.
#   8192 tokens of context: a 1,280-token image (max 1003520 pixels) + a 1,024-token response + the prompt, with room
#   (prompts of several large images need a longer --max-model-len).
set -euo pipefail
MODEL=${1:?TRM directory: the final folder of step 1}
PORT=${2:?port, e.g. 8000}
REGISTRY=$(realpath "${3:?step 2 --registry: dataset_info.json}")
DATA=${4:?step 2 --data-path: registry names, e.g. SophiaVL-R1-130k}
shift 4
PY=${PYTHON:-python}
MAX_IMAGES=$("$PY" -c 'import sys; from sophiavl.utils.cli import exit_on_input_error as e
from sophiavl.utils.data import max_images_per_prompt as most; print(e(most)(sys.argv[2], sys.argv[1]))' "$REGISTRY" "$DATA")
echo "TRM server: at most $MAX_IMAGES images per request (the most of any prompt in $DATA); give step 2 --trm-max-images $MAX_IMAGES"

exec vllm serve "$MODEL" --served-model-name thinking-reward-model --host 0.0.0.0 --port "$PORT" \
  --dtype bfloat16 --max-model-len 8192 --limit-mm-per-prompt "{\"image\":$MAX_IMAGES,\"video\":0}" \
  --gpu-memory-utilization 0.9 --max-num-seqs 256 --generation-config vllm "$@"
