#!/usr/bin/env bash
# Label GRPO rollouts with Qwen2.5-VL-72B-Instruct as the judge (the paper's annotator), served by vLLM on
# 8 GPUs, then filter and balance the labels for TRM training (paper: 5k-15k rows per score interval).
# Usage: annotate_72b_judge.sh OUTPUT ROLLOUTS_JSONL [JUDGE_MODEL] [extra annotate.py flags]
#   ROLLOUTS_JSONL rows: question, response, images (paths relative to the file). Rerunning resumes.
#   Writes OUTPUT/labels.jsonl and OUTPUT/trm_train.jsonl (train_qwen2_5_vl_3b.sh's input); the judge server's
#   log is OUTPUT/judge_server.log.
set -euo pipefail
OUTPUT=${1:?output folder, e.g. outputs/trm_labels}
ROLLOUTS=${2:?rollouts JSONL (question, response, images)}
JUDGE=${3:-Qwen/Qwen2.5-VL-72B-Instruct}
shift $(( $# < 3 ? $# : 3 ))
STAGE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
PORT=${PORT:-8100}
READY_TIMEOUT=${READY_TIMEOUT:-1800}
mkdir -p "$OUTPUT"

vllm serve "$JUDGE" --served-model-name judge --port "$PORT" --tensor-parallel-size 8 \
  --max-model-len 8192 --limit-mm-per-prompt '{"image":2,"video":0}' --max-num-seqs 128 --generation-config vllm \
  &> "$OUTPUT/judge_server.log" &
SERVER=$!
trap 'kill -TERM "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT INT TERM

# Loading 72B weights takes minutes: poll /v1/models, give up after READY_TIMEOUT seconds.
for ((waited = 0; ; waited += 5)); do
  curl -sf "http://127.0.0.1:$PORT/v1/models" > /dev/null && break
  kill -0 "$SERVER" 2>/dev/null || { echo "judge server died, see $OUTPUT/judge_server.log" >&2; exit 1; }
  (( waited < READY_TIMEOUT )) || { echo "judge server not ready after ${READY_TIMEOUT}s" >&2; exit 1; }
  sleep 5
done

{
  "$PY" "$STAGE/annotate.py" --input "$ROLLOUTS" --output "$OUTPUT/labels.jsonl" \
    --judge-url "http://127.0.0.1:$PORT/v1" --judge-model judge --max-concurrency 64 --timeout 300 "$@"
  "$PY" "$STAGE/balance.py" --input "$OUTPUT/labels.jsonl" --output "$OUTPUT/trm_train.jsonl" --cap 15000 --min 5000
} 2>&1 | tee "$OUTPUT/training.log"
