"""Step 1: SFT of a Qwen2.5-VL as a generative thinking reward model (TRM) under DeepSpeed ZeRO-3.

    deepspeed --num_gpus 8 step1_reward_model/main.py --model-path Qwen/Qwen2.5-VL-3B-Instruct \
        --train-data trm_train.jsonl --output-dir outputs/trm

Each example: the TRM chat (utils.prompts.trm_messages: image parts, the TRM prompt with question and
response), then the assistant turn `<answer>0.7</answer>`; the loss covers exactly that turn and its
<|im_end|>. Periodic evaluation: loss and the MAE of greedily generated scores on held-out questions.
The final judge lands in OUTPUT/final as an HF directory (model + processor) for `vllm serve`.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers.integrations import HfDeepSpeedConfig

from sophiavl.utils.cli import InputError, exit_on_input_error
from sophiavl.utils.data import ReadableRows, epoch_order
from sophiavl.utils.distributed import init_distributed, shutdown, sum_across_ranks
from sophiavl.utils.ds_config import adamw, zero3_train_config
from sophiavl.utils.generation import Sampling, hf_generate
from sophiavl.utils.lora import add_adapters
from sophiavl.utils.memory_plan import print_stage_plan
from sophiavl.utils.metrics_log import MetricsLogger
from sophiavl.utils.arguments import (add_checkpoint_arguments, add_distributed_arguments, add_eval_arguments,
                                      add_logging_arguments, add_lora_arguments, add_model_arguments,
                                      add_optimizer_arguments, add_plan_argument, add_zero3_arguments,
                                      check_shared_args)
from sophiavl.utils.model import apply_training_flags, encode_images_first, load_model, load_processor, resolve_dtype
from sophiavl.utils.outputs import prepare_output_dir, write_atomic, write_run_info
from sophiavl.utils.prompt_length import drop_over_long
from sophiavl.utils.prompts import JUDGE_THINKING, trm_messages
from sophiavl.utils.outcome_reward import parse_score
from sophiavl.utils.zero3 import load_checkpoint, save_checkpoint, save_hf_model

if not __package__:  # run as a script (`deepspeed step1_reward_model/main.py`, or a copy of the folder)
    from sophiavl.utils.stage import stage_package
    __package__ = stage_package(__file__)

from .data import IGNORE_INDEX, example_lengths, make_batch, read_trm_rows, split_by_question

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Step 1: SFT of a Qwen2.5-VL thinking reward model under ZeRO-3.")
    g = p.add_argument_group("model and data")
    g.add_argument("--model-path", required=True, help="HF directory or hub name of the initial model")
    g.add_argument("--train-data", required=True, help="labelled JSONL (annotate.py / balance.py output)")
    g.add_argument("--image-base", default=None, help="folder of relative image paths (default: each JSONL's folder)")
    g.add_argument("--eval-data", default=None, help="held-out labelled JSONL (default: split off --train-data)")
    g.add_argument("--eval-split-fraction", type=float, default=0.02,
                   help="fraction of the questions held out of --train-data when no --eval-data is given")
    g.add_argument("--output-dir", required=True)
    g.add_argument("--max-length", type=int, default=8192,
                   help="longer examples (tokens of prompt, images and target) are dropped at load time (the "
                        "default is the serve launcher's --max-model-len)")
    g.add_argument("--fatal-bad-rows", action="store_true",
                   help="stop at a row whose image cannot be decoded (default: replace it by the next readable row)")
    add_model_arguments(g)

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=2)
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (the schedule still spans --epochs)")
    add_optimizer_arguments(g, learning_rate=1e-5)
    g.add_argument("--warmup-ratio", type=float, default=0.03, help="fraction of the steps with linear warm-up")
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine decays to learning-rate x this")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1)
    add_zero3_arguments(g)
    add_plan_argument(g)

    g = p.add_argument_group("LoRA (README: LoRA)")
    add_lora_arguments(g)

    g = p.add_argument_group("evaluation, logging and checkpoints")
    add_eval_arguments(g)
    g.add_argument("--eval-batch-size", type=int, default=8, help="per rank")
    g.add_argument("--eval-max-new-tokens", type=int, default=16)
    add_checkpoint_arguments(g, save_every=500)
    add_distributed_arguments(g)
    add_logging_arguments(g)
    return p.parse_args(argv)


def check_args(args) -> None:
    check_shared_args(args)
    positive = ["epochs", "gradient_accumulation_steps", "eval_batch_size", "eval_max_new_tokens", "max_length"]
    for name in positive:
        if not getattr(args, name) > 0:  # "not > 0" also rejects nan
            raise InputError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.max_steps is not None and not args.max_steps > 0:
        raise InputError(f"--max-steps must be > 0, got {args.max_steps}")
    if not 0 <= args.eval_split_fraction < 1:
        raise InputError(f"--eval-split-fraction must be in [0, 1), got {args.eval_split_fraction}")
    if not 0 <= args.warmup_ratio < 1 or not 0 <= args.min_lr_ratio <= 1:
        raise InputError("--warmup-ratio must be in [0, 1) and --min-lr-ratio in [0, 1]")


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to `min_ratio`. `step` counts finished optimizer steps (0 first)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(1, total_steps - warmup_steps), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def step_indices(num_rows: int, step: int, steps_per_epoch: int, global_batch: int, seed: int) -> list[int]:
    """The rows of optimizer step `step` (1-based): a seeded permutation per epoch, a function of the step
    alone, so a resumed run needs no sampler state."""
    epoch, offset = divmod(step - 1, steps_per_epoch)
    return list(epoch_order(num_rows, seed + epoch)[offset * global_batch:(offset + 1) * global_batch])


def target_losses(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed cross-entropy over the target tokens, and their count. The batch is left-padded,
    so the targets sit in the last `target_width` positions: only those logits are computed. `model` is the
    DeepSpeed engine or a plain model; the vision tower runs first on every rank (utils.model)."""
    module = getattr(model, "module", model)
    width = batch["target_width"]
    inputs = {k: v.to(module.device) for k, v in batch.items() if k not in ("labels", "target_width")}
    keepalive = encode_images_first(module, inputs)
    logits = model(**inputs, logits_to_keep=width + 1, use_cache=False).logits[:, :-1].float()
    labels = batch["labels"][:, -width:].to(module.device)
    losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    mask = labels != IGNORE_INDEX
    return (losses * mask).sum(dim=1) + keepalive, mask.sum(dim=1)


def aligned_eval_batches(rows: list[dict], batch_size: int, rank: int, world_size: int):
    """(rows, weights) batches for this rank: image rows first, then text-only rows, each group padded
    (weight 0) to whole rounds, so every rank runs the same number of forwards and, in each, all or
    none of the ranks use the vision tower (ZeRO-3 collectives stay matched without a keep-alive)."""
    for group in ([r for r in rows if r["images"]], [r for r in rows if not r["images"]]):
        if not group:
            continue
        per_round = batch_size * world_size
        padded = math.ceil(len(group) / per_round) * per_round
        weights = [1.0] * len(group) + [0.0] * (padded - len(group))
        group = group + [group[0]] * (padded - len(group))
        for start in range(rank * batch_size, padded, per_round):
            yield group[start:start + batch_size], weights[start:start + batch_size]


@torch.no_grad()
def evaluate_judge(model, processor, eval_data: ReadableRows, args, rank: int, world_size: int) -> dict:
    """Held-out loss on the target span, and the MAE of the greedily generated score (parse failures
    counted apart, not scored), summed over all ranks."""
    model.eval()
    totals = dict.fromkeys(["loss", "tokens", "abs_error", "parsed", "rows"], 0.0)
    for batch_rows, weights in aligned_eval_batches(eval_data.rows, args.eval_batch_size, rank, world_size):
        batch_rows, images = eval_data.open(batch_rows)  # a bad row's replacement has images too
        loss_sums, token_counts = target_losses(model, make_batch(processor, batch_rows, images))
        chats = [trm_messages(r["question"], r["response"], len(i)) for r, i in zip(batch_rows, images)]
        texts, _ = hf_generate(model, processor, chats, images, Sampling(max_new_tokens=args.eval_max_new_tokens),
                               enable_thinking=JUDGE_THINKING)
        for row, weight, loss, tokens, text in zip(batch_rows, weights, loss_sums.tolist(), token_counts.tolist(), texts):
            score = parse_score(text)
            totals["loss"] += weight * loss
            totals["tokens"] += weight * tokens
            totals["rows"] += weight
            if score is not None:
                totals["parsed"] += weight
                totals["abs_error"] += weight * abs(score - row["score"])
    model.train()
    loss, tokens, abs_error, parsed, count = sum_across_ranks(*totals.values())
    return {"eval/loss": loss / max(tokens, 1), "eval/score_mae": abs_error / parsed if parsed else float("nan"),
            "eval/parse_failure_rate": 1 - parsed / max(count, 1)}


@exit_on_input_error
def main(argv=None):
    # ---- arguments, data, distributed: every check before any model is loaded ----
    args = parse_args(argv)
    check_args(args)
    if args.plan:  # before the data, DeepSpeed or any model
        print_stage_plan(args, stage=1)
        return
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    prepare_output_dir(args.output_dir)
    train_rows = read_trm_rows(args.train_data, args.image_base)
    if args.eval_data:
        eval_rows = read_trm_rows(args.eval_data, args.image_base)
    else:
        train_rows, eval_rows = split_by_question(train_rows, args.eval_split_fraction, args.seed)
    eval_rows = eval_rows[:args.eval_max_samples]
    global_batch = args.micro_batch_size * args.gradient_accumulation_steps * world_size
    steps_per_epoch = len(train_rows) // global_batch
    if steps_per_epoch == 0:
        raise InputError(f"--train-data {args.train_data}: {len(train_rows)} training rows are fewer than one batch "
                         f"of {global_batch} (micro-batch x accumulation x {world_size} ranks)")
    total_steps = args.epochs * steps_per_epoch
    last_step = min(total_steps, args.max_steps or total_steps)
    import deepspeed  # only now: bad input above gets its one error line without DeepSpeed's import-time log

    rank, _ = init_distributed(args.dist_timeout_minutes)
    if rank == 0:
        write_run_info(args.output_dir, args)
    torch.manual_seed(args.seed)

    # ---- model under ZeRO-3, optimizer, warm-up + cosine schedule ----
    dtype = resolve_dtype(args.dtype)
    processor = load_processor(args.model_path, args.min_pixels, args.max_pixels)
    train_rows = drop_over_long(train_rows, example_lengths(processor, train_rows, args.max_length), args.max_length,
                                "--max-length", f"--train-data {args.train_data}", log=rank == 0)
    if eval_rows:
        eval_rows = drop_over_long(eval_rows, example_lengths(processor, eval_rows, args.max_length), args.max_length,
                                   "--max-length", "the held-out rows", log=rank == 0)
    train_data, eval_data = (ReadableRows(rows, fatal=args.fatal_bad_rows) for rows in (train_rows, eval_rows))
    steps_per_epoch = len(train_rows) // global_batch
    if steps_per_epoch == 0:
        raise InputError(f"--train-data {args.train_data}: the {len(train_rows)} training rows within --max-length "
                         f"are fewer than one batch of {global_batch}")
    total_steps = args.epochs * steps_per_epoch
    last_step = min(total_steps, args.max_steps or total_steps)
    ds_config = zero3_train_config(
        micro_batch_size=args.micro_batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
        world_size=world_size, bf16=dtype == torch.bfloat16, gradient_clipping=args.max_grad_norm,
        offload=args.offload, param_persistence_threshold=args.zero_param_persistence_threshold)
    hf_ds_config = HfDeepSpeedConfig(ds_config)  # models loaded while it lives are sharded as they load
    model = load_model(args.model_path, dtype, args.attn_implementation, hf_ds_config)
    apply_training_flags(model, freeze_vision_tower=args.freeze_vision_tower,
                         gradient_checkpointing=args.gradient_checkpointing)
    add_adapters(model, args, args.seed)  # --lora-rank: only the adapters train (the model is adapted in place)
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                      weight_decay=args.weight_decay, offload=args.offload)
    warmup_steps = round(args.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, args.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    start_step = load_checkpoint(engine, args.output_dir) if args.resume else 0
    logger = MetricsLogger(args.output_dir, enabled=rank == 0, resume_step=start_step,
                           wandb_project=args.wandb_project, run_config=vars(args))
    if rank == 0:
        print(f"{len(train_rows)} training rows, {len(eval_rows)} held out; {steps_per_epoch} steps per epoch of "
              f"{global_batch} rows, {total_steps} steps in all, {warmup_steps} warm-up; from step {start_step + 1}")

    # ---- training loop ----
    engine.train()
    eval_metrics = {}
    progress = tqdm(range(start_step + 1, last_step + 1), initial=start_step, total=last_step, desc="TRM SFT",
                    disable=rank != 0)
    for step in progress:
        t0 = time.perf_counter()
        indices = step_indices(len(train_rows), step, steps_per_epoch, global_batch, args.seed)
        replaced_before = train_data.replaced
        losses = []
        for micro in range(args.gradient_accumulation_steps):
            start = (micro * world_size + rank) * args.micro_batch_size
            rows, images = train_data.open([train_rows[i] for i in indices[start:start + args.micro_batch_size]])
            batch = make_batch(processor, rows, images)
            loss_sums, token_counts = target_losses(engine, batch)
            loss = loss_sums.sum() / token_counts.sum()
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        loss_sum, count, bad_rows = sum_across_ranks(sum(losses), len(losses), train_data.replaced - replaced_before)
        step_time = time.perf_counter() - t0
        metrics = {"loss": loss_sum / count, "lr": engine.get_lr()[0], "epoch": (step - 1) / steps_per_epoch,
                   "step_time": step_time, "samples_per_s": global_batch / step_time, "data/bad_rows": bad_rows}
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if eval_rows and ((args.eval_every and step % args.eval_every == 0) or step == last_step):
            eval_metrics = evaluate_judge(engine.module, processor, eval_data, args, rank, world_size)
            # generation runs the vision tower inside the model, training before it: ZeRO-3's prefetch,
            # which follows the recorded module order, may have fetched parameters nobody used
            engine.empty_partition_cache()
            metrics.update(eval_metrics)
        logger.log(step, metrics)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
        if args.save_every and step % args.save_every == 0:
            save_checkpoint(engine, args.output_dir, step)

    # ---- the judge as an HF directory: transformers, evaluate.py and vllm serve load it ----
    save_hf_model(engine, processor, os.path.join(args.output_dir, "final"),
                  adapter_of=args.model_path if args.lora_save_adapter else None)
    if rank == 0 and eval_metrics:
        write_atomic(os.path.join(args.output_dir, "eval.json"), json.dumps(eval_metrics, indent=2) + "\n")
        print("held-out: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
    logger.close()
    shutdown()


if __name__ == "__main__":
    main()
