"""DeepSpeed configs built in code (as DeepSpeed-Chat does), and the optimizer that goes with them; shared by steps
1 and 2."""
import torch


def zero3_train_config(
    *,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    world_size: int,
    bf16: bool,
    gradient_clipping: float = 1.0,
    offload: bool = False,
    param_persistence_threshold: int = 10_000,
) -> dict:
    """ZeRO-3 training config. `param_persistence_threshold=0` shards every parameter (tests use it
    so that sharding is real even for a tiny model)."""
    offload_device = "cpu" if offload else "none"
    return {
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": gradient_clipping,
        "bf16": {"enabled": bf16},
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": offload_device},
            "offload_optimizer": {"device": offload_device},
            "stage3_param_persistence_threshold": param_persistence_threshold,
            "stage3_max_live_parameters": 30_000_000,
            "stage3_prefetch_bucket_size": 30_000_000,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW (see adamw below)
        "steps_per_print": 1_000_000_000,  # our own logging, not DeepSpeed's
        "wall_clock_breakdown": False,
    }


def zero3_inference_config(*, world_size: int, bf16: bool, param_persistence_threshold: int = 10_000,
                           offload: bool = False) -> dict:
    """ZeRO-3 config for a frozen model (the KL reference policy): sharded, no optimizer; `offload` keeps its
    partitions in CPU memory and brings each layer to the GPU only for its forward."""
    return {
        "train_batch_size": world_size,
        "train_micro_batch_size_per_gpu": 1,
        "bf16": {"enabled": bf16},
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "cpu" if offload else "none"},
            "stage3_param_persistence_threshold": param_persistence_threshold,
        },
        "steps_per_print": 1_000_000_000,
    }


def adamw(params, *, lr: float, weight_decay: float, offload: bool) -> torch.optim.Optimizer:
    """The trainer's AdamW. With ZeRO-Offload the optimizer steps on the host, where DeepSpeed requires its own
    vectorised CPU Adam (it refuses torch's); otherwise torch's AdamW (DeepSpeed's fused GPU Adam would be a JIT build
    of its own). scripts/setup.sh builds the CPU Adam op once, so a run's first step does not compile it."""
    params = list(params)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
