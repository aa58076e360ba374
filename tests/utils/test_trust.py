import math

import pytest

from sophiavl.utils.cli import InputError
from sophiavl.utils.trust import trust_rewards

OUTCOME = [1.0, 1.0, 0.0, 0.0]
DISTRUSTED_THINKING = [0.2, 0.4, 0.8, 0.6]  # mu_c = 0.3 < mu_w = 0.7


def test_distrusted_group_hand_computed():
    rewards, gamma = trust_rewards(OUTCOME, DISTRUSTED_THINKING, step=1, alpha=0.3, horizon=10)
    assert gamma == pytest.approx(math.exp(0.3 - 0.7))  # 0.6703
    weight = math.exp(-0.4) * 0.3 * math.exp(-0.1)       # gamma * alpha * exp(-step / T) = 0.18196
    assert weight == pytest.approx(0.181959, abs=1e-6)
    assert rewards == pytest.approx([1 + 0.2 * weight, 1 + 0.4 * weight, 0.8 * weight, 0.6 * weight])


def test_trusted_group_keeps_gamma_one():
    rewards, gamma = trust_rewards(OUTCOME, [0.9, 0.7, 0.1, 0.3], step=0, alpha=0.5, horizon=100)
    assert gamma == 1.0
    assert rewards == pytest.approx([1.45, 1.35, 0.05, 0.15])  # exp(0) = 1 at step 0


def test_equal_means_are_trusted():
    _, gamma = trust_rewards(OUTCOME, [0.5, 0.5, 0.2, 0.8], step=1, alpha=0.3, horizon=10)
    assert gamma == 1.0


@pytest.mark.parametrize("outcome", [[0.0, 0.1, 0.2], [1.0, 0.9, 0.5]])
def test_one_sided_groups_are_trusted(outcome):
    rewards, gamma = trust_rewards(outcome, [0.9, 0.1, 0.5], step=2, alpha=1.0, horizon=2)
    assert gamma == 1.0
    assert rewards == pytest.approx([o + math.exp(-1) * t for o, t in zip(outcome, [0.9, 0.1, 0.5])])


def test_half_counts_as_correct():
    # 0.5 is correct: mu_c = 0.1, mu_w = 0.9. Were it wrong, the group would be one-sided and gamma 1.
    _, gamma = trust_rewards([0.5, 0.4], [0.1, 0.9], step=1, alpha=0.3, horizon=10)
    assert gamma == pytest.approx(math.exp(-0.8))


def test_just_below_half_counts_as_wrong():
    # 0.4999 is wrong: mu_c = 0.1, mu_w = 0.9. Were it correct, the group would be one-sided and gamma 1.
    _, gamma = trust_rewards([0.4999, 1.0], [0.9, 0.1], step=1, alpha=0.3, horizon=10)
    assert gamma == pytest.approx(math.exp(-0.8))


def test_annealing_factor_at_step_one_of_ten():
    rewards, _ = trust_rewards([0.0], [1.0], step=1, alpha=1.0, horizon=10)
    assert rewards == pytest.approx([math.exp(-0.1)])  # 0.904837


def test_without_trust_gamma_is_one():
    rewards, gamma = trust_rewards(OUTCOME, DISTRUSTED_THINKING, step=1, alpha=0.3, horizon=10, use_trust=False)
    assert gamma == 1.0
    weight = 0.3 * math.exp(-0.1)
    assert rewards == pytest.approx([1 + 0.2 * weight, 1 + 0.4 * weight, 0.8 * weight, 0.6 * weight])


def test_without_annealing_there_is_no_step_factor():
    rewards, gamma = trust_rewards(OUTCOME, DISTRUSTED_THINKING, step=500, alpha=0.3, horizon=None,
                                   use_anneal=False)
    weight = math.exp(-0.4) * 0.3
    assert gamma == pytest.approx(math.exp(-0.4))
    assert rewards == pytest.approx([1 + 0.2 * weight, 1 + 0.4 * weight, 0.8 * weight, 0.6 * weight])


def test_without_trust_and_annealing_is_plain_alpha():
    rewards, gamma = trust_rewards(OUTCOME, DISTRUSTED_THINKING, step=500, alpha=0.3, horizon=10,
                                   use_trust=False, use_anneal=False)
    assert gamma == 1.0
    assert rewards == pytest.approx([1.06, 1.12, 0.24, 0.18])


def test_zero_alpha_is_the_outcome_reward():
    rewards, _ = trust_rewards(OUTCOME, DISTRUSTED_THINKING, step=1, alpha=0.0, horizon=10)
    assert rewards == OUTCOME


def test_results_are_plain_floats_and_an_empty_group_is_fine():
    rewards, gamma = trust_rewards([1, 0], [0.0, 1.0], step=1, alpha=0.3, horizon=10)
    assert all(type(r) is float for r in rewards) and type(gamma) is float
    assert trust_rewards([], [], step=1, alpha=0.3, horizon=10) == ([], 1.0)


@pytest.mark.parametrize("horizon", [0, -5, None])
def test_non_positive_horizon_is_an_input_error_when_annealing(horizon):
    with pytest.raises(InputError, match="horizon must be > 0"):
        trust_rewards([1.0], [0.5], step=1, alpha=0.3, horizon=horizon)
    trust_rewards([1.0], [0.5], step=1, alpha=0.3, horizon=horizon, use_anneal=False)


def test_mismatched_lengths_are_an_input_error():
    with pytest.raises(InputError, match="2 outcome rewards but 3 thinking rewards"):
        trust_rewards([1.0, 0.0], [0.1, 0.2, 0.3], step=1, alpha=0.3, horizon=10)
