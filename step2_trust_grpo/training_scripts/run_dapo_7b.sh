#!/usr/bin/env bash
# Trust-GRPO rewards (thinking reward, trust weight, annealing) trained the DAPO way (Yu et al. 2025), on
# Qwen2.5-VL-7B-Instruct, one node of 8 GPUs: clip-higher 0.2 / 0.28, dynamic sampling (zero-spread groups of the
# final reward refilled), the step-global token mean, the soft overlong penalty over the last 256 of 1,024 tokens,
# no KL term (DAPO's beta 0), and the truncated rollout importance weights of the vLLM engine (README.md "GRPO variants").
# Start the TRM first (step1_reward_model/training_scripts/serve_vllm.sh) and pass its URL.
# Usage: run_dapo_7b.sh OUTPUT MODEL REGISTRY DATA TRM_URL [extra main.py flags]
set -euo pipefail
(( $# >= 5 )) || { echo "usage: $(basename "$0") OUTPUT MODEL REGISTRY DATA TRM_URL [extra main.py flags]" >&2; exit 2; }
# the 7B launcher's recipe, with these flags after its own (argparse: the last value of a flag wins)
exec bash "$(dirname "$0")/run_qwen2_5_vl_7b.sh" "${@:1:5}" \
  --kl-coef 0 --clip-eps-low 0.2 --clip-eps-high 0.28 --dynamic-sampling --dynamic-sampling-max-rounds 4 \
  --loss-agg token-mean-global --overlong-buffer 256 --overlong-penalty 1.0 --rollout-is tis --rollout-is-cap 2 "${@:6}"
