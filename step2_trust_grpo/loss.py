"""The Trust-GRPO objective and the GRPO variants compared against it: group advantages, token log-probs,
entropy, and the clipped PPO loss with its KL term. The defaults are the paper's (docs/method.md); the variants
(README.md "GRPO variants") each change one piece."""
import torch

from sophiavl.utils.cli import InputError

# token-mean: the reference's, per micro-batch. The last two are normalised over the whole step (all micro-batches
# and ranks): the caller gives the denominator (step_denominator), so regrouping micro-batches cannot change them.
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "token-mean-global")
STEP_AGGREGATIONS = ("seq-mean-token-sum-norm", "token-mean-global")
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_LEVELS = ("token", "sequence")


def group_advantages(rewards, num_generations, eps=1e-6, scale="group"):
    """(R - mean) / (std + eps) within each group of `num_generations` consecutive responses; with
    scale="none" (Dr. GRPO) only R - mean.

    `rewards` is [num_groups * N] or [num_groups, N]; the result has the same shape. The std is the
    unbiased one (torch.std's default), as in the reference. A group whose rewards are all equal gets
    exactly 0: computed, fp32 rounding of the mean would leave advantages of order 1e-2 there.
    """
    if rewards.dim() == 2 and rewards.shape[1] != num_generations:
        raise ValueError(f"rewards has groups of {rewards.shape[1]}, but num_generations is {num_generations}")
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of num_generations={num_generations}")
    if scale not in ("group", "none"):
        raise InputError(f"--scale-rewards must be group or none, got {scale!r}")
    grouped = rewards.reshape(-1, num_generations).float()
    if num_generations == 1:  # the unbiased std of one value is undefined; a lone response has no baseline
        return torch.zeros_like(grouped).reshape(rewards.shape)
    mean = grouped.mean(dim=1, keepdim=True)
    centred = grouped - mean if scale == "none" else (grouped - mean) / (grouped.std(dim=1, keepdim=True) + eps)
    uniform = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    advantages = torch.where(uniform, torch.zeros_like(grouped), centred)
    return advantages.reshape(rewards.shape)


def selective_log_softmax(logits, token_ids):
    """log softmax(logits)[token_ids] as [B, T] in fp32, one sequence at a time so that the full
    [B, T, V] log-softmax (nor an fp32 copy of bf16 logits) is never materialised at once."""
    logps = []
    for row_logits, row_ids in zip(logits, token_ids):
        row_logits = row_logits.float()
        chosen = row_logits.gather(dim=-1, index=row_ids.unsqueeze(-1)).squeeze(-1)
        logps.append(chosen - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(logps)


def entropy_from_logits(logits):
    """Entropy of the next-token distribution at each position, [B, T] in fp32, one sequence at a time."""
    entropies = []
    for row_logits in logits:
        row_logps = torch.log_softmax(row_logits.float(), dim=-1)
        entropies.append(-(row_logps.exp() * row_logps).sum(dim=-1))
    return torch.stack(entropies)


def low_var_kl(logps, ref_logps):
    """k3 estimator of KL(pi || pi_ref) per token, clamped as verl's `low_var_kl` for stability."""
    log_ratio = (ref_logps - logps).clamp(-20.0, 20.0)
    return (log_ratio.exp() - log_ratio - 1.0).clamp(-10.0, 10.0)


def kl_estimate(logps, ref_logps, estimator="k3"):
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1, k2, k3; verl's kl, mse,
    low_var_kl). k1 = log pi - log pi_ref is unbiased but can be negative; k2 = (k1)^2 / 2; k3 (the default,
    the reference's) = pi_ref/pi - log(pi_ref/pi) - 1, clamped."""
    if estimator == "k1":
        return logps - ref_logps
    if estimator == "k2":
        return 0.5 * (logps - ref_logps) ** 2
    if estimator == "k3":
        return low_var_kl(logps, ref_logps)
    raise InputError(f"--kl-estimator must be one of {', '.join(KL_ESTIMATORS)}, got {estimator!r}")


def kl_penalties(old_logps, ref_logps, mask, estimator, kl_coef):
    """--kl-in-reward: kl_coef x the per-token estimate of KL(pi_old || pi_ref) summed over each completion's
    tokens, [B], to subtract from its reward (verl's use_kl_in_reward; PPO's per-token KL penalty)."""
    mask = mask.bool()
    zeros = torch.zeros_like(old_logps)
    per_token = kl_estimate(torch.where(mask, old_logps, zeros), torch.where(mask, ref_logps, zeros), estimator)
    return kl_coef * torch.where(mask, per_token, zeros).sum(dim=-1)


def step_units(loss_agg, mask, max_completion_length):
    """One micro-batch's share of a step aggregation's denominator: its completion tokens (token-mean-global)
    or its sequences x max_completion_length (seq-mean-token-sum-norm); 0 for the per-micro-batch ones."""
    if loss_agg == "token-mean-global":
        return float(mask.sum())
    if loss_agg == "seq-mean-token-sum-norm":
        return float(mask.shape[0] * max_completion_length)
    return 0.0


def step_denominator(global_units, micro_batches_per_rank, world_size):
    """The denominator of each micro-batch's token sum under a step aggregation. DeepSpeed divides every
    micro-batch's loss by the gradient accumulation steps and averages the gradients over the ranks, so
    dividing by global_units / (accumulation x ranks) makes the step's gradient that of
    (sum over every completion token of the step) / global_units, and the mean of the micro-batch losses
    over micro-batches and ranks (what the metrics log) that value."""
    return max(global_units, 1.0) / (micro_batches_per_rank * world_size)


def masked_aggregate(values, mask, loss_agg, denominator=None):
    """Aggregate per-token `values` over the tokens where `mask` is set.

    "token-mean": over all tokens of the micro-batch (the reference's default).
    "seq-mean-token-mean": over each sequence's tokens, then over the sequences that have any.
    "token-mean-global", "seq-mean-token-sum-norm": the token sum over `denominator` (step_denominator).
    """
    values = torch.where(mask, values, torch.zeros_like(values))  # where, not *, so NaN/inf padding cannot leak
    if loss_agg == "token-mean":
        return values.sum() / mask.sum().clamp(min=1)
    if loss_agg == "seq-mean-token-mean":
        tokens_per_seq = mask.sum(dim=-1)
        seq_means = values.sum(dim=-1) / tokens_per_seq.clamp(min=1)
        return seq_means.sum() / (tokens_per_seq > 0).sum().clamp(min=1)
    if loss_agg in STEP_AGGREGATIONS:
        if denominator is None:
            raise ValueError(f"--loss-agg {loss_agg} normalises over the whole step: pass its denominator")
        return values.sum() / denominator
    raise InputError(f"--loss-agg must be one of {', '.join(LOSS_AGGREGATIONS)}, got {loss_agg!r}")


def rollout_is_weights(old_logps, rollout_logps, mask, cap):
    """Truncated importance weights min(pi_old / pi_rollout, cap) per token (TIS: the rollout engine samples
    from a slightly different distribution than the trainer computes), detached, 1 on padding.
    Returns (weights, stats) with the untruncated ratio's "rollout_is/mean", "rollout_is/max" and the
    fraction of tokens above the cap, "rollout_is/frac_capped", over the masked tokens."""
    mask = mask.bool()
    log_ratio = torch.where(mask, old_logps.detach() - rollout_logps, torch.zeros_like(old_logps)).clamp(max=20.0)
    ratio = log_ratio.exp()
    count = mask.sum().clamp(min=1)
    stats = {"rollout_is/mean": (ratio[mask].sum() / count).item(),
             "rollout_is/max": ratio[mask].max().item() if mask.any() else 1.0,
             "rollout_is/frac_capped": ((ratio > cap) & mask).sum().item() / count.item()}
    return ratio.clamp(max=cap), stats


def grpo_loss(
    logps,
    old_logps,
    ref_logps,
    advantages,
    mask,
    *,
    clip_eps=0.2,
    kl_coef=0.04,
    entropy_coef=1e-3,
    entropy=None,
    loss_agg="token-mean",
    clip_eps_low=None,
    clip_eps_high=None,
    importance_level="token",
    kl_estimator="k3",
    is_weights=None,
    denominator=None,
):
    """PPO clipped surrogate + kl_coef * KL - entropy_coef * entropy, each aggregated by `loss_agg`.

    logps, old_logps, ref_logps, mask, entropy, is_weights: [B, T]; advantages: [B], shared by every token of a
    response. Only tokens where `mask` is set (response tokens, not prompt, image or padding) count.
    The ratio is clipped to [1 - clip_eps_low, 1 + clip_eps_high] (both default to clip_eps). With
    importance_level="sequence" (GSPO) every token of a response gets the response's length-normalised ratio
    exp(mean_t log(pi/pi_old)), the geometric mean of its token ratios; the aggregation is unchanged, so
    "seq-mean-token-mean" gives GSPO's per-sequence objective and the others weight responses by length.
    `is_weights` (rollout_is_weights) multiply the per-token policy loss, not the KL or entropy terms.
    Step aggregations need `denominator` (step_denominator).
    No KL term when ref_logps is None or kl_coef == 0; no entropy bonus when entropy is None.
    Returns (loss, metrics) with float metrics "policy_loss", "kl", "entropy" (aggregated like the loss, but
    as token means under seq-mean-token-sum-norm, whose constant makes them no mean) and "clip_ratio"
    (fraction of response tokens where the clipped branch is taken and differs), split into
    "clip_ratio/low_mean" (ratio under 1 - eps, negative advantage) and "clip_ratio/high_mean".
    """
    if logps.shape != old_logps.shape or logps.shape != mask.shape or advantages.shape != logps.shape[:1]:
        raise ValueError(
            f"grpo_loss shapes disagree: logps {tuple(logps.shape)}, old_logps {tuple(old_logps.shape)}, "
            f"mask {tuple(mask.shape)}, advantages {tuple(advantages.shape)}"
        )
    low = clip_eps if clip_eps_low is None else clip_eps_low
    high = clip_eps if clip_eps_high is None else clip_eps_high
    mask = mask.bool()
    zeros = torch.zeros_like(logps)
    # Masked first, so that padding garbage (inf, NaN) never enters exp or its gradient.
    log_ratio = torch.where(mask, logps - old_logps.detach(), zeros).clamp(-20.0, 20.0)
    if importance_level == "sequence":
        seq_log_ratio = log_ratio.sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1)
        log_ratio = torch.where(mask, seq_log_ratio.expand_as(log_ratio), zeros)
    elif importance_level != "token":
        raise InputError(f"--importance-level must be token or sequence, got {importance_level!r}")
    ratio = log_ratio.exp()
    adv = advantages.detach().unsqueeze(-1).to(ratio.dtype)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - low, 1.0 + high) * adv
    per_token_loss = -torch.minimum(unclipped, clipped)
    if is_weights is not None:
        per_token_loss = per_token_loss * is_weights.detach()
    policy_loss = masked_aggregate(per_token_loss, mask, loss_agg, denominator)
    taken = clipped < unclipped
    clip_ratio = masked_aggregate(taken.float(), mask, "token-mean")
    low_clipped = masked_aggregate((taken & (adv < 0)).float(), mask, "token-mean")
    high_clipped = masked_aggregate((taken & (adv > 0)).float(), mask, "token-mean")

    metric_agg = "token-mean" if loss_agg == "seq-mean-token-sum-norm" else loss_agg
    loss = policy_loss
    kl = logps.new_zeros(())
    kl_metric = kl
    if ref_logps is not None and kl_coef != 0:
        per_token_kl = kl_estimate(torch.where(mask, logps, zeros), torch.where(mask, ref_logps.detach(), zeros),
                                   kl_estimator)
        kl = masked_aggregate(per_token_kl, mask, loss_agg, denominator)
        loss = loss + kl_coef * kl
        kl_metric = kl if metric_agg == loss_agg else masked_aggregate(per_token_kl, mask, metric_agg)
    mean_entropy = logps.new_zeros(())
    entropy_metric = mean_entropy
    if entropy is not None:
        mean_entropy = masked_aggregate(entropy, mask, loss_agg, denominator)
        loss = loss - entropy_coef * mean_entropy
        entropy_metric = mean_entropy if metric_agg == loss_agg else masked_aggregate(entropy, mask, metric_agg)

    metrics = {
        "policy_loss": policy_loss.item(),
        "kl": kl_metric.item(),
        "entropy": entropy_metric.item(),
        "clip_ratio": clip_ratio.item(),
        "clip_ratio/low_mean": low_clipped.item(),
        "clip_ratio/high_mean": high_clipped.item(),
    }
    return loss, metrics
