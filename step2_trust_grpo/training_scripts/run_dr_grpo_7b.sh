#!/usr/bin/env bash
# Dr. GRPO (Liu et al. 2025) with the thinking reward: the paper's Trust-GRPO run on Qwen2.5-VL-7B-Instruct with
# the two biases Dr. GRPO removes gone: advantages not divided by the group's std, and the loss a token sum over
# (completions x --max-completion-length) instead of per-response means (README.md "GRPO variants"). Everything else,
# the KL term and the trust-weighted, annealed thinking reward included, is the paper's.
# Start the TRM first (step1_reward_model/training_scripts/serve_vllm.sh) and pass its URL.
# Usage: run_dr_grpo_7b.sh OUTPUT MODEL REGISTRY DATA TRM_URL [extra main.py flags]
set -euo pipefail
(( $# >= 5 )) || { echo "usage: $(basename "$0") OUTPUT MODEL REGISTRY DATA TRM_URL [extra main.py flags]" >&2; exit 2; }
# the 7B launcher's recipe, with these flags after its own (argparse: the last value of a flag wins)
exec bash "$(dirname "$0")/run_qwen2_5_vl_7b.sh" "${@:1:5}" --scale-rewards none --loss-agg seq-mean-token-sum-norm "${@:6}"
