"""Writes loss_case.json: inputs and outputs of step 2's loss and group advantages as they were before the
GRPO-variant flags (issue 19), so tests/step2/test_loss_variants.py can check that the defaults still give the
same numbers bit for bit. Run once, from the repo root: .venv/bin/python -m tests.step2.data.make_loss_case"""
import json
import math
import os

import torch

from step2_trust_grpo.loss import group_advantages, grpo_loss

HERE = os.path.dirname(os.path.abspath(__file__))


def case_inputs():
    g = torch.Generator().manual_seed(19)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    old_logps = -torch.rand(4, 6, generator=g) * 2 - 0.7  # log-probs stay < 0 after the shifts below
    # log-ratios up to +-0.6: the clip (0.2) is active on both sides, for positive and negative advantages
    logps = old_logps + (torch.rand(4, 6, generator=g) - 0.5) * 1.2
    ref_logps = old_logps + (torch.rand(4, 6, generator=g) - 0.5) * 0.8
    entropy = torch.rand(4, 6, generator=g) * 3
    for t in (old_logps, logps, ref_logps, entropy):
        t[mask == 0] = float("nan")  # padding garbage must not matter
    # three groups of 4: Trust-GRPO-like rewards, a uniform group, a binary group
    rewards = torch.tensor([1.21, 0.17, 1.09, 0.0, 0.35, 0.35, 0.35, 0.35, 1.0, 0.0, 0.0, 1.0])
    advantages = group_advantages(rewards, num_generations=4)[:4]
    return dict(logps=logps, old_logps=old_logps, ref_logps=ref_logps, entropy=entropy, mask=mask,
                rewards=rewards, advantages=advantages)


def run_loss(inputs, loss_agg):
    logps = inputs["logps"].clone().requires_grad_()
    entropy = inputs["entropy"].clone().requires_grad_()
    loss, metrics = grpo_loss(logps, inputs["old_logps"], inputs["ref_logps"], inputs["advantages"], inputs["mask"],
                              clip_eps=0.2, kl_coef=0.04, entropy_coef=1e-3, entropy=entropy, loss_agg=loss_agg)
    loss.backward()
    return dict(loss=loss.item(), metrics=metrics, logps_grad=logps.grad.tolist(), entropy_grad=entropy.grad.tolist())


def main():
    inputs = case_inputs()
    case = {name: t.tolist() for name, t in inputs.items()}
    case["advantages_of_rewards"] = group_advantages(inputs["rewards"], num_generations=4).tolist()
    case["outputs"] = {agg: run_loss(inputs, agg) for agg in ("token-mean", "seq-mean-token-mean")}
    for out in case["outputs"].values():
        assert 0 < out["metrics"]["clip_ratio"] < 1 and not math.isnan(out["loss"])
    with open(os.path.join(HERE, "loss_case.json"), "w") as f:
        json.dump(case, f, indent=1, allow_nan=True)


if __name__ == "__main__":
    main()
