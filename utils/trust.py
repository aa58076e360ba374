"""Trust-GRPO's reward for one group of responses to the same prompt (paper eqs. 1-5).

The thinking reward is trusted (gamma = 1) unless the responses judged correct got *lower* thinking scores
on average than the wrong ones; then it is down-weighted by gamma = exp(mu_c - mu_w) < 1.
"""
import math

from sophiavl.utils.cli import InputError

CORRECT_THRESHOLD = 0.5  # R^o >= 0.5 counts as correct, so partial OCR / free-form rewards split too


def trust_weight(outcome, thinking):
    """gamma for one group: 1 when either side is empty or mu_c >= mu_w, else exp(mu_c - mu_w)."""
    correct = [t for o, t in zip(outcome, thinking) if o >= CORRECT_THRESHOLD]
    wrong = [t for o, t in zip(outcome, thinking) if o < CORRECT_THRESHOLD]
    if not correct or not wrong:
        return 1.0
    mean_correct, mean_wrong = sum(correct) / len(correct), sum(wrong) / len(wrong)
    return 1.0 if mean_correct >= mean_wrong else math.exp(mean_correct - mean_wrong)


def trust_rewards(outcome, thinking, step, *, alpha, horizon, use_trust=True, use_anneal=True):
    """R_i = R^o_i + gamma * alpha * exp(-step / horizon) * R^t_i for each response of one group.

    `step` starts at 1 for the first update. use_trust=False fixes gamma = 1 (ablation wo-trust);
    use_anneal=False drops the exp(-step / horizon) factor (with use_trust=False: wo-trust-and-annealing).
    Returns (rewards, gamma), gamma being the weight actually applied.
    """
    outcome, thinking = [float(o) for o in outcome], [float(t) for t in thinking]
    if len(outcome) != len(thinking):
        raise InputError(f"{len(outcome)} outcome rewards but {len(thinking)} thinking rewards in one group")
    if use_anneal and (horizon is None or not horizon > 0):
        raise InputError(f"the annealing horizon must be > 0, got {horizon}")
    gamma = trust_weight(outcome, thinking) if use_trust else 1.0
    weight = gamma * alpha * (math.exp(-step / horizon) if use_anneal else 1.0)
    return [o + weight * t for o, t in zip(outcome, thinking)], gamma
