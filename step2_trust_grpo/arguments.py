"""Step-2 command line. Defaults follow the paper (docs/method.md); the tiny launcher sets its own."""
import argparse

from sophiavl.utils.cli import InputError
from sophiavl.utils.arguments import (add_checkpoint_arguments, add_distributed_arguments, add_eval_arguments,
                                      add_logging_arguments, add_lora_arguments, add_model_arguments,
                                      add_optimizer_arguments, add_plan_argument, add_zero3_arguments,
                                      check_shared_args)
from sophiavl.utils.trm_client import normalize_base_url

from .loss import IMPORTANCE_LEVELS, KL_ESTIMATORS, LOSS_AGGREGATIONS, STEP_AGGREGATIONS

VARIANTS = {  # the paper's Table 3, one switch each: (thinking reward, trust weight, annealing)
    "full": (True, True, True),
    "wo-trust": (True, False, True),
    "wo-trust-and-annealing": (True, False, False),
    "grpo": (False, False, False),
}
# --reference-parity: the reference code's departures from the paper (docs/method.md, section 8)
REFERENCE_HORIZON = 12_000
REFERENCE_LR = 6e-7
GSPO_CLIP_EPS = (3e-4, 4e-4)  # low, high: the GSPO paper's, for its length-normalised sequence ratios


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Step 2: Trust-GRPO training of a Qwen2.5-VL policy under DeepSpeed ZeRO-3.")
    g = p.add_argument_group("model and data")
    g.add_argument("--model-path", required=True, help="HF directory of the initial policy")
    g.add_argument("--registry", required=True, help="dataset_info.json")
    g.add_argument("--data-path", required=True, help="registry name(s) to train on, comma-separated")
    g.add_argument("--eval-data-path", default=None, help="registry name(s) for held-out validation")
    g.add_argument("--output-dir", required=True)
    g.add_argument("--fatal-bad-rows", action="store_true",
                   help="stop at a row whose image cannot be decoded (default: replace it by the next readable row)")
    add_model_arguments(g)

    g = p.add_argument_group("rollout")
    g.add_argument("--rollout-engine", choices=["vllm", "hf"], default="vllm")
    g.add_argument("--num-generations", type=int, default=8, help="group size N")
    g.add_argument("--rollout-batch-size", type=int, default=128, help="prompts per step, all ranks together")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0: off")
    g.add_argument("--min-p", type=float, default=0.0, help="0: off")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="1: off. Every sampling setting goes to both engines explicitly; the checkpoint's "
                        "generation_config.json (Qwen2.5-VL: temperature 0.1, top_k 1, repetition_penalty 1.05) "
                        "is never used, only its stop tokens")
    g.add_argument("--max-prompt-length", type=int, default=4096,
                   help="longer prompts (tokens after the chat template, images included) are dropped at load time")
    g.add_argument("--max-completion-length", type=int, default=1024)
    g.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.4)
    g.add_argument("--vllm-tensor-parallel-size", type=int, default=1)
    g.add_argument("--vllm-sleep-mode", action="store_true", help="GPU only: free vLLM's memory during the update")
    g.add_argument("--vllm-max-model-len", type=int, default=None, help="default: prompt + completion length")
    g.add_argument("--warn-logp-gap", type=float, default=0.05,
                   help="warn (once) when the mean per-token |log-prob| gap between the vllm engine and the "
                        "trainer exceeds this (~1e-6 in fp32 when both see the same inputs)")

    g = p.add_argument_group("rewards (Trust-GRPO)")
    g.add_argument("--variant", choices=list(VARIANTS), default="full",
                   help="ablation of the paper's Table 3 (wo-trained-TRM: full with an untrained --trm-model)")
    g.add_argument("--trm-url", default=None, help="TRM server: http://host:port/v1 or a full /chat/completions URL")
    g.add_argument("--trm-model", default="thinking-reward-model")
    g.add_argument("--alpha", type=float, default=0.3, help="weight of the thinking reward")
    g.add_argument("--anneal-horizon", type=float, default=None, help="T in exp(-step/T); default: --max-steps")
    g.add_argument("--reference-parity", action="store_true",
                   help="reproduce the reference code: skip uniform groups and R^o<0.2, T=12000, lr 6e-7")
    g.add_argument("--trm-max-concurrency", type=int, default=64)
    g.add_argument("--trm-timeout", type=float, default=60.0, help="seconds per request")
    g.add_argument("--trm-max-retries", type=int, default=3)
    g.add_argument("--trm-max-images", type=int, default=None,
                   help="the TRM server's images-per-request cap (its --max-images): a request with more is not "
                        "sent and counts as a TRM failure (default: no cap known)")
    g.add_argument("--trm-max-failure-rate", type=float, default=0.5,
                   help="abort when more TRM requests than this fraction fail over the last --trm-failure-window steps")
    g.add_argument("--trm-failure-window", type=int, default=3)
    g.add_argument("--trm-overlap", action=argparse.BooleanOptionalAction, default=True,
                   help="send the step's TRM requests as soon as its completions exist and compute the reference and "
                        "old log-probs while they run (timing/reward is then the wait that remains); "
                        "--dynamic-sampling waits at once (it keeps groups by their rewards)")
    g.add_argument("--max-answer-chars", type=int, default=4096)
    g.add_argument("--strict-format", action="store_true",
                   help="outcome reward: only whitespace between </think> and <answer>, nothing after the last "
                        "</answer>, which is the one scored (default: the reference's gate, the first answer)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, default=1500, help="rollout + update steps")
    add_optimizer_arguments(g, learning_rate=None, learning_rate_help="default 5e-7 (6e-7 with --reference-parity)")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--ppo-epochs", type=int, default=1, help="passes over each rollout batch (TRL: num_iterations)")
    g.add_argument("--max-tokens-per-micro-batch", type=int, default=0,
                   help="0: micro-batches of --micro-batch-size completions; N: as many completions as fit N padded "
                        "tokens (prompt and images included), longest first, so that a few long completions do not "
                        "pad the rest; needs a step-global --loss-agg (token-mean-global or seq-mean-token-sum-norm)")
    g.add_argument("--kl-coef", type=float, default=0.04, help="beta; 0 skips the reference model")
    g.add_argument("--offload-reference", action="store_true",
                   help="ZeRO-3 offload of the frozen reference model's parameters to CPU memory (the policy's stay "
                        "where --offload puts them): its GPU share moves to the host, each layer is copied in for "
                        "the reference pass")
    g.add_argument("--entropy-coef", type=float, default=1e-3)
    add_zero3_arguments(g)
    add_plan_argument(g)

    g = p.add_argument_group("LoRA (README: LoRA); the reference policy is then the base model, adapters disabled")
    add_lora_arguments(g)

    g = p.add_argument_group("GRPO variants (README: GRPO variants); the defaults are the paper's Trust-GRPO")
    g.add_argument("--loss-agg", choices=LOSS_AGGREGATIONS, default="token-mean",
                   help="token-mean: over each micro-batch's completion tokens (the reference); seq-mean-token-mean: "
                        "over each completion's tokens, then over completions; seq-mean-token-sum-norm (Dr. GRPO): "
                        "the step's token sum / (completions x --max-completion-length), TRL's constant (verl "
                        "divides by --max-completion-length only); token-mean-global (DAPO): over every "
                        "completion token of the step, all micro-batches and ranks together")
    g.add_argument("--scale-rewards", choices=["group", "none"], default="group",
                   help="advantages: group: (R - group mean) / (group std + 1e-6); none (Dr. GRPO): R - group mean")
    g.add_argument("--clip-eps", type=float, default=None,
                   help="symmetric clip, shorthand for equal --clip-eps-low/-high (default 0.2; with "
                        "--importance-level sequence GSPO's 3e-4 / 4e-4)")
    g.add_argument("--clip-eps-low", type=float, default=None, help="ratio clipped below at 1 - this")
    g.add_argument("--clip-eps-high", type=float, default=None,
                   help="ratio clipped above at 1 + this (DAPO's clip-higher: 0.28 with --clip-eps-low 0.2)")
    g.add_argument("--importance-level", choices=IMPORTANCE_LEVELS, default="token",
                   help="token: a ratio pi/pi_old per token (the reference); sequence (GSPO): every token gets its "
                        "completion's length-normalised ratio, the geometric mean of its token ratios, clipped by "
                        "--clip-eps-low/-high (then 3e-4 / 4e-4 by default) and aggregated by --loss-agg: "
                        "seq-mean-token-mean is GSPO's objective, the others weight completions by length. The "
                        "raw product of token ratios (the paper's eq. 7, docs/method.md) is not offered")
    g.add_argument("--kl-estimator", choices=KL_ESTIMATORS, default="k3",
                   help="per-token KL(pi || pi_ref): k1 log-ratio, k2 its square / 2, k3 the reference's low-variance "
                        "estimator")
    g.add_argument("--kl-in-reward", action="store_true",
                   help="no KL loss term: subtract --kl-coef x the estimate summed over each completion's tokens "
                        "(pi_old against the reference) from its final reward, after the trust weighting and "
                        "before the group normalisation")
    g.add_argument("--rollout-is", choices=["none", "tis"], default="none",
                   help="tis: weight each token's policy loss by min(pi_old / pi_rollout, --rollout-is-cap), "
                        "pi_rollout from the vllm engine's log-probs (truncated importance sampling)")
    g.add_argument("--rollout-is-cap", type=float, default=2.0, help="C of --rollout-is tis (TIS and verl: 2)")
    g.add_argument("--overlong-buffer", type=int, default=0,
                   help="L of DAPO's soft overlong punishment: a completion longer than --max-completion-length - L "
                        "tokens loses --overlong-penalty x (its length - (max - L)) / L from its reward, after the "
                        "trust weighting, before the group normalisation (0: off)")
    g.add_argument("--overlong-penalty", type=float, default=1.0, help="P of --overlong-buffer (DAPO: 1)")
    g.add_argument("--mask-truncated", action="store_true",
                   help="no loss (policy, KL, entropy) on completions cut at --max-completion-length without a stop "
                        "token; their rewards still count in their group's mean and std")
    g.add_argument("--dynamic-sampling", action="store_true",
                   help="DAPO: drop the groups whose final reward (after trust weighting and overlong shaping, "
                        "before a --kl-in-reward penalty) has zero spread, and draw more prompts until every rank "
                        "has its share of --rollout-batch-size. Decided on the final reward, not the outcome: "
                        "under Trust-GRPO a group of equal outcomes still has a thinking-reward spread")
    g.add_argument("--dynamic-sampling-max-rounds", type=int, default=4,
                   help="rounds of sampling per step, the first included; a rank still short after them fills "
                        "its batch with zero-spread groups (counted)")

    g = p.add_argument_group("logging and checkpoints")
    add_checkpoint_arguments(g, save_every=100)  # step 2 also checkpoints its last step (unless --save-every 0)
    add_distributed_arguments(g)
    add_eval_arguments(g)
    g.add_argument("--sample-every", type=int, default=10, help="log sample completions every K steps")
    g.add_argument("--log-completions", action="store_true",
                   help="every completion of every step, with its rewards and its group's gamma, to "
                        "completions/rank<R>.jsonl (for analysis, e.g. experiments/ablations.py)")
    add_logging_arguments(g)
    args = p.parse_args(argv)

    args.use_thinking_reward, args.use_trust, args.use_anneal = VARIANTS[args.variant]
    if args.learning_rate is None:
        args.learning_rate = REFERENCE_LR if args.reference_parity else 5e-7
    if args.anneal_horizon is None:
        args.anneal_horizon = REFERENCE_HORIZON if args.reference_parity else args.max_steps
    level_eps = GSPO_CLIP_EPS if args.importance_level == "sequence" else (0.2, 0.2)
    args.clip_eps_low = next(e for e in (args.clip_eps_low, args.clip_eps, level_eps[0]) if e is not None)
    args.clip_eps_high = next(e for e in (args.clip_eps_high, args.clip_eps, level_eps[1]) if e is not None)
    args.clip_eps = args.clip_eps_low if args.clip_eps_low == args.clip_eps_high else None
    return args


def check_args(args, world_size: int) -> None:
    """Cross-flag checks, before any model is loaded."""
    positive = ["num_generations", "rollout_batch_size", "max_completion_length", "max_prompt_length", "max_steps",
                "ppo_epochs", "sample_every", "trm_max_concurrency",
                "trm_failure_window", "trm_timeout", "max_answer_chars", "anneal_horizon",
                "vllm_tensor_parallel_size"]
    check_shared_args(args)
    for name in positive:
        if not getattr(args, name) > 0:  # "not > 0" also rejects nan
            raise InputError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not args.alpha >= 0:
        raise InputError(f"--alpha must be >= 0, got {args.alpha}")
    if args.trm_max_retries < 0:
        raise InputError(f"--trm-max-retries must be >= 0, got {args.trm_max_retries}")
    if args.trm_max_images is not None and args.trm_max_images < 0:
        raise InputError(f"--trm-max-images must be >= 0, got {args.trm_max_images}")
    if args.rollout_batch_size % world_size:
        raise InputError(f"--rollout-batch-size {args.rollout_batch_size} must be divisible by the "
                         f"{world_size} ranks (each rank rolls out whole groups)")
    if args.max_tokens_per_micro_batch < 0:
        raise InputError(f"--max-tokens-per-micro-batch must be >= 0, got {args.max_tokens_per_micro_batch}")
    if args.max_tokens_per_micro_batch and args.loss_agg not in STEP_AGGREGATIONS:
        raise InputError(f"--max-tokens-per-micro-batch regroups completions by length, which changes the per-micro-"
                         f"batch mean of --loss-agg {args.loss_agg}: use a step-global one "
                         f"({' or '.join(STEP_AGGREGATIONS)})")
    samples_per_rank = args.rollout_batch_size // world_size * args.num_generations
    if samples_per_rank % args.micro_batch_size:
        raise InputError(f"the {samples_per_rank} completions per rank (rollout batch / ranks x N) must be "
                         f"divisible by --micro-batch-size {args.micro_batch_size}")
    if args.use_thinking_reward and not args.trm_url:
        raise InputError(f"--variant {args.variant} uses the thinking reward: give --trm-url (or --variant grpo)")
    if args.use_thinking_reward:
        try:
            normalize_base_url(args.trm_url)
        except InputError as err:
            raise InputError(f"--trm-url: {err}") from None
    if not 0 <= args.trm_max_failure_rate <= 1:
        raise InputError(f"--trm-max-failure-rate must be in [0, 1], got {args.trm_max_failure_rate}")
    if not args.temperature > 0:
        raise InputError("--temperature must be > 0: GRPO needs sampled, different completions")
    if not 0 < args.top_p <= 1:
        raise InputError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise InputError(f"--top-k must be >= 0 (0: off), got {args.top_k}")
    if not 0 <= args.min_p < 1:
        raise InputError(f"--min-p must be in [0, 1), got {args.min_p}")
    if not args.repetition_penalty > 0:
        raise InputError(f"--repetition-penalty must be > 0 (1: off), got {args.repetition_penalty}")
    if args.vllm_sleep_mode and args.rollout_engine != "vllm":
        raise InputError("--vllm-sleep-mode needs --rollout-engine vllm")
    if args.vllm_tensor_parallel_size > 1 and world_size % args.vllm_tensor_parallel_size:
        raise InputError(f"{world_size} ranks are not divisible by --vllm-tensor-parallel-size "
                         f"{args.vllm_tensor_parallel_size}")
    if args.vllm_tensor_parallel_size > 1 and args.rollout_engine != "vllm":
        raise InputError("--vllm-tensor-parallel-size needs --rollout-engine vllm")
    check_variant_args(args)


def check_variant_args(args) -> None:
    """The GRPO-variant flags."""
    if not (0 <= args.clip_eps_low < 1 and args.clip_eps_high >= 0):
        raise InputError(f"the clip range needs 0 <= --clip-eps-low < 1 and --clip-eps-high >= 0, got "
                         f"{args.clip_eps_low} and {args.clip_eps_high}")
    if args.offload_reference and not args.kl_coef > 0:
        raise InputError("--offload-reference: --kl-coef 0 has no reference model to offload")
    if args.offload_reference and args.lora_rank:
        raise InputError("--offload-reference: with --lora-rank the reference is the policy with its adapters "
                         "disabled, there is no copy to offload")
    if args.kl_in_reward and not args.kl_coef > 0:
        raise InputError("--kl-in-reward subtracts --kl-coef x KL from the rewards: give --kl-coef > 0")
    if args.rollout_is != "none" and args.rollout_engine != "vllm":
        raise InputError(f"--rollout-is {args.rollout_is} weights by the rollout engine's log-probs, which "
                         f"--rollout-engine {args.rollout_engine} does not report: use --rollout-engine vllm")
    if not args.rollout_is_cap > 0:
        raise InputError(f"--rollout-is-cap must be > 0, got {args.rollout_is_cap}")
    if not 0 <= args.overlong_buffer < args.max_completion_length:
        raise InputError(f"--overlong-buffer must be in [0, --max-completion-length {args.max_completion_length}), "
                         f"got {args.overlong_buffer}")
    if not args.overlong_penalty >= 0:
        raise InputError(f"--overlong-penalty must be >= 0, got {args.overlong_penalty}")
    if args.dynamic_sampling_max_rounds < 1:
        raise InputError(f"--dynamic-sampling-max-rounds must be >= 1, got {args.dynamic_sampling_max_rounds}")
    if args.dynamic_sampling and args.num_generations < 2:
        raise InputError("--dynamic-sampling keeps groups whose rewards differ: it needs --num-generations >= 2")
