#!/usr/bin/env bash
# Ablation (paper Table 3): an untrained instruct model as the TRM. Serve it first under the same
# name, e.g. step1_reward_model/training_scripts/serve_vllm.sh Qwen/Qwen2.5-VL-3B-Instruct PORT REGISTRY DATA,
# then pass its URL.
# Usage: wo_trained_trm.sh MODEL REGISTRY DATA UNTRAINED_TRM_URL [OUTPUT]
set -euo pipefail
bash "$(dirname "$0")/../run_qwen2_5_vl_7b.sh" "${1:?model}" "${2:?registry}" "${3:?data}" "${4:?untrained TRM URL}" \
  "${5:-outputs/ablation_wo_trained_trm}" --variant full
