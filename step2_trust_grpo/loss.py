"""The Trust-GRPO objective: group advantages, token log-probs, entropy and the clipped PPO loss with k3 KL."""
import torch

from utils.cli import InputError

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean")


def group_advantages(rewards, num_generations, eps=1e-6):
    """(R - mean) / (std + eps) within each group of `num_generations` consecutive responses.

    `rewards` is [num_groups * N] or [num_groups, N]; the result has the same shape. The std is the
    unbiased one (torch.std's default), as in the reference. A group whose rewards are all equal gets
    exactly 0: computed, fp32 rounding of the mean would leave advantages of order 1e-2 there.
    """
    if rewards.dim() == 2 and rewards.shape[1] != num_generations:
        raise ValueError(f"rewards has groups of {rewards.shape[1]}, but num_generations is {num_generations}")
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of num_generations={num_generations}")
    grouped = rewards.reshape(-1, num_generations).float()
    if num_generations == 1:  # the unbiased std of one value is undefined; a lone response has no baseline
        return torch.zeros_like(grouped).reshape(rewards.shape)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    uniform = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    advantages = torch.where(uniform, torch.zeros_like(grouped), (grouped - mean) / (std + eps))
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


def masked_aggregate(values, mask, loss_agg):
    """Average per-token `values` over the tokens where `mask` is set.

    "token-mean": over all tokens of the micro-batch (the reference's default).
    "seq-mean-token-mean": over each sequence's tokens, then over the sequences that have any.
    """
    values = torch.where(mask, values, torch.zeros_like(values))  # where, not *, so NaN/inf padding cannot leak
    if loss_agg == "token-mean":
        return values.sum() / mask.sum().clamp(min=1)
    if loss_agg == "seq-mean-token-mean":
        tokens_per_seq = mask.sum(dim=-1)
        seq_means = values.sum(dim=-1) / tokens_per_seq.clamp(min=1)
        return seq_means.sum() / (tokens_per_seq > 0).sum().clamp(min=1)
    raise InputError(f"--loss-agg must be one of {', '.join(LOSS_AGGREGATIONS)}, got {loss_agg!r}")


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
):
    """Token-level PPO clipped surrogate + kl_coef * k3 KL - entropy_coef * entropy, aggregated by `loss_agg`.

    logps, old_logps, ref_logps, mask, entropy: [B, T]; advantages: [B], shared by every token of a
    response. Only tokens where `mask` is set (response tokens, not prompt, image or padding) count.
    No KL term when ref_logps is None or kl_coef == 0; no entropy bonus when entropy is None.
    Returns (loss, metrics) with float metrics "policy_loss", "kl", "entropy" (aggregated like the loss)
    and "clip_ratio" (fraction of response tokens where the clipped branch is taken and differs).
    """
    if logps.shape != old_logps.shape or logps.shape != mask.shape or advantages.shape != logps.shape[:1]:
        raise ValueError(
            f"grpo_loss shapes disagree: logps {tuple(logps.shape)}, old_logps {tuple(old_logps.shape)}, "
            f"mask {tuple(mask.shape)}, advantages {tuple(advantages.shape)}"
        )
    mask = mask.bool()
    zeros = torch.zeros_like(logps)
    # Masked first, so that padding garbage (inf, NaN) never enters exp or its gradient.
    log_ratio = torch.where(mask, logps - old_logps.detach(), zeros).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    adv = advantages.detach().unsqueeze(-1).to(ratio.dtype)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_token_loss = -torch.minimum(unclipped, clipped)
    policy_loss = masked_aggregate(per_token_loss, mask, loss_agg)
    clip_ratio = masked_aggregate((clipped < unclipped).float(), mask, "token-mean")

    loss = policy_loss
    kl = logps.new_zeros(())
    if ref_logps is not None and kl_coef != 0:
        per_token_kl = low_var_kl(torch.where(mask, logps, zeros), torch.where(mask, ref_logps.detach(), zeros))
        kl = masked_aggregate(per_token_kl, mask, loss_agg)
        loss = loss + kl_coef * kl
    mean_entropy = logps.new_zeros(())
    if entropy is not None:
        mean_entropy = masked_aggregate(entropy, mask, loss_agg)
        loss = loss - entropy_coef * mean_entropy

    metrics = {
        "policy_loss": policy_loss.item(),
        "kl": kl.item(),
        "entropy": mean_entropy.item(),
        "clip_ratio": clip_ratio.item(),
    }
    return loss, metrics
