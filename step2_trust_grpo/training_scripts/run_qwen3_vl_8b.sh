#!/usr/bin/env bash
# Trust-GRPO on Qwen3-VL-8B-Instruct, one node of 8 GPUs, with the paper's settings (docs/method.md): the 7B
# launcher's recipe with Qwen3-VL's pixel limits. Qwen3-VL resizes images to multiples of 32 (patch 16 x merge 2):
# 4096 / 1310720 give 4 to 1,280 image tokens, as 3136 / 1003520 do for Qwen2.5-VL's 28. Its model card recommends
# top_p 0.8, top_k 20, temperature 0.7 and presence_penalty 1.5 for chat; the rollouts do not inherit them (step 2
# sets every sampling field, here the GRPO defaults: temperature 1.0, no top-p/top-k cut). The 8B model unties its
# embeddings; the 2B and 4B tie them.
# Start the TRM first (step1_reward_model/training_scripts/serve_vllm.sh; any family) and pass its URL.
# Usage: run_qwen3_vl_8b.sh OUTPUT MODEL REGISTRY DATA TRM_URL [extra main.py flags, e.g. --variant wo-trust]
set -euo pipefail
(( $# >= 5 )) || { echo "usage: $(basename "$0") OUTPUT MODEL REGISTRY DATA TRM_URL [extra main.py flags]" >&2; exit 2; }
# these flags after the 7B launcher's own (argparse: the last value of a flag wins)
exec bash "$(dirname "$0")/run_qwen2_5_vl_7b.sh" "${@:1:5}" --min-pixels 4096 --max-pixels 1310720 "${@:6}"
