"""Step 2: Trust-GRPO training of a Qwen2.5-VL policy under DeepSpeed ZeRO-3.

    deepspeed --num_gpus 8 step2_trust_grpo/main.py --model-path ... --trm-url http://host:8000/v1 ...

Each step: roll out N completions per prompt -> outcome rewards R^o and thinking rewards R^t (TRM
server) -> Trust-GRPO rewards -> group-normalised advantages -> PPO-clip + k3-KL update -> push the
new weights into the rollout engine. See docs/method.md for the method and its defaults, step2_trust_grpo/README.md "GRPO variants"
for the flags that swap pieces of it (DAPO, Dr. GRPO, GSPO, rollout importance weights, KL options).
"""
import logging
import os
import random
import statistics
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from sophiavl.utils.cli import RunAborted, exit_on_input_error
from sophiavl.utils.data import ReadableRows, epoch_order, load_rows
from sophiavl.utils.memory_plan import print_stage_plan
from sophiavl.utils.metrics_log import MetricsLogger
from sophiavl.utils.distributed import (init_distributed, max_across_ranks, mean_across_ranks, min_across_ranks, shutdown,
                                        sum_across_ranks)
from sophiavl.utils.generation import Sampling, prompt_seed, stop_token_ids
from sophiavl.utils.model import chat_texts, load_model, load_processor, resolve_dtype
from sophiavl.utils.outputs import prepare_output_dir, write_run_info
from sophiavl.utils.prompt_length import keep_within
from sophiavl.utils.prompts import POLICY_THINKING, format_question, policy_messages
from sophiavl.utils.trm_client import TRMClient
from sophiavl.utils.vision import resize_images
from sophiavl.utils.zero3 import load_checkpoint, save_checkpoint, save_hf_model

if not __package__:  # run as a script (`deepspeed step2_trust_grpo/main.py`, or a copy of the folder)
    from sophiavl.utils.stage import stage_package
    __package__ = stage_package(__file__)

from .arguments import check_args, parse_args
from .completion_log import CompletionLog
from .micro_batches import (encodings_per_image, fixed_count, padding_share, sequence_lengths, split_to,
                            token_budget)
from .loss import (STEP_AGGREGATIONS, group_advantages, grpo_loss, kl_penalties, rollout_is_weights, step_denominator,
                   step_units)

from .policy import build_policy_engines, completion_batch, completion_logps
from .dynamic_sampling import fill_batch, first_prompt_index, refill_prompts
from .rewards import (final_rewards, merge_thinking_stats, outcome_rewards, overlong_penalties, thinking_rewards,
                      truncated)

from .rollout import HFRollout, VLLMRollout


def seed_step(seed: int, step: int, rank: int) -> int:
    """Seed every RNG from (seed, step, rank): a resumed run samples exactly what it would have."""
    step_seed = (seed * 1_000_003 + step * 1009 + rank) % 2**31
    random.seed(step_seed)
    np.random.seed(step_seed)
    torch.manual_seed(step_seed)
    return step_seed


def prompts_for_step(num_rows: int, step: int, batch_size: int, rank: int, world_size: int, seed: int) -> list[int]:
    """This rank's share of the step's prompts: a fresh seeded permutation of the data every epoch,
    a function of the step alone (so resume needs no sampler state)."""
    per_rank = batch_size // world_size
    start = (step - 1) * batch_size + rank * per_rank
    return [epoch_order(num_rows, seed + position // num_rows)[position % num_rows]
            for position in range(start, start + per_rank)]


def policy_chat(row: dict) -> list:
    """The policy's chat for a row, as the loop builds it: what --max-prompt-length measures at load time."""
    return policy_messages(row["prompt"], row["problem_type"], row["options"], len(row["images"]))


def build_rollout(args, processor, dtype: torch.dtype, max_images: int, rank: int, plain_copy=None):
    sampling = Sampling(max_new_tokens=args.max_completion_length, temperature=args.temperature, top_p=args.top_p,
                        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty)
    if args.rollout_engine == "hf":
        if torch.cuda.is_available():
            plain_copy.to(f"cuda:{torch.cuda.current_device()}")
        return HFRollout(plain_copy, processor, sampling)
    return VLLMRollout(
        args.model_path, processor, sampling, seed=args.seed + rank, dtype=str(dtype).removeprefix("torch."),
        max_model_len=args.vllm_max_model_len or args.max_prompt_length + args.max_completion_length,
        max_images=max_images, gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        tensor_parallel_size=args.vllm_tensor_parallel_size, sleep_mode=args.vllm_sleep_mode)


def update_policy(engine, ref_engine, processor, chats, images, completions, scored_rewards, args) -> dict:
    """Advantages from the final rewards, then PPO epochs over the rollout in micro-batches. `scored_rewards()`
    returns the final rewards; it is called after the reference and old passes, which run while the judge's
    requests are in flight (--trm-overlap). With one epoch the
    policy has not moved since the rollout, so pi_old is the training engine's own (detached) log-probs of the
    same pass (--kl-in-reward needs them, and the reference's, before the advantages: one pass more). When the
    rollout engine reports its log-probs, their mean gap to pi_old is logged (it should be ~0)."""
    completion_ids = completions.token_ids
    n = args.num_generations
    if args.max_tokens_per_micro_batch:
        lengths = sequence_lengths(processor, chat_texts(processor, chats, enable_thinking=POLICY_THINKING), images,
                                   completion_ids, n)
        micro = token_budget(lengths, args.max_tokens_per_micro_batch)
        micro = split_to(micro, int(max_across_ranks(len(micro))))  # ZeRO-3: as many passes on every rank
        # DeepSpeed scales each loss by 1 / its accumulation steps: this step's count of micro-batches
        engine.set_train_batch_size(engine.train_micro_batch_size_per_gpu() * len(micro) * engine.dp_world_size)
    else:
        micro = fixed_count(len(completion_ids), args.micro_batch_size)
    batches = [completion_batch(processor, [chats[j // n] for j in mb], [images[j // n] for j in mb],
                                [completion_ids[j] for j in mb]) for mb in micro]
    extra = {"update/padding_share": padding_share([b["attention_mask"] for b in batches]),
             "update/tokens": sum(b["attention_mask"].sum().item() for b in batches),  # per pass, pads left out
             "update/encodings_per_image": encodings_per_image(micro, images, n)}
    engine.eval()  # the passes without gradients; those with them (below) run in train mode
    with torch.no_grad():
        ref_logps = [completion_logps(ref_engine, b, args.temperature)[0] if ref_engine else None for b in batches]
        old_logps = [completion_logps(engine, b, args.temperature)[0] if args.ppo_epochs > 1 or args.kl_in_reward
                     else None for b in batches]
    rewards = torch.tensor(scored_rewards())
    if args.kl_in_reward:  # over every completion token: --mask-truncated masks the loss, not the reward
        penalties = torch.cat([kl_penalties(old, ref, b["completion_mask"].to(old.device), args.kl_estimator,
                                            args.kl_coef).cpu() for b, old, ref in zip(batches, old_logps, ref_logps)])
        rewards, extra["reward/kl_penalty"] = rewards - penalties, penalties.mean().item()
    advantages = group_advantages(rewards, n, scale=args.scale_rewards)
    if args.mask_truncated:
        cut = truncated(completion_ids, args.max_completion_length, set(stop_token_ids(engine.module)))
        for mb, batch in zip(micro, batches):
            batch["completion_mask"][[row for row, j in enumerate(mb) if cut[j]]] = 0
    denominator = None
    if args.loss_agg in STEP_AGGREGATIONS:  # one all-reduce per step: the step's tokens (or sequences) on all ranks
        units = sum(step_units(args.loss_agg, b["completion_mask"], args.max_completion_length) for b in batches)
        denominator = step_denominator(sum_across_ranks(units)[0], len(batches), torch.distributed.get_world_size())

    metrics, gaps, is_stats = [], [], []
    engine.train()  # transformers checkpoints layers, and LoRA drops out, only in training mode
    for epoch in range(args.ppo_epochs):
        for k, (mb, batch, ref, old) in enumerate(zip(micro, batches, ref_logps, old_logps)):
            if args.max_tokens_per_micro_batch:  # their number varies by step: the last one is the optimizer step
                engine.set_gradient_accumulation_boundary(k == len(micro) - 1)
            logps, entropy = completion_logps(engine, batch, args.temperature, with_entropy=True,
                                              entropy_grad=args.entropy_coef > 0)
            pi_old = logps.detach() if old is None else old
            if epoch == 0 and completions.rollout_logps is not None:
                gaps += [(pi_old[row, :len(completion_ids[j])].cpu() - torch.tensor(completions.rollout_logps[j]))
                         .abs().mean().item() for row, j in enumerate(mb)]
            mask = batch["completion_mask"].to(logps.device)
            is_weights = None
            if args.rollout_is == "tis":
                rollout_logps = torch.zeros_like(pi_old)
                for row, j in enumerate(mb):
                    rollout_logps[row, :len(completion_ids[j])] = torch.tensor(completions.rollout_logps[j])
                is_weights, stats = rollout_is_weights(pi_old, rollout_logps, mask, args.rollout_is_cap)
                is_stats += [stats] if epoch == 0 else []
            loss, step_metrics = grpo_loss(
                logps, pi_old, ref, advantages[list(mb)].to(logps.device), mask,
                kl_coef=0.0 if args.kl_in_reward else args.kl_coef, entropy_coef=args.entropy_coef, entropy=entropy,
                loss_agg=args.loss_agg, clip_eps_low=args.clip_eps_low, clip_eps_high=args.clip_eps_high,
                importance_level=args.importance_level, kl_estimator=args.kl_estimator, is_weights=is_weights,
                denominator=denominator)
            engine.backward(loss)
            engine.step()
            metrics.append({**step_metrics, "loss": loss.item()})
    summary = {name: statistics.fmean(m[name] for m in metrics) for name in metrics[0]}
    if gaps:
        summary["rollout/logp_gap"] = statistics.fmean(gaps)
    if is_stats:
        summary.update({name: statistics.fmean(s[name] for s in is_stats) for name in is_stats[0]})
        summary["rollout_is/max"] = max(s["rollout_is/max"] for s in is_stats)
    return {**summary, **extra}


def warn_on_logp_gap(metrics: dict, step: int, threshold: float, warned: bool) -> bool:
    """Warn once when the rollout engine's log-probs drift from the trainer's: the symptom of engines that see
    different inputs, weights or sampling settings (the rollouts are then off-policy). Returns `warned` after."""
    gap = metrics.get("rollout/logp_gap")
    if warned or gap is None or not gap > threshold:
        return warned
    logging.getLogger(__name__).warning(
        f"step {step}: the rollout engine's log-probs differ from the trainer's by {gap:.4f} per token "
        f"(> --warn-logp-gap {threshold}): the engines see different inputs, weights or sampling settings")
    return True


def abort_if_trm_down(window: deque, calls: int, failures: int, args) -> None:
    """Decided on numbers summed over all ranks, so every rank stops together (none left waiting)."""
    window.append(sum_across_ranks(calls, failures))
    total_calls, total_failures = (sum(c for c, _ in window), sum(f for _, f in window))
    if total_calls and total_failures / total_calls > args.trm_max_failure_rate:
        raise RunAborted(f"the thinking reward model at {args.trm_url} failed {int(total_failures)} of "
                         f"{int(total_calls)} requests over the last {len(window)} steps "
                         f"(--trm-max-failure-rate {args.trm_max_failure_rate}); is the server up?")


@torch.no_grad()
def validate(rollout, eval_data: ReadableRows, rank: int, world_size: int, args) -> float:
    from sophiavl.utils.outcome_reward import outcome_reward

    mine = eval_data.rows[rank::world_size]
    total = 0.0
    for start in range(0, len(mine), 16):
        batch = mine[start:start + 16]
        batch, images = eval_data.open(batch)
        images = [resize_images(row_images, rollout.processor) for row_images in images]
        chats = [policy_messages(r["prompt"], r["problem_type"], r["options"], len(i)) for r, i in zip(batch, images)]
        texts = rollout.generate(chats, images, 1, greedy=True).texts
        total += sum(outcome_reward(t, r["answer"], r["problem_type"], max_answer_chars=args.max_answer_chars,
                                    strict_format=args.strict_format) for t, r in zip(texts, batch))
    total, count = sum_across_ranks(total, len(mine))
    return total / max(count, 1)


def warn_over_trm_cap(rows: list, cap: int) -> None:
    over = [len(r["images"]) for r in rows if len(r["images"]) > cap]
    if over:
        logging.getLogger(__name__).warning(
            f"{len(over)} of {len(rows)} training prompts have more images (up to {max(over)}) than the TRM "
            f"server's cap of {cap} (--trm-max-images): their requests are not sent and their groups get R^t = 0; "
            f"serve the TRM with --max-images {max(over)}")


@exit_on_input_error
def main(argv=None):
    # ---- arguments, distributed, data: every check before any model is loaded ----
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_args(args, world_size)
    if args.plan:  # before the TRM, the data, DeepSpeed or any model
        print_stage_plan(args, stage=2)
        return
    trm = TRMClient(args.trm_url, args.trm_model, max_concurrency=args.trm_max_concurrency,
                    timeout_s=args.trm_timeout, max_retries=args.trm_max_retries,
                    max_images=args.trm_max_images) if args.use_thinking_reward else None
    prepare_output_dir(args.output_dir)
    train_rows = load_rows(args.data_path, args.registry)
    eval_rows = load_rows(args.eval_data_path, args.registry)[: args.eval_max_samples] if args.eval_data_path else []
    # deepspeed is imported only now, so that bad input above gets its one error line without its log
    rank, _ = init_distributed(args.dist_timeout_minutes)
    if rank == 0:
        write_run_info(args.output_dir, args)

    # ---- engines: policy + reference under ZeRO-3, rollout engine, TRM client ----
    dtype = resolve_dtype(args.dtype)
    processor = load_processor(args.model_path, args.min_pixels, args.max_pixels)
    train_rows = keep_within(processor, train_rows, policy_chat, args.max_prompt_length, "--max-prompt-length",
                             f"--data-path {args.data_path}", log=rank == 0)
    if eval_rows:
        eval_rows = keep_within(processor, eval_rows, policy_chat, args.max_prompt_length, "--max-prompt-length",
                                f"--eval-data-path {args.eval_data_path}", log=rank == 0)
    train_data, eval_data = (ReadableRows(r, fatal=args.fatal_bad_rows) for r in (train_rows, eval_rows))
    if trm and args.trm_max_images is not None and rank == 0:
        warn_over_trm_cap(train_rows, args.trm_max_images)
    # the hf engine's plain copy must load before HfDeepSpeedConfig exists, or it would be sharded too
    plain_copy = load_model(args.model_path, dtype, args.attn_implementation) if args.rollout_engine == "hf" else None
    engine, ref_engine = build_policy_engines(args, world_size, dtype)
    max_images = max(len(r["images"]) for r in train_rows + eval_rows)
    rollout = build_rollout(args, processor, dtype, max_images, rank, plain_copy)
    start_step = load_checkpoint(engine, args.output_dir) if args.resume else 0
    if start_step:
        rollout.sync_weights(engine.module)
    logger = MetricsLogger(args.output_dir, enabled=rank == 0, resume_step=start_step,
                           wandb_project=args.wandb_project, run_config=vars(args))
    completion_log = CompletionLog(args.output_dir, rank, start_step) if args.log_completions else None
    trm_window = deque(maxlen=args.trm_failure_window)
    n = args.num_generations
    logp_gap_warned = False
    judge_calls = ThreadPoolExecutor(max_workers=1)  # a step's TRM requests run next to the trainer's passes

    def sample_round(indices: list[int], first: int, step: int, sampling: dict, wait: bool = True) -> dict:
        """Roll out the prompts train_rows[indices] (`first`: the global index of the first, for its seed), score
        their outcomes and send their TRM requests; with `wait`, also their final rewards (score_round): one round
        of step_trust_grpo.dynamic_sampling. Adds generation time and judge stats to `sampling`."""
        # a row whose images fail to decode is replaced (utils.data.ReadableRows); the images as the judge gets
        # them: its server resizes by its own limits
        rows, images = train_data.open([train_rows[i] for i in indices])
        policy_images = [resize_images(row_images, processor) for row_images in images]  # what both engines see
        chats = [policy_messages(r["prompt"], r["problem_type"], r["options"], len(i)) for r, i in zip(rows, images)]
        seeds = [prompt_seed(args.seed, step, first + k) for k in range(len(rows))]

        # ---- 1. rollout: N completions per prompt ----
        t0 = time.perf_counter()
        completions = rollout.generate(chats, policy_images, n, seeds=seeds)
        sampling["generate_s"] += time.perf_counter() - t0

        # ---- 2. rewards: outcome R^o now, thinking R^t asked of the TRM now and awaited in score_round ----
        outcome = outcome_rewards(completions.texts, rows, n, args.max_answer_chars, args.strict_format)
        pending = None
        if trm:
            questions = [format_question(r["prompt"], r["problem_type"], r["options"]) for r in rows]
            if args.reference_parity:  # the reference sends the decoded chat prompt as the question
                questions = chat_texts(processor, chats, enable_thinking=POLICY_THINKING)
            pending = judge_calls.submit(thinking_rewards, trm, questions, completions.texts, images, outcome, n,
                                         reference_parity=args.reference_parity)
        batch = dict(rows=rows, images=images, policy_images=policy_images, chats=chats, completions=completions,
                     outcome=outcome, pending=pending)
        return score_round(batch, step, sampling) if wait else batch

    def score_round(batch: dict, step: int, sampling: dict) -> dict:
        """The round's thinking rewards (waiting for the TRM), trust weight gamma, annealing and overlong shaping.
        Every rank calls it at the same point of the step: the TRM-down check sums over the ranks."""
        outcome, thinking, pending = batch["outcome"], [0.0] * len(batch["outcome"]), batch.pop("pending")
        if pending is not None:
            thinking, trm_stats = pending.result()
            abort_if_trm_down(trm_window, trm_stats.calls, trm_stats.failures, args)
            sampling["trm"].append(trm_stats)
        rewards, gammas = final_rewards(outcome, thinking, n, step, alpha=args.alpha, horizon=args.anneal_horizon,
                                        use_trust=args.use_trust, use_anneal=args.use_anneal)
        if args.overlong_buffer:
            shaping = overlong_penalties([len(ids) for ids in batch["completions"].token_ids],
                                         args.max_completion_length, args.overlong_buffer, args.overlong_penalty)
            rewards = [r + p for r, p in zip(rewards, shaping)]
        return {**batch, "thinking": thinking, "rewards": rewards, "gammas": gammas}

    progress = tqdm(range(start_step + 1, args.max_steps + 1), initial=start_step, total=args.max_steps,
                    desc="Trust-GRPO", disable=rank != 0)
    for step in progress:
        seed_step(args.seed, step, rank)
        replaced_before = train_data.replaced
        per_rank = args.rollout_batch_size // world_size
        t0, sampling = time.perf_counter(), {"generate_s": 0.0, "trm": [], "late_wait_s": 0.0}
        batch = sample_round(prompts_for_step(len(train_rows), step, args.rollout_batch_size, rank, world_size,
                                              args.seed), rank * per_rank, step, sampling,
                             wait=args.dynamic_sampling or not args.trm_overlap)
        if args.dynamic_sampling:  # refill round r: prompts and seeds from (seed, step, r), the same on a resume
            batch, sampling["metrics"] = fill_batch(batch, lambda r: sample_round(
                refill_prompts(len(train_rows), args.seed, step, r, per_rank, rank, world_size),
                first_prompt_index(r, args.rollout_batch_size, rank, per_rank), step, sampling),
                per_rank, n, args.dynamic_sampling_max_rounds, lambda full: min_across_ranks(float(full)) == 1.0)
        chats, policy_images, completions = batch["chats"], batch["policy_images"], batch["completions"]
        t1 = t0 + sampling["generate_s"]

        def scored_rewards() -> list[float]:
            if "pending" in batch:  # the TRM's answers, sent for before the reference and old passes
                t = time.perf_counter()
                batch.update(score_round(batch, step, sampling))
                sampling["late_wait_s"] = time.perf_counter() - t
            return batch["rewards"]

        # ---- 3. update: advantages, PPO-clip on token ratios, KL to the reference, entropy bonus ----
        t2 = time.perf_counter()
        rollout.sleep()
        update = update_policy(engine, ref_engine, processor, chats, policy_images, completions, scored_rewards,
                               args)
        rows, outcome, thinking, rewards, gammas = (batch[name] for name in (
            "rows", "outcome", "thinking", "rewards", "gammas"))
        trm_stats = merge_thinking_stats(sampling["trm"]) if trm else None

        # ---- 4. weight sync: stream the new ZeRO-3 weights into the rollout engine ----
        t3 = time.perf_counter()
        rollout.sync_weights(engine.module)
        t4 = time.perf_counter()

        # ---- 5. log, validate, checkpoint ----
        lengths = [len(ids) for ids in completions.token_ids]
        grouped = torch.tensor(rewards).view(-1, n)
        metrics = {
            "reward": statistics.fmean(rewards),
            "reward_std": grouped.std(dim=1).mean().item(),
            "frac_reward_zero_std": (grouped.std(dim=1) == 0).float().mean().item(),
            "reward/outcome": statistics.fmean(outcome),
            "reward/thinking": statistics.fmean(thinking),
            "trust/gamma_mean": statistics.fmean(gammas),
            "trust/gamma_min": min(gammas),
            "trust/frac_distrusted": sum(g < 1 for g in gammas) / len(gammas),
            **update,
            **sampling.get("metrics", {}),
            "completions/mean_length": statistics.fmean(lengths),
            "completions/clipped_ratio": sum(x >= args.max_completion_length for x in lengths) / len(lengths),
            # timing/reward: outcome scoring and the TRM's wait that the reference and old passes did not hide
            "timing/rollout": t1 - t0, "timing/reward": t2 - t1 + sampling["late_wait_s"],
            "timing/update": t3 - t2 - sampling["late_wait_s"], "timing/sync": t4 - t3,
            "step_time": t4 - t0,
            "tokens_per_s": sum(lengths) / max(t1 - t0, 1e-9),
            "lr": engine.get_lr()[0],
        }
        counts = {"data/bad_rows": train_data.replaced - replaced_before}  # counts are summed over the ranks
        if trm_stats:
            metrics["trm/latency_s"] = statistics.fmean(trm_stats.latencies or [0.0])
            counts.update({"trm/calls": trm_stats.calls, "trm/failures": trm_stats.failures,
                           "trm/failed_groups": trm_stats.failed_groups, "trm/skipped_groups": trm_stats.skipped_groups})
        metrics = mean_across_ranks(metrics)
        metrics.update(zip(counts, sum_across_ranks(*counts.values())))
        metrics["trust/gamma_min"] = min_across_ranks(min(gammas))
        if args.rollout_is != "none":
            metrics["rollout_is/max"] = -min_across_ranks(-update["rollout_is/max"])
        if eval_rows and args.eval_every and step % args.eval_every == 0:
            metrics["eval/accuracy"] = validate(rollout, eval_data, rank, world_size, args)
        logger.log(step, metrics)
        if rank == 0:
            logp_gap_warned = warn_on_logp_gap(metrics, step, args.warn_logp_gap, logp_gap_warned)
        if rank == 0 and step % args.sample_every == 0:
            logger.log_samples(step, chats[0][-1]["content"][-1]["text"], [
                {"completion": text, "outcome": o, "thinking": t, "reward": r}
                for text, o, t, r in zip(completions.texts[:n], outcome[:n], thinking[:n], rewards[:n])])
        if completion_log:
            completion_log.log(step, rows, completions.texts, outcome, thinking, rewards, gammas)
        progress.set_postfix(reward=f"{metrics['reward']:.3f}", outcome=f"{metrics['reward/outcome']:.3f}")
        if args.save_every and (step % args.save_every == 0 or step == args.max_steps):
            save_checkpoint(engine, args.output_dir, step)

    # ---- save the final policy as an HF directory: step 3, transformers and vllm serve load it ----
    save_hf_model(engine, processor, os.path.join(args.output_dir, "final"),
                  adapter_of=args.model_path if args.lora_save_adapter else None)
    logger.close()
    shutdown(rollout.close)


if __name__ == "__main__":
    main()
