"""The GRPO variants of step 2 (step2_trust_grpo/README.md "GRPO variants"): hand-computed cases for each, the same numbers as TRL 1.16's
loss where TRL implements the variant, and the defaults bit for bit as they were before the variants existed."""
import json
import math
import os

import pytest
import torch

from step2_trust_grpo.arguments import check_args, parse_args
from step2_trust_grpo.dynamic_sampling import fill_batch, refill_prompts
from step2_trust_grpo.loss import (group_advantages, grpo_loss, kl_estimate, kl_penalties, masked_aggregate,
                                   rollout_is_weights, step_denominator, step_units)
from step2_trust_grpo.rewards import overlong_penalties, truncated
from step2_trust_grpo.rollout import Completions
from tests.step2.trl_reference import trl_loss
from sophiavl.utils.cli import InputError

CASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "loss_case.json")


def one_token(ratio, advantage, **kwargs):
    logps = torch.tensor([[math.log(ratio)]], requires_grad=True)
    kwargs = {"kl_coef": 0.0, "entropy_coef": 0.0, **kwargs}
    loss, metrics = grpo_loss(logps, torch.zeros(1, 1), None, torch.tensor([advantage]), torch.ones(1, 1), **kwargs)
    loss.backward()
    return loss.item(), metrics, logps.grad.item()


def random_batch(seed, spread):
    """4 responses of up to 6 tokens, log-ratios within +-spread, advantages of both signs, finite padding
    (TRL multiplies padding by 0, which would keep a NaN)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    old = -torch.rand(4, 6, generator=g) * 2 - 0.5
    logps = old + (torch.rand(4, 6, generator=g) * 2 - 1) * spread
    ref = old + (torch.rand(4, 6, generator=g) - 0.5) * 0.6
    return logps, old, ref, torch.tensor([1.3, -0.7, 0.4, -1.1]), mask


def ours(logps, old, ref, advantages, mask, **kwargs):
    leaf = logps.clone().requires_grad_()
    loss, metrics = grpo_loss(leaf, old, ref, advantages, mask, entropy_coef=0.0, **kwargs)
    loss.backward()
    return loss.item(), leaf.grad, metrics


# --- the defaults, bit for bit ----------------------------------------------------------------------


def test_defaults_reproduce_the_case_saved_before_the_variants_bit_for_bit():
    with open(CASE) as f:
        case = json.load(f)  # written by tests/step2/data/make_loss_case.py at commit c2f9be3
    t = {name: torch.tensor(case[name]) for name in ("logps", "old_logps", "ref_logps", "entropy", "rewards")}
    mask = torch.tensor(case["mask"])
    assert group_advantages(t["rewards"], num_generations=4).tolist() == case["advantages_of_rewards"]
    for loss_agg, saved in case["outputs"].items():
        logps, entropy = t["logps"].clone().requires_grad_(), t["entropy"].clone().requires_grad_()
        loss, metrics = grpo_loss(logps, t["old_logps"], t["ref_logps"], torch.tensor(case["advantages"]), mask,
                                  clip_eps=0.2, kl_coef=0.04, entropy_coef=1e-3, entropy=entropy, loss_agg=loss_agg)
        loss.backward()
        assert loss.item() == saved["loss"]
        assert {k: metrics[k] for k in saved["metrics"]} == saved["metrics"]  # later metrics are new keys
        assert logps.grad.tolist() == saved["logps_grad"] and entropy.grad.tolist() == saved["entropy_grad"]


# --- advantages: --scale-rewards ----------------------------------------------------------------------


def test_scale_rewards_none_only_centres_the_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.7, 0.7, 0.7, 0.7], [3.0, 1.0, 1.0, 3.0]])
    advantages = group_advantages(rewards, num_generations=4, scale="none")
    assert advantages[0].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    assert torch.equal(advantages[1], torch.zeros(4))
    assert advantages[2].tolist() == [1.0, -1.0, -1.0, 1.0]


# --- clip-higher ------------------------------------------------------------------------------------


def test_clip_higher_widens_only_the_upper_side():
    # ratio 1.25, A = 2: clipped to 1.2 by the symmetric 0.2, inside 1 + 0.28
    assert one_token(1.25, 2.0)[0] == pytest.approx(-1.2 * 2)
    loss, metrics, grad = one_token(1.25, 2.0, clip_eps_low=0.2, clip_eps_high=0.28)
    assert loss == pytest.approx(-1.25 * 2) and grad == pytest.approx(-1.25 * 2) and metrics["clip_ratio"] == 0
    # ratio 1.3, A = 2: clipped at 1.28, no gradient
    loss, metrics, grad = one_token(1.3, 2.0, clip_eps_low=0.2, clip_eps_high=0.28)
    assert loss == pytest.approx(-1.28 * 2) and grad == 0.0
    assert (metrics["clip_ratio/high_mean"], metrics["clip_ratio/low_mean"]) == (1.0, 0.0)
    # ratio 0.75, A = -1: the lower side still clips at 0.8
    loss, metrics, grad = one_token(0.75, -1.0, clip_eps_low=0.2, clip_eps_high=0.28)
    assert loss == pytest.approx(0.8) and grad == 0.0
    assert (metrics["clip_ratio/high_mean"], metrics["clip_ratio/low_mean"]) == (0.0, 1.0)


# --- aggregations -----------------------------------------------------------------------------------


def test_seq_mean_token_sum_norm_divides_the_token_sum_by_sequences_times_max_length():
    # ratio 1: per-token loss -A; sequence 0 has 1 token (A=3), sequence 1 three (A=1); max length 4
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    advantages = torch.tensor([3.0, 1.0])
    denominator = step_denominator(step_units("seq-mean-token-sum-norm", mask, 4), 1, 1)
    assert denominator == 2 * 4
    loss, _ = grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), None, advantages, mask, kl_coef=0.0,
                        loss_agg="seq-mean-token-sum-norm", denominator=denominator)
    assert loss.item() == pytest.approx(-(3 + 1 + 1 + 1) / 8)  # token-mean: -6/4, seq-mean-token-mean: -4/2


def test_token_mean_global_averages_over_every_token_of_the_step_across_micro_batches_and_ranks():
    # 2 ranks x 2 micro-batches with 1, 3 | 2, 6 completion tokens; values v on every token of a micro-batch
    masks = [torch.tensor([[1, 0, 0]]), torch.tensor([[1, 1, 1]]), torch.tensor([[1, 1, 0]]),
             torch.ones(1, 6, dtype=torch.long)]
    values = [1.0, 2.0, 3.0, 4.0]
    units = sum(step_units("token-mean-global", m, 99) for m in masks)
    assert units == 12
    denominator = step_denominator(units, micro_batches_per_rank=2, world_size=2)
    losses = [masked_aggregate(torch.full(m.shape, v), m.bool(), "token-mean-global", denominator).item()
              for m, v in zip(masks, values)]
    # DeepSpeed: each loss / 2 accumulation steps, gradients averaged over 2 ranks
    assert sum(losses) / 4 == pytest.approx((1 * 1 + 2 * 3 + 3 * 2 + 4 * 6) / 12)
    with pytest.raises(ValueError, match="denominator"):
        masked_aggregate(torch.ones(1, 3), masks[0].bool(), "token-mean-global")


# --- GSPO: sequence-level ratios --------------------------------------------------------------------


def test_sequence_level_ratio_is_the_geometric_mean_of_the_token_ratios_with_its_own_clip():
    # sequence 0: token ratios 1.0012 and 1 -> s = sqrt(1.0012) = 1.0006 > 1 + 4e-4, A = 1: clipped
    # sequence 1: token ratios 2 and 0.5 -> s = 1, A = -2: not clipped; padding ignored
    logps = torch.log(torch.tensor([[1.0012, 1.0, 7.0], [2.0, 0.5, 7.0]])).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    loss, metrics = grpo_loss(logps, torch.zeros(2, 3), None, torch.tensor([1.0, -2.0]), mask, kl_coef=0.0,
                              entropy_coef=0.0, importance_level="sequence", clip_eps_low=3e-4, clip_eps_high=4e-4,
                              loss_agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx((-1.0004 * 1 + 1 * 2) / 2, abs=1e-7)
    assert metrics["clip_ratio/high_mean"] == 0.5 and metrics["clip_ratio/low_mean"] == 0.0
    loss.backward()
    # d/dlogp_t of -s A / 2 sequences with ds/dlogp_t = s / 2 tokens: 0 where clipped, 2 * 1 / 2 / 2 for sequence 1
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.5, 0.0]]))


# --- rollout importance correction (TIS) ------------------------------------------------------------


def test_rollout_is_weights_are_truncated_at_the_cap_and_weight_only_the_policy_term():
    old = torch.log(torch.tensor([[0.6, 0.1, 0.3, 0.9]]))
    rollout = torch.log(torch.tensor([[0.2, 0.2, 0.3, 0.0]]))  # ratios 3, 0.5, 1; the padding's log 0 = -inf
    mask = torch.tensor([[1, 1, 1, 0]])
    weights, stats = rollout_is_weights(old, rollout, mask, cap=2.0)
    assert weights[0, :3].tolist() == pytest.approx([2.0, 0.5, 1.0]) and weights[0, 3] == 1.0
    assert stats == pytest.approx({"rollout_is/mean": 1.5, "rollout_is/max": 3.0, "rollout_is/frac_capped": 1 / 3})
    ref = old - 0.5  # k3 of a constant log-ratio 0.5 on every token: e^-0.5 + 0.5 - 1
    loss, metrics = grpo_loss(old, old, ref, torch.tensor([1.0]), mask, kl_coef=0.1, entropy_coef=0.0,
                              is_weights=weights)
    k3 = math.exp(-0.5) + 0.5 - 1
    assert metrics["policy_loss"] == pytest.approx(-(2 + 0.5 + 1) / 3)
    assert metrics["kl"] == pytest.approx(k3) and loss.item() == pytest.approx(-3.5 / 3 + 0.1 * k3)


# --- KL estimators, in the loss and in the reward -----------------------------------------------------


@pytest.mark.parametrize("estimator, value, slope", [
    ("k1", math.log(2), 1.0),                    # log pi - log pi_ref; d/dlogp = 1
    ("k2", 0.5 * math.log(2) ** 2, math.log(2)),  # (k1)^2 / 2; d/dlogp = k1
    ("k3", 0.5 + math.log(2) - 1, 0.5),         # e^r - r - 1 with r = log 0.5; d/dlogp = 1 - e^r
])
def test_kl_estimators_by_hand(estimator, value, slope):
    logps = torch.tensor([[math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]])
    assert kl_estimate(logps, ref, estimator).item() == pytest.approx(value)
    loss, metrics = grpo_loss(logps, logps.detach(), ref, torch.tensor([0.0]), torch.ones(1, 1), kl_coef=0.04,
                              entropy_coef=0.0, kl_estimator=estimator)
    loss.backward()
    assert metrics["kl"] == pytest.approx(value) and logps.grad.item() == pytest.approx(0.04 * slope)


def test_kl_in_reward_is_beta_times_the_estimate_summed_over_each_completions_tokens():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.25, 0.9, 0.9]]))
    ref = torch.log(torch.tensor([[0.25, 0.25, 0.9], [0.5, 0.9, 0.9]]))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # masked tokens count for nothing
    for estimator, per_token in (("k1", [[math.log(2)] * 2, [-math.log(2)]]),
                                 ("k3", [[0.5 + math.log(2) - 1] * 2, [2 - math.log(2) - 1]])):
        expected = [0.1 * sum(tokens) for tokens in per_token]
        assert kl_penalties(old, ref, mask, estimator, 0.1).tolist() == pytest.approx(expected)


# --- the same numbers as TRL 1.16 -------------------------------------------------------------------


@pytest.mark.parametrize("loss_agg, loss_type", [("token-mean", "bnpo"), ("seq-mean-token-mean", "grpo"),
                                                 ("seq-mean-token-sum-norm", "dr_grpo")])
def test_loss_and_gradient_equal_trls_with_clip_higher(loss_agg, loss_type):
    logps, old, ref, advantages, mask = random_batch(0, spread=0.5)
    denominator = step_denominator(step_units(loss_agg, mask, 8), 1, 1) if loss_type == "dr_grpo" else None
    loss, grad, metrics = ours(logps, old, ref, advantages, mask, kl_coef=0.04, clip_eps_low=0.2,
                               clip_eps_high=0.28, loss_agg=loss_agg, denominator=denominator)
    trl, trl_grad, trl_metrics = trl_loss(logps, old, ref, advantages, mask, loss_type=loss_type, beta=0.04,
                                          epsilon_low=0.2, epsilon_high=0.28, max_completion_length=8)
    assert 0 < metrics["clip_ratio/low_mean"] and 0 < metrics["clip_ratio/high_mean"]  # both sides clip
    assert loss == pytest.approx(trl, rel=1e-6, abs=1e-7)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-5, atol=1e-8)
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean"):
        assert metrics[name] == pytest.approx(trl_metrics[name])
    assert metrics["clip_ratio"] == pytest.approx(trl_metrics["clip_ratio/region_mean"])
    if loss_agg != "seq-mean-token-mean":  # TRL logs the KL's token mean for every loss type; we aggregate it
        assert metrics["kl"] == pytest.approx(trl_metrics["kl"], rel=1e-6)  # like the loss, or as a token mean


def test_token_mean_global_equals_trls_dapo_over_two_micro_batches():
    logps, old, ref, advantages, mask = random_batch(1, spread=0.5)
    halves = [slice(0, 2), slice(2, 4)]  # 10 and 7 completion tokens
    total = int(mask.sum())
    denominator = step_denominator(sum(step_units("token-mean-global", mask[h], 8) for h in halves), 2, 1)
    for h in halves:
        loss, grad, _ = ours(logps[h], old[h], ref[h], advantages[h], mask[h], kl_coef=0.04, clip_eps_high=0.28,
                             loss_agg="token-mean-global", denominator=denominator)
        trl, trl_grad, _ = trl_loss(logps[h], old[h], ref[h], advantages[h], mask[h], loss_type="dapo", beta=0.04,
                                    epsilon_high=0.28, num_items_in_batch=total, gradient_accumulation_steps=2)
        # DeepSpeed divides our micro-batch loss by the 2 accumulation steps; TRL's dapo does not
        assert loss / 2 == pytest.approx(trl, rel=1e-6, abs=1e-7)
        torch.testing.assert_close(grad / 2, trl_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("loss_agg, loss_type", [("seq-mean-token-mean", "grpo"), ("token-mean", "bnpo")])
def test_sequence_level_importance_equals_trls(loss_agg, loss_type):
    logps, old, ref, advantages, mask = random_batch(2, spread=2e-3)
    loss, grad, metrics = ours(logps, old, ref, advantages, mask, kl_coef=0.04, importance_level="sequence",
                               clip_eps_low=3e-4, clip_eps_high=4e-4, loss_agg=loss_agg)
    trl, trl_grad, trl_metrics = trl_loss(logps, old, ref, advantages, mask, loss_type=loss_type, beta=0.04,
                                          epsilon_low=3e-4, epsilon_high=4e-4, importance_sampling_level="sequence")
    assert 0 < metrics["clip_ratio"] < 1
    assert loss == pytest.approx(trl, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-4, atol=1e-8)


def test_rollout_is_equals_trls_vllm_importance_sampling_correction():
    logps, old, ref, advantages, mask = random_batch(3, spread=0.3)
    g = torch.Generator().manual_seed(4)
    rollout = old + (torch.rand(4, 6, generator=g) - 0.5) * 2.0  # some ratios beyond the cap 2
    weights, stats = rollout_is_weights(old, rollout, mask, cap=2.0)
    assert 0 < stats["rollout_is/frac_capped"] < 1
    loss, grad, _ = ours(logps, old, ref, advantages, mask, kl_coef=0.04, is_weights=weights)
    # TRL's token_truncate ratio (GRPOTrainer._generate_and_score_completions), clip_min None, clip_max 2
    trl_ratio = torch.clamp(torch.exp((old - rollout) * mask), min=None, max=2.0)
    trl, trl_grad, _ = trl_loss(logps, old, ref, advantages, mask, loss_type="bnpo", beta=0.04,
                                importance_sampling_ratio=trl_ratio)
    assert loss == pytest.approx(trl, rel=1e-6, abs=1e-7)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-5, atol=1e-8)


# --- flags ------------------------------------------------------------------------------------------

REQUIRED = ["--model-path", "m", "--registry", "r.json", "--data-path", "d", "--output-dir", "o", "--variant", "grpo",
            "--rollout-batch-size", "4", "--num-generations", "2", "--micro-batch-size", "2"]


def test_variant_flags_default_to_trust_grpo_and_resolve_the_clip_range():
    args = parse_args(REQUIRED)
    assert (args.loss_agg, args.scale_rewards, args.importance_level, args.kl_estimator, args.rollout_is) == \
        ("token-mean", "group", "token", "k3", "none")
    assert (args.clip_eps, args.clip_eps_low, args.clip_eps_high) == (0.2, 0.2, 0.2)
    assert not (args.kl_in_reward or args.mask_truncated or args.dynamic_sampling or args.overlong_buffer)
    args = parse_args(REQUIRED + ["--clip-eps-high", "0.28"])
    assert (args.clip_eps, args.clip_eps_low, args.clip_eps_high) == (None, 0.2, 0.28)
    args = parse_args(REQUIRED + ["--importance-level", "sequence"])  # GSPO's own epsilons
    assert (args.clip_eps_low, args.clip_eps_high) == (3e-4, 4e-4)
    args = parse_args(REQUIRED + ["--importance-level", "sequence", "--clip-eps", "1e-3", "--clip-eps-low", "2e-4"])
    assert (args.clip_eps_low, args.clip_eps_high) == (2e-4, 1e-3)


@pytest.mark.parametrize("extra, message", [
    (["--rollout-engine", "hf", "--rollout-is", "tis"], "--rollout-is tis .* --rollout-engine hf"),
    (["--kl-in-reward", "--kl-coef", "0"], "--kl-in-reward"),
    (["--max-completion-length", "16", "--overlong-buffer", "16"], "--overlong-buffer"),
    (["--overlong-buffer", "4", "--overlong-penalty", "-1"], "--overlong-penalty"),
    (["--clip-eps-low", "1"], "--clip-eps-low"),
    (["--dynamic-sampling", "--num-generations", "1", "--micro-batch-size", "1"], "--num-generations"),
    (["--dynamic-sampling-max-rounds", "0"], "--dynamic-sampling-max-rounds"),
    (["--rollout-is-cap", "0"], "--rollout-is-cap"),
])
def test_bad_variant_flags_are_rejected_naming_the_flag(extra, message):
    with pytest.raises(InputError, match=message):
        check_args(parse_args(REQUIRED + extra), world_size=2)


# --- overlong shaping and truncated completions -------------------------------------------------------


def test_overlong_penalty_is_zero_before_the_buffer_and_falls_linearly_to_minus_p_at_the_cap():
    # max 16, buffer 4: free up to 12 tokens, then -(length - 12) / 4 x P
    assert overlong_penalties([3, 12, 13, 14, 16, 20], 16, 4, 0.5) == pytest.approx([0, 0, -0.125, -0.25, -0.5, -0.5])


def test_a_completion_is_truncated_when_it_hits_the_cap_without_a_stop_token():
    stop = {7, 9}
    token_ids = [[1, 2, 3, 4], [1, 2, 3, 7], [1, 2, 9], [1, 2]]
    assert truncated(token_ids, 4, stop) == [True, False, False, False]
    # --mask-truncated zeroes the truncated row's mask: it adds nothing to the loss nor to a step's token count
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1]])
    mask[[row for row, cut in enumerate(truncated(token_ids[:2], 4, stop)) if cut]] = 0
    loss, _ = grpo_loss(torch.zeros(2, 4), torch.zeros(2, 4), None, torch.tensor([5.0, -1.0]), mask, kl_coef=0.0)
    assert loss.item() == 1.0 and step_units("token-mean-global", mask, 4) == 4


# --- dynamic sampling ---------------------------------------------------------------------------------


def make_round(tag: str, rewards: list[float], n: int = 2) -> dict:
    prompts = len(rewards) // n
    texts = [f"{tag}{i}" for i in range(len(rewards))]
    return {"rows": [f"{tag}-row{k}" for k in range(prompts)], "gammas": [1.0] * prompts, "rewards": rewards,
            "completions": Completions(texts, [[i] for i in range(len(rewards))], [[-0.5]] * len(rewards))}


def test_zero_spread_groups_are_dropped_and_refilled_from_the_next_round():
    first = make_round("a", [1.0, 0.0, 0.5, 0.5, 0.0, 1.0])  # group a-row1 has zero spread
    drawn = []

    def draw(r):
        drawn.append(r)
        return make_round("b", [0.2, 0.2, 0.3, 0.1, 1.0, 1.0])  # b-row1 varies
    batch, metrics = fill_batch(first, draw, quota=3, num_generations=2, max_rounds=4, all_ranks_full=lambda f: f)
    assert drawn == [1]
    assert batch["rows"] == ["a-row0", "a-row2", "b-row1"]
    assert batch["rewards"] == [1.0, 0.0, 0.0, 1.0, 0.3, 0.1]
    assert batch["completions"].texts == ["a0", "a1", "a4", "a5", "b2", "b3"]
    assert batch["completions"].token_ids == [[0], [1], [4], [5], [2], [3]]
    assert metrics == {"dynamic_sampling/rounds": 2, "dynamic_sampling/frac_zero_std_drawn": 3 / 6,
                       "dynamic_sampling/frac_zero_std_kept": 0.0}


def test_after_the_last_round_a_rank_fills_up_with_zero_spread_groups_and_waits_for_the_others():
    first = make_round("a", [1.0, 1.0, 0.0, 1.0])
    answers = []

    def all_full(mine):  # as min_across_ranks: another rank is still short in round 0
        answers.append(mine)
        return len(answers) > 1 and mine
    batch, metrics = fill_batch(first, lambda r: make_round("b", [0.0, 0.0, 0.5, 0.5]), quota=2, num_generations=2,
                                max_rounds=3, all_ranks_full=all_full)
    assert answers == [False, False, False]  # 3 rounds, never 2 varying groups
    assert batch["rows"] == ["a-row0", "a-row1"] and batch["rewards"] == [1.0, 1.0, 0.0, 1.0]
    assert metrics["dynamic_sampling/rounds"] == 3 and metrics["dynamic_sampling/frac_zero_std_kept"] == 0.5


def test_refill_prompts_depend_on_seed_step_and_round_only_and_differ_across_ranks():
    ranks = [refill_prompts(100, 42, 7, 1, per_rank=3, rank=r, world_size=2) for r in (0, 1)]
    assert ranks == [refill_prompts(100, 42, 7, 1, per_rank=3, rank=r, world_size=2) for r in (0, 1)]
    assert len(set(ranks[0] + ranks[1])) == 6
    assert refill_prompts(100, 42, 7, 2, 3, 0, 2) != ranks[0] and refill_prompts(100, 42, 8, 1, 3, 0, 2) != ranks[0]
    assert len(refill_prompts(2, 42, 7, 1, per_rank=3, rank=1, world_size=2)) == 3  # fewer rows than the batch
