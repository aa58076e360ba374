import math

import pytest
import torch

from step2_trust_grpo.loss import entropy_from_logits, group_advantages, grpo_loss, selective_log_softmax
from sophiavl.utils.cli import InputError

EPS = 1e-6


def one_token(log_ratio, advantage, **kwargs):
    """A single response of a single token with pi/pi_old = exp(log_ratio); returns (loss, metrics, logps)."""
    logps = torch.tensor([[log_ratio]], requires_grad=True)
    old_logps = torch.zeros(1, 1)
    kwargs = {"kl_coef": 0.0, "entropy_coef": 0.0, **kwargs}
    loss, metrics = grpo_loss(logps, old_logps, None, torch.tensor([advantage]), torch.ones(1, 1), **kwargs)
    return loss, metrics, logps


# --- advantages -------------------------------------------------------------------------------------


def test_advantages_of_a_two_right_two_wrong_group_use_the_unbiased_std():
    # mean 0.5, deviations +-0.5, unbiased var = (4 * 0.25) / 3 = 1/3
    expected = 0.5 / (math.sqrt(1 / 3) + EPS)
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), num_generations=4)
    assert advantages.tolist() == pytest.approx([expected, -expected, -expected, expected], abs=1e-6)
    assert expected == pytest.approx(math.sqrt(3) / 2, abs=2e-6)


def test_advantages_of_one_right_out_of_four():
    # mean 0.25, unbiased var = (0.5625 + 3 * 0.0625) / 3 = 0.25, std 0.5 (the biased std would give 1.732)
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), num_generations=4)
    assert advantages.tolist() == pytest.approx([0.75 / (0.5 + EPS)] + [-0.25 / (0.5 + EPS)] * 3, abs=1e-6)


def test_a_group_of_identical_rewards_gets_exactly_zero():
    # 0.7 is not exact in fp32: the computed mean differs from the rewards by ~6e-8
    assert torch.equal(group_advantages(torch.full((8,), 0.7), num_generations=8), torch.zeros(8))
    assert torch.equal(group_advantages(torch.tensor([0.3, 0.9]), num_generations=1), torch.zeros(2))


def test_groups_are_normalised_independently_and_keep_the_input_shape():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.7, 0.7, 0.7, 0.7], [3.0, 1.0, 1.0, 3.0]])
    advantages = group_advantages(rewards, num_generations=4)
    assert advantages.shape == (3, 4)
    assert advantages[0].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)
    assert torch.equal(advantages[1], torch.zeros(4))
    # deviations +-1, unbiased std sqrt(4/3): same as the first test scaled by 2
    a = 1 / (math.sqrt(4 / 3) + EPS)
    assert advantages[2].tolist() == pytest.approx([a, -a, -a, a], abs=1e-6)
    assert torch.equal(group_advantages(rewards.flatten(), num_generations=4), advantages.flatten())


def test_rewards_that_do_not_split_into_groups_are_rejected():
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.zeros(6), num_generations=4)
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.zeros(2, 3), num_generations=4)


# --- log-probs and entropy --------------------------------------------------------------------------


def test_selective_log_softmax_equals_log_softmax_gather():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 4
    token_ids = torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits, dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(logits, token_ids), expected)


def test_selective_log_softmax_does_its_math_in_fp32():
    torch.manual_seed(0)
    logits = (torch.randn(2, 4, 50) * 10).bfloat16()
    token_ids = torch.randint(0, 50, (2, 4))
    logps = selective_log_softmax(logits, token_ids)
    expected = torch.log_softmax(logits.float(), dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps, expected)


def test_entropy_from_logits():
    logits = torch.zeros(1, 2, 8)
    logits[0, 1] = torch.tensor([0.0, -1e4, -1e4, -1e4, -1e4, -1e4, -1e4, -1e4])  # one certain token
    assert entropy_from_logits(logits)[0].tolist() == pytest.approx([math.log(8), 0.0], abs=1e-6)
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7)
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), expected)


# --- PPO clip ---------------------------------------------------------------------------------------


def test_ratio_above_the_clip_with_positive_advantage_is_clipped():
    loss, metrics, logps = one_token(math.log(1.5), 2.0, clip_eps=0.2)
    assert loss.item() == pytest.approx(-1.2 * 2.0)
    assert metrics["clip_ratio"] == 1.0
    loss.backward()
    assert logps.grad.item() == 0.0  # the clipped branch is constant in theta


def test_ratio_below_the_clip_with_positive_advantage_is_not_clipped():
    loss, metrics, _ = one_token(math.log(0.5), 2.0, clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.5 * 2.0)
    assert metrics["clip_ratio"] == 0.0


def test_ratio_below_the_clip_with_negative_advantage_is_clipped():
    loss, metrics, _ = one_token(math.log(0.5), -1.0, clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.8 * -1.0)
    assert metrics["clip_ratio"] == 1.0


def test_ratio_above_the_clip_with_negative_advantage_is_not_clipped():
    loss, metrics, _ = one_token(math.log(1.5), -1.0, clip_eps=0.2)
    assert loss.item() == pytest.approx(-1.5 * -1.0)
    assert metrics["clip_ratio"] == 0.0


def test_zero_advantage_is_never_counted_as_clipped():
    loss, metrics, _ = one_token(math.log(1.5), 0.0)
    assert loss.item() == 0.0
    assert metrics["clip_ratio"] == 0.0


# --- KL and entropy terms ---------------------------------------------------------------------------


def test_k3_kl_value_and_gradient_by_hand():
    # logp = log 0.5, ref = log 0.25: r = ref - logp = log 0.5; k3 = e^r - r - 1 = 0.5 + log 2 - 1
    k3 = 0.5 + math.log(2) - 1
    logps = torch.tensor([[math.log(0.5)]], requires_grad=True)
    ref_logps = torch.tensor([[math.log(0.25)]])
    loss, metrics = grpo_loss(
        logps, logps.detach(), ref_logps, torch.tensor([0.0]), torch.ones(1, 1), kl_coef=0.04, entropy_coef=0.0
    )
    assert metrics["kl"] == pytest.approx(k3)
    assert loss.item() == pytest.approx(0.04 * k3)
    loss.backward()
    # d k3 / d logp = 1 - e^(ref - logp) = 0.5
    assert logps.grad.item() == pytest.approx(0.04 * 0.5)


def test_k3_kl_is_clamped():
    logps = torch.tensor([[-30.0]])
    loss, metrics = grpo_loss(
        logps, logps, torch.zeros(1, 1), torch.tensor([0.0]), torch.ones(1, 1), kl_coef=1.0, entropy_coef=0.0
    )
    assert metrics["kl"] == 10.0 and loss.item() == 10.0


def test_no_reference_or_zero_kl_coef_means_no_kl_term():
    logps = torch.tensor([[math.log(0.5)]])
    ref_logps = torch.tensor([[math.log(0.25)]])
    args = (logps, logps, torch.tensor([1.0]), torch.ones(1, 1))
    for ref, kl_coef in ((None, 0.04), (ref_logps, 0.0)):
        loss, metrics = grpo_loss(args[0], args[1], ref, *args[2:], kl_coef=kl_coef, entropy_coef=0.0)
        assert metrics["kl"] == 0.0
        assert loss.item() == pytest.approx(-1.0)


def test_entropy_bonus_lowers_the_loss():
    entropy = torch.tensor([[2.0]], requires_grad=True)
    logps = torch.zeros(1, 1)
    loss, metrics = grpo_loss(
        logps, logps, None, torch.tensor([1.0]), torch.ones(1, 1), entropy=entropy, entropy_coef=0.1
    )
    assert metrics["entropy"] == 2.0
    assert loss.item() == pytest.approx(-1.0 - 0.1 * 2.0)
    loss.backward()
    assert entropy.grad.item() == pytest.approx(-0.1)


# --- masks and aggregation --------------------------------------------------------------------------


def batch_with_padding():
    torch.manual_seed(0)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 1, 0]])
    old_logps = -torch.rand(3, 4) - 0.5
    logps = old_logps + 0.3 * (torch.rand(3, 4) - 0.5)
    ref_logps = old_logps + 0.3 * (torch.rand(3, 4) - 0.5)
    entropy = torch.rand(3, 4)
    advantages = torch.tensor([1.0, -0.5, 2.0])
    return logps, old_logps, ref_logps, entropy, advantages, mask


def test_masked_tokens_change_nothing():
    logps, old_logps, ref_logps, entropy, advantages, mask = batch_with_padding()
    results = []
    for garbage in (None, float("inf"), float("nan"), -1e6):
        tensors = [t.clone() for t in (logps, old_logps, ref_logps, entropy)]
        if garbage is not None:
            for t in tensors:
                t[mask == 0] = garbage
        leaf = tensors[0].requires_grad_()
        entropy_leaf = tensors[3].requires_grad_()
        loss, metrics = grpo_loss(leaf, tensors[1], tensors[2], advantages, mask, entropy=entropy_leaf)
        loss.backward()
        assert torch.equal(leaf.grad[mask == 0], torch.zeros(int((mask == 0).sum())))
        assert torch.equal(entropy_leaf.grad[mask == 0], torch.zeros(int((mask == 0).sum())))
        results.append((loss.item(), metrics, leaf.grad[mask == 1]))
    for loss, metrics, grad in results[1:]:
        assert loss == results[0][0] and metrics == results[0][1]
        assert torch.equal(grad, results[0][2])


def test_token_mean_and_seq_mean_token_mean_on_unequal_lengths():
    # ratio 1 everywhere, so the per-token loss is -A: sequence 0 has one token (A=3), sequence 1 three (A=-1)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    logps = torch.zeros(2, 3)
    advantages = torch.tensor([3.0, -1.0])
    entropy = torch.tensor([[2.0, 9.0, 9.0], [1.0, 1.0, 1.0]])
    kwargs = {"kl_coef": 0.0, "entropy_coef": 0.0, "entropy": entropy}
    loss, metrics = grpo_loss(logps, logps, None, advantages, mask, loss_agg="token-mean", **kwargs)
    assert loss.item() == pytest.approx((-3 + 1 + 1 + 1) / 4)  # 0
    assert metrics["entropy"] == pytest.approx((2 + 1 + 1 + 1) / 4)
    loss, metrics = grpo_loss(logps, logps, None, advantages, mask, loss_agg="seq-mean-token-mean", **kwargs)
    assert loss.item() == pytest.approx((-3 + 1) / 2)
    assert metrics["entropy"] == pytest.approx((2 + 1) / 2)


def test_seq_mean_token_mean_skips_sequences_without_tokens():
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [0, 0, 0]])
    loss, _ = grpo_loss(
        torch.zeros(3, 3), torch.zeros(3, 3), None, torch.tensor([3.0, -1.0, 5.0]), mask,
        kl_coef=0.0, loss_agg="seq-mean-token-mean",
    )
    assert loss.item() == pytest.approx(-1.0)


def test_unknown_loss_agg_names_the_flag():
    with pytest.raises(InputError, match="--loss-agg"):
        grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), None, torch.zeros(1), torch.ones(1, 1), loss_agg="sum")


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="shapes"):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), None, torch.zeros(3), torch.ones(2, 3))


def test_gradient_equals_the_analytic_value_when_unclipped():
    logps, old_logps, ref_logps, entropy, advantages, mask = batch_with_padding()
    assert ((logps - old_logps).abs() < math.log(1.2)).all()  # every ratio inside the clip range
    logps.requires_grad_()
    entropy.requires_grad_()
    kl_coef, entropy_coef = 0.04, 1e-3
    loss, metrics = grpo_loss(
        logps, old_logps, ref_logps, advantages, mask, kl_coef=kl_coef, entropy_coef=entropy_coef, entropy=entropy
    )
    loss.backward()
    n = mask.sum()
    # d/dlogp of [-ratio * A + kl_coef * (e^(ref - logp) - (ref - logp) - 1)] / n
    per_token = -torch.exp(logps - old_logps) * advantages[:, None] + kl_coef * (1 - torch.exp(ref_logps - logps))
    torch.testing.assert_close(logps.grad, (per_token * mask / n).detach())
    torch.testing.assert_close(entropy.grad, -entropy_coef * mask / n)
    assert metrics["clip_ratio"] == 0.0
    expected = metrics["policy_loss"] + kl_coef * metrics["kl"] - entropy_coef * metrics["entropy"]
    assert loss.item() == pytest.approx(expected)


def test_clip_ratio_is_the_fraction_of_response_tokens_clipped():
    # tokens (ratio, A): (1.5, +1) clipped, (1.0, +1) not, (0.5, -1) clipped; the padded 1.5 does not count
    logps = torch.log(torch.tensor([[1.5, 1.0, 1.5], [0.5, 1.5, 1.5]]))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    _, metrics = grpo_loss(logps, torch.zeros(2, 3), None, torch.tensor([1.0, -1.0]), mask, kl_coef=0.0)
    assert metrics["clip_ratio"] == pytest.approx(2 / 3)
