"""The policy and reference engines under ZeRO-3, and their forward passes over prompt + completion."""
import itertools

import torch
from transformers.integrations import HfDeepSpeedConfig

from sophiavl.utils.ds_config import adamw, zero3_inference_config, zero3_train_config
from sophiavl.utils.lora import add_adapters
from sophiavl.utils.model import apply_training_flags, chat_inputs, encode_images_first, load_model
from sophiavl.utils.prompts import POLICY_THINKING

from .loss import entropy_from_logits, selective_log_softmax


def build_policy_engines(args, world_size: int, dtype: torch.dtype):
    """The trained policy and (when the KL term is on) the frozen reference, both ZeRO-3 sharded. With --lora-rank
    the reference is the policy's own engine with its adapters disabled: the base model, no second copy."""
    import deepspeed

    bf16 = dtype == torch.bfloat16
    samples_per_rank = args.rollout_batch_size // world_size * args.num_generations
    ds_config = zero3_train_config(
        micro_batch_size=args.micro_batch_size, gradient_accumulation_steps=samples_per_rank // args.micro_batch_size,
        world_size=world_size, bf16=bf16, gradient_clipping=args.max_grad_norm, offload=args.offload,
        param_persistence_threshold=args.zero_param_persistence_threshold)
    hf_ds_config = HfDeepSpeedConfig(ds_config)  # models loaded while it lives are sharded as they load
    policy = load_model(args.model_path, dtype, args.attn_implementation, hf_ds_config)
    apply_training_flags(policy, freeze_vision_tower=args.freeze_vision_tower,
                         gradient_checkpointing=args.gradient_checkpointing)
    lora = add_adapters(policy, args, args.seed)  # adapts `policy` in place; only the adapters stay trainable
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = adamw(trainable, lr=args.learning_rate, weight_decay=args.weight_decay, offload=args.offload)
    warmup = max(args.warmup_steps * args.ppo_epochs, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warmup))
    engine, _, _, _ = deepspeed.initialize(model=policy, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)

    ref_engine = None
    if args.kl_coef > 0 and lora is not None:
        ref_engine = AdaptersDisabled(engine, lora)
    elif args.kl_coef > 0:
        reference = load_model(args.model_path, dtype, args.attn_implementation, hf_ds_config)
        ref_config = zero3_inference_config(world_size=world_size, bf16=bf16, offload=args.offload_reference,
                                            param_persistence_threshold=args.zero_param_persistence_threshold)
        ref_engine = deepspeed.initialize(model=reference.eval(), config=ref_config)[0]
    return engine, ref_engine


def completion_batch(processor, chats: list, images: list, completion_ids: list[list[int]]) -> dict:
    """Model inputs for prompts (left-padded by the processor) followed by their completions
    (right-padded), plus `completion_mask` marking the completion tokens that carry loss. The prompt is the
    rollout's, the template's prefilled "<think>" included (the completion follows it)."""
    prompt = chat_inputs(processor, chats, images, enable_thinking=POLICY_THINKING)
    pad = processor.tokenizer.pad_token_id
    width = max(len(ids) for ids in completion_ids)
    completion = torch.full((len(completion_ids), width), pad, dtype=torch.long)
    completion_mask = torch.zeros_like(completion)
    for row, ids in enumerate(completion_ids):
        completion[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        completion_mask[row, :len(ids)] = 1
    batch = dict(prompt)
    batch["input_ids"] = torch.cat([prompt["input_ids"], completion], dim=1)
    batch["attention_mask"] = torch.cat([prompt["attention_mask"], completion_mask], dim=1)
    batch["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(completion)], dim=1)
    batch["completion_ids"], batch["completion_mask"] = completion, completion_mask
    if "pixel_values" in batch:
        _keep_distinct_images(batch, [id(image) for row_images in images for image in row_images])
    return batch


def _keep_distinct_images(batch: dict, image_ids: list[int]) -> None:
    """The N completions of a prompt share its image objects: keep each distinct image's patches once
    and record in `image_index` which distinct image fills each image slot, so the vision tower encodes
    every image once per micro-batch instead of N times (utils.model.encode_images_first)."""
    sizes = batch["image_grid_thw"].prod(dim=1).tolist()
    starts = [0, *itertools.accumulate(sizes)]
    distinct = {}  # id of the image object -> (its index among the distinct images, its first slot)
    for slot, image_id in enumerate(image_ids):
        distinct.setdefault(image_id, (len(distinct), slot))
    batch["pixel_values"] = torch.cat([batch["pixel_values"][starts[slot]:starts[slot + 1]]
                                       for _, slot in distinct.values()])
    batch["image_index"] = torch.tensor([distinct[image_id][0] for image_id in image_ids])


class AdaptersDisabled:
    """The reference policy of a LoRA run: the training engine called with its adapters disabled (peft's
    disable_adapter), i.e. the base model, whose weights the engine holds anyway. Used as a reference engine is
    (completion_logps), under no_grad."""

    def __init__(self, engine, peft_model):
        self.engine, self.module, self.peft_model = engine, engine.module, peft_model

    def __call__(self, **inputs):
        with self.peft_model.disable_adapter():
            return self.engine(**inputs)


def completion_logps(model, batch: dict, temperature: float, with_entropy: bool = False, entropy_grad: bool = True):
    """Per-token log-probs (and entropies) of the completion tokens under `model` (a DeepSpeed
    engine or a plain model), at the sampling temperature, shape [B, completion width]. Only the
    completion's logits are materialised. `entropy_grad=False`: entropy for logging only."""
    module = getattr(model, "module", model)
    completion = batch["completion_ids"].to(module.device)
    inputs = {k: v.to(module.device) for k, v in batch.items() if k not in ("completion_ids", "completion_mask")}
    keepalive = encode_images_first(module, inputs)
    width = completion.shape[1]
    logits = model(**inputs, logits_to_keep=width + 1, use_cache=False).logits[:, :-1] / temperature
    logps = selective_log_softmax(logits, completion) + keepalive
    entropy = entropy_from_logits(logits if entropy_grad else logits.detach()) if with_entropy else None
    return logps, entropy
