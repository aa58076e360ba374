"""Command-line groups that two or more stages share: one definition, one meaning and one validation rule each
(check_shared_args). Each stage adds only its own flags (step1_reward_model/main.py, step2_trust_grpo/arguments.py,
step3_eval/main.py)."""
import argparse

from sophiavl.utils.cli import InputError
from sophiavl.utils.lora import LORA_TARGETS, parse_targets

TRAINING_PIXELS = (3136, 1003520)  # steps 1 and 2: --min-pixels, --max-pixels


def add_model_arguments(group, *, pixels=TRAINING_PIXELS, training: bool = True) -> None:
    """Model, pixels and dtype. `pixels`: the default (min, max); (None, None) keeps the model's own processor
    config (step 3 evaluates a checkpoint with the limits it was trained with). `training`: the flags of a model
    that is trained (steps 1 and 2)."""
    kept = " (default: the model's processor config)"
    group.add_argument("--min-pixels", type=int, default=pixels[0],
                       help="image size floor (pixels) for the processor" + ("" if pixels[0] else kept))
    group.add_argument("--max-pixels", type=int, default=pixels[1],
                       help="image size cap (pixels) for the processor" + ("" if pixels[1] else kept))
    group.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    group.add_argument("--attn-implementation", default="auto",
                       help="auto: flash_attention_2 on CUDA when flash_attn imports, else sdpa; or any name "
                            "transformers knows (sdpa, eager, flash_attention_2)")
    if training:
        group.add_argument("--gradient-checkpointing", action="store_true")
        group.add_argument("--freeze-vision-tower", action="store_true")


def add_zero3_arguments(group) -> None:
    """ZeRO-3 memory settings of the trained models (steps 1 and 2)."""
    group.add_argument("--offload", action="store_true", help="ZeRO-3 offload of parameters and optimizer to CPU "
                       "(the optimizer is then DeepSpeed's CPU Adam, an op built on first use)")
    group.add_argument("--zero-param-persistence-threshold", type=int, default=10_000,
                       help="parameters smaller than this stay unsharded; 0 shards every parameter (tests)")


def add_lora_arguments(group) -> None:
    """LoRA adapters instead of full fine-tuning (steps 1 and 2; utils/lora.py)."""
    group.add_argument("--lora-rank", type=int, default=0,
                       help="r of LoRA adapters on the language model (peft), trained instead of the whole model: "
                            "the base weights and the vision tower stay frozen (0: full fine-tuning)")
    group.add_argument("--lora-alpha", type=float, default=None,
                       help="LoRA's alpha: the update is (alpha / r) B A (default: 2 x --lora-rank)")
    group.add_argument("--lora-target-modules", default=",".join(LORA_TARGETS),
                       help="comma-separated names of the language model's linear layers that get adapters (default: "
                            "every projection of attention and MLP; the vision tower's layers never do)")
    group.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    group.add_argument("--lora-save-adapter", action="store_true",
                       help="also save the adapter alone (peft's format) in OUTPUT/final/adapter; final/ itself is "
                            "always the merged model")


def add_plan_argument(group) -> None:
    """--plan: the run's memory plan (utils/memory_plan.py) instead of the run (steps 1 and 2)."""
    group.add_argument("--plan", action="store_true",
                       help="print this command line's memory plan per GPU and node (docs/memory_plan.md) and exit, "
                            "reading only the model's config.json (a hub name: the shipped config of that name); "
                            "for the GPUs of WORLD_SIZE and LOCAL_WORLD_SIZE, as the deepspeed launcher sets them")


def add_optimizer_arguments(group, *, learning_rate: float | None, learning_rate_help: str | None = None) -> None:
    """AdamW, clipping, micro-batches and the seed of the trained models (steps 1 and 2)."""
    group.add_argument("--learning-rate", type=float, default=learning_rate, help=learning_rate_help)
    group.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    group.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0: no clipping)")
    group.add_argument("--micro-batch-size", type=int, default=4,
                       help="sequences per forward pass, per rank (step 1: examples; step 2: completions)")
    group.add_argument("--seed", type=int, default=42)


def add_eval_arguments(group) -> None:
    """Periodic held-out evaluation of the trained models (steps 1 and 2)."""
    group.add_argument("--eval-every", type=int, default=0,
                       help="held-out evaluation every K steps (0: none on the way; step 1 also evaluates at its end)")
    group.add_argument("--eval-max-samples", type=int, default=256, help="held-out rows used per evaluation")


def add_checkpoint_arguments(group, *, save_every: int) -> None:
    """Periodic DeepSpeed checkpoints and --resume (steps 1 and 2)."""
    group.add_argument("--save-every", type=int, default=save_every,
                       help="DeepSpeed checkpoint every K steps, for --resume (0: no periodic checkpoints; the final "
                            "HF model is always saved)")
    group.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")


def add_distributed_arguments(group) -> None:
    """What every stage run under the deepspeed launcher takes."""
    group.add_argument("--dist-timeout-minutes", type=float, default=30.0,
                       help="a collective waiting longer than this (e.g. for a dead rank) fails the run")
    group.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher


def add_logging_arguments(group) -> None:
    group.add_argument("--wandb-project", default=None, help="also log to Weights & Biases")


def check_shared_args(args) -> None:
    """The one rule of each shared flag the stage declared. `not x > 0` also rejects NaN."""
    for name in ("min_pixels", "max_pixels"):
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            raise InputError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if hasattr(args, "dist_timeout_minutes") and not args.dist_timeout_minutes > 0:
        raise InputError(f"--dist-timeout-minutes must be > 0, got {args.dist_timeout_minutes}")
    for name in ("learning_rate", "micro_batch_size", "eval_max_samples"):
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            raise InputError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    for name in ("weight_decay", "max_grad_norm", "eval_every"):
        value = getattr(args, name, None)
        if value is not None and not value >= 0:
            raise InputError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if hasattr(args, "save_every") and args.save_every < 0:
        raise InputError(f"--save-every must be >= 0 (0: no checkpoints), got {args.save_every}")
    if hasattr(args, "lora_rank"):
        check_lora_args(args)
    if hasattr(args, "zero_param_persistence_threshold") and args.zero_param_persistence_threshold < 0:
        raise InputError("--zero-param-persistence-threshold must be >= 0, got "
                         f"{args.zero_param_persistence_threshold}")


def check_lora_args(args) -> None:
    """The LoRA flags; fills in --lora-alpha's default (2 x the rank)."""
    if args.lora_rank < 0:
        raise InputError(f"--lora-rank must be >= 0 (0: full fine-tuning), got {args.lora_rank}")
    if args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora_rank
    parse_targets(args.lora_target_modules)
    if not args.lora_rank:
        given = [flag for flag, on in (("--lora-save-adapter", args.lora_save_adapter),
                                       ("--lora-dropout", args.lora_dropout != 0)) if on]
        if given:
            raise InputError(f"{' and '.join(given)} need LoRA: give --lora-rank > 0")
        return
    if not args.lora_alpha > 0:
        raise InputError(f"--lora-alpha must be > 0, got {args.lora_alpha}")
    if not 0 <= args.lora_dropout < 1:
        raise InputError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
