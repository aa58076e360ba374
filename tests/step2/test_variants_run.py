"""The GRPO variants in real 2-rank ZeRO-3 runs: a DAPO-style step-2 run (vLLM rollouts, a live HTTP judge)
completes, refills zero-spread groups round by round and resumes exactly; DeepSpeed's gradient under the
step-global token aggregation is the global token mean's."""
import json
import math
import shutil
import zlib

import pytest
import torch

from tests.fake_judge import FakeJudge, reply, request_text
from tests.helpers import check_ok, metrics, run_on_ranks, run_step2, without_timings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
FLAGS = ("--rollout-engine", "vllm", "--variant", "full", "--dynamic-sampling", "--rollout-is", "tis",
         "--loss-agg", "token-mean-global", "--clip-eps-high", "0.28", "--save-every", "1", "--log-completions",
         "--max-steps", "2")


def judge(body, index):
    """Deterministic scores: every response to half of the questions gets 0.5 (a group of equal final rewards,
    the outcome being 0 for the tiny model), the others a score drawn from the response's text."""
    text = request_text(body)
    question = text.split("Question:")[1].split("Reasoning process:")[0]
    response = text.split("Reasoning process:")[1].split("Your response format:")[0]
    if zlib.crc32(question.encode()) % 2:
        return reply("<answer>0.5</answer>")
    return reply(f"<answer>{zlib.crc32(response.encode()) % 11 / 10}</answer>")


def completion_log(output_dir, rank):
    with open(output_dir / "completions" / f"rank{rank}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def dapo_runs(tiny_assets, tmp_path_factory):
    """Run a: 2 uninterrupted steps of FLAGS through a live judge; run b: a's folder as it stood after step 1 (its
    checkpoint was written before step 2 began), resumed. Returns (a, b, the judge's calls in a, in b)."""
    pytest.importorskip("vllm")
    tmp_path = tmp_path_factory.mktemp("dapo")
    a, b = tmp_path / "a", tmp_path / "b"
    with FakeJudge(judge) as trm:
        check_ok(run_step2(tiny_assets, a, *FLAGS, "--trm-url", trm.url, timeout=600))
        calls_uninterrupted = len(trm.requests)
        shutil.copytree(a, b)
        shutil.rmtree(b / "checkpoints" / "step2")
        shutil.rmtree(b / "final")
        (b / "checkpoints" / "latest").write_text("step1")
        check_ok(run_step2(tiny_assets, b, *FLAGS, "--trm-url", trm.url, "--resume", timeout=600))
    return a, b, calls_uninterrupted, len(trm.requests) - calls_uninterrupted


@pytest.mark.vllm
def test_vllm_engine_with_live_trm_applies_the_thinking_reward(dapo_runs):
    """Every logged response's reward is R^o + alpha * exp(-step / T) * gamma * R^t with the judge's own score as
    R^t and the group's trust weight as gamma (alpha 0.3, T = --max-steps 2 by default), and every response of
    every round was judged."""
    a, _, calls, _ = dapo_runs
    judged = 0
    for rank in (0, 1):
        for group in completion_log(a, rank):
            correct = [t for o, t in zip(group["outcome"], group["thinking"]) if o >= 0.5]
            wrong = [t for o, t in zip(group["outcome"], group["thinking"]) if o < 0.5]
            gamma = 1.0 if not correct or not wrong or sum(correct) / len(correct) >= sum(wrong) / len(wrong) \
                else math.exp(sum(correct) / len(correct) - sum(wrong) / len(wrong))
            assert group["gamma"] == pytest.approx(gamma)
            for outcome, thinking, reward in zip(group["outcome"], group["thinking"], group["reward"]):
                assert thinking in [k / 10 for k in range(11)]  # a score the judge gave, parsed from its reply
                expected = outcome + 0.3 * math.exp(-group["step"] / 2) * group["gamma"] * thinking
                assert reward == pytest.approx(expected, abs=1e-6)
                judged += thinking > 0
    assert judged > 0  # the judge's scores reached the rewards
    assert calls == sum(row["trm/calls"] for row in metrics(a))


@pytest.mark.vllm
def test_dynamic_sampling_tis_and_global_token_mean_run_refill_and_resume_exactly(dapo_runs):
    a, b, calls_uninterrupted, calls_resumed = dapo_runs
    rows = metrics(a)
    assert [without_timings(r) for r in metrics(b)] == [without_timings(r) for r in rows]
    for rank in (0, 1):
        assert completion_log(b, rank) == completion_log(a, rank)
    step2 = rows[1]
    assert step2["dynamic_sampling/rounds"] >= 2 and step2["dynamic_sampling/frac_zero_std_drawn"] > 0
    # every round was judged before its groups were kept or dropped: 2 prompts x N 4 per rank and round, 2 ranks
    assert all(r["trm/calls"] == 2 * 8 * r["dynamic_sampling/rounds"] for r in rows)
    assert calls_resumed == step2["trm/calls"]  # the resume judged step 2's rounds again, no more
    for row in rows:
        if row["dynamic_sampling/frac_zero_std_kept"] == 0:
            assert row["frac_reward_zero_std"] == 0.0
        assert 0.5 < row["rollout_is/mean"] < 2 and row["rollout_is/max"] >= row["rollout_is/mean"]
    for rank in (0, 1):  # every rank trains on its 2 groups of 4 in every step
        assert [g["step"] for g in completion_log(a, rank)] == [1, 1, 2, 2]
        assert all(len(g["completions"]) == 4 for g in completion_log(a, rank))


def global_token_mean_gradient(rank):
    """With --loss-agg token-mean-global the gradient DeepSpeed's ZeRO-3 applies over a step (2 ranks x 2
    micro-batches of very different token counts) is that of (sum over every completion token of the step) / (their
    number), computed here in one piece (the per-micro-batch token-mean's differs). Uses the functions step 2's
    update_policy uses."""
    import deepspeed

    from sophiavl.utils.distributed import init_distributed, shutdown, sum_across_ranks
    from sophiavl.utils.ds_config import zero3_train_config
    from step2_trust_grpo.loss import masked_aggregate, step_denominator, step_units

    rank, world_size = init_distributed()
    g = torch.Generator().manual_seed(0)
    features = torch.randn(world_size, 2, 2, 4, 3, generator=g)  # rank, micro-batch, sequence, token, feature
    lengths = torch.tensor([[[4, 1], [1, 0]], [[4, 4], [3, 4]]])  # 6, 1 | 8, 7 completion tokens
    masks = torch.arange(4)[None, None, None, :] < lengths[..., None]
    w0 = torch.randn(3, generator=g)
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w0[None])
    config = zero3_train_config(micro_batch_size=2, gradient_accumulation_steps=2, world_size=world_size, bf16=False,
                                gradient_clipping=0.0, param_persistence_threshold=0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                      config=config)  # plain SGD, lr 1: w0 - w is the gradient DeepSpeed applied
    units = sum(step_units("token-mean-global", masks[rank, m], 99) for m in range(2))
    denominator = step_denominator(sum_across_ranks(units)[0], 2, world_size)
    for m in range(2):
        values = engine(features[rank, m]).squeeze(-1)  # a per-token "loss" linear in w
        engine.backward(masked_aggregate(values, masks[rank, m], "token-mean-global", denominator))
        engine.step()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        applied = w0 - engine.module.weight.detach().clone()[0]
    expected = (features * masks[..., None]).sum(dim=(0, 1, 2, 3)) / masks.sum()
    torch.testing.assert_close(applied, expected, rtol=1e-5, atol=1e-6)
    # what the per-micro-batch token-mean would have applied: the mean over micro-batches and ranks of their means
    per_micro_batch = ((features * masks[..., None]).sum(dim=(2, 3)) / masks.sum(dim=(2, 3))[..., None]).mean((0, 1))
    assert not torch.allclose(per_micro_batch, expected, rtol=1e-2), "the check cannot tell the aggregations apart"
    shutdown()


def test_deepspeed_applies_the_gradient_of_the_step_global_token_mean():
    run_on_ranks(global_token_mean_gradient, timeout=300)
