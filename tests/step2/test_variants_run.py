"""The GRPO variants in real 2-rank ZeRO-3 runs: a DAPO-style step-2 run (vLLM rollouts, a live HTTP judge)
completes, refills zero-spread groups round by round and resumes exactly; DeepSpeed's gradient under the
step-global token aggregation is the global token mean's."""
import json
import os
import shutil
import zlib

import pytest

from tests.fake_judge import FakeJudge, reply, request_text
from tests.helpers import check_ok, metrics, run_step2, without_timings

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


@pytest.mark.vllm
def test_dynamic_sampling_tis_and_global_token_mean_run_refill_and_resume_exactly(tiny_assets, tmp_path):
    pytest.importorskip("vllm")
    a, b = tmp_path / "a", tmp_path / "b"
    with FakeJudge(judge) as trm:
        check_ok(run_step2(tiny_assets, a, *FLAGS, "--trm-url", trm.url, timeout=600))
        calls_uninterrupted = len(trm.requests)
        # b: the uninterrupted run as it stood after step 1 (its checkpoint was written before step 2 began)
        shutil.copytree(a, b)
        shutil.rmtree(b / "checkpoints" / "step2")
        shutil.rmtree(b / "final")
        (b / "checkpoints" / "latest").write_text("step1")
        check_ok(run_step2(tiny_assets, b, *FLAGS, "--trm-url", trm.url, "--resume", timeout=600))
        calls_resumed = len(trm.requests) - calls_uninterrupted

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


def test_deepspeed_applies_the_gradient_of_the_step_global_token_mean(tiny_assets):
    result = run_step2(tiny_assets, None, script="tests/step2/global_loss_check.py")
    check_ok(result)
    assert "GLOBAL-OK rank 0" in result.stdout and "GLOBAL-OK rank 1" in result.stdout
