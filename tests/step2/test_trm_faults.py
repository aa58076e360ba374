"""Thinking-reward-server faults at the trainer level: through step2_trust_grpo.rewards.thinking_rewards against a
real local HTTP judge, then a 2-rank run whose judge fails at first and recovers. Every case has a hard time limit.

A refused connection and a server answering 500 to everything are in tests/step2/test_rewards.py; the client's
retry matrix is in tests/utils/test_trm_client.py.
"""
import re
import threading
import time

import pytest

from step2_trust_grpo.rewards import thinking_rewards
from tests.fake_judge import (DROP, HANG, INVALID_JSON, NO_CHOICES, FakeJudge, reply, request_text, status)
from tests.helpers import closed_port
from sophiavl.utils.trm_client import TRMClient

N = 3
QUESTIONS = ["q0", "q1", "q2"]
IMAGES = [[], [], []]
TEXTS = [f"<think>prompt {k} sample {j}</think><answer>A</answer>" for k in range(3) for j in range(N)]
OUTCOME = [1.0, 0.0, 1.0] * 3
TIMEOUT_S = 0.5  # the client's per-request bound; a late answer arrives after 1 s


def index_of(body) -> int:
    response = re.search(r"Reasoning process: (.*)\n    Your response format", request_text(body), re.DOTALL).group(1)
    return TEXTS.index(response)


def good_score(index: int) -> float:
    return (index + 1) / 10  # completion k scores (k + 1) / 10


def late(body, index):
    time.sleep(1.0)
    return reply("<answer>0.9</answer>")


def out_of_range(body, index):
    return reply({3: "<answer>7</answer>", 4: "<answer>-0.4</answer>", 5: "score: 1e3"}[index_of(body)])


# name -> (what group 1's requests get, attempts per request, failures counted)
FAULTS = {
    "hang": (lambda b, i: HANG, 2, True),
    "late-answer": (late, 2, True),
    "500": (lambda b, i: status(500), 2, True),
    "503": (lambda b, i: status(503), 2, True),
    "429": (lambda b, i: status(429), 2, True),
    "invalid-json": (lambda b, i: INVALID_JSON, 2, True),
    "json-without-choices": (lambda b, i: NO_CHOICES, 2, True),
    "completion-without-number": (lambda b, i: reply("The reasoning is sound."), 1, True),
    "dropped-connection": (lambda b, i: DROP, 2, True),
    "out-of-range-score": (out_of_range, 1, False),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_on_one_group_zeroes_that_group_only_and_is_counted(fault):
    group1_action, attempts, counted = FAULTS[fault]

    def judge_reply(body, index):
        k = index_of(body)
        return group1_action(body, index) if k // N == 1 else reply(f"<answer>{good_score(k)}</answer>")

    start = time.monotonic()
    with FakeJudge(judge_reply) as judge:
        client = TRMClient(judge.url, "judge", max_retries=1, backoff_s=0.01, timeout_s=TIMEOUT_S)
        thinking, stats = thinking_rewards(client, QUESTIONS, TEXTS, IMAGES, OUTCOME, N, reference_parity=False)
        elapsed = time.monotonic() - start  # before the server's exit releases hanging handlers

    group1 = [0.0, 0.0, 0.0] if counted else [1.0, 0.0, 1.0]  # out of range: clamped to [0, 1], not a failure
    assert thinking == pytest.approx([0.1, 0.2, 0.3, *group1, 0.7, 0.8, 0.9])
    assert (stats.calls, stats.failures, stats.failed_groups) == ((9, 3, 1) if counted else (9, 0, 0))
    assert len(stats.errors) == stats.failures
    assert sorted(index_of(body) for body in judge.requests) == sorted([*range(9), *[3, 4, 5] * (attempts - 1)])
    assert elapsed < 2 * TIMEOUT_S + 5  # two attempts of the slowest fault, in parallel, plus slack


@pytest.mark.timeout(60)
def test_a_server_restart_mid_run_costs_only_the_calls_made_while_it_was_down():
    """One client across "steps", as in the trainer: up, then down with retries that outlast the restart, then
    down with no retries (counted), then up again."""
    port = closed_port()
    scorer = lambda body, index: reply(f"<answer>{good_score(index_of(body))}</answer>")  # noqa: E731
    client = TRMClient(f"http://127.0.0.1:{port}/v1", "judge", max_retries=4, backoff_s=0.2, timeout_s=5)

    def step():
        start = time.monotonic()
        result = thinking_rewards(client, QUESTIONS, TEXTS, IMAGES, OUTCOME, N, reference_parity=False)
        return (*result, time.monotonic() - start)

    with FakeJudge(scorer, port=port) as first:
        thinking, stats, _ = step()
    assert thinking == pytest.approx([good_score(k) for k in range(9)]) and stats.failures == 0
    assert len(first.requests) == 9

    # down now; back 0.5 s later, while every request is between retries (0.2 + 0.4 + 0.8 s)
    restarted = FakeJudge(scorer, port=port)
    restart = threading.Timer(0.5, restarted.__enter__)
    restart.start()
    try:
        thinking, stats, elapsed = step()
    finally:
        restart.join()
        restarted.__exit__(None, None, None)
    assert thinking == pytest.approx([good_score(k) for k in range(9)]) and stats.failures == 0
    assert len(restarted.requests) == 9 and 0.5 <= elapsed < 5

    client.max_retries = 0
    thinking, stats, elapsed = step()  # down for good: every group zeroed and counted, quickly
    assert thinking == [0.0] * 9 and (stats.calls, stats.failures, stats.failed_groups) == (9, 9, 3)
    assert all("connection error" in error for error in stats.errors) and elapsed < 5

    with FakeJudge(scorer, port=port):
        thinking, stats, _ = step()
    assert thinking == pytest.approx([good_score(k) for k in range(9)]) and stats.failures == 0


@pytest.mark.slow
def test_a_two_rank_run_survives_a_judge_that_fails_at_first_then_recovers(failing_judge_run):
    from tests.helpers import check_ok, metrics

    # 2 ranks x 2 prompts x N=4 = 16 requests a step; the first 8 (all of them in step 1: the ranks only send
    # step 2's after step 1's failure counts were summed) get 401 or 503, without retries, so each one is a failure.
    check_ok(failing_judge_run["result"])
    assert len(failing_judge_run["requests"]) == 3 * 16

    rows = metrics(failing_judge_run["output_dir"])
    assert [row["step"] for row in rows] == [1, 2, 3]
    # the counts are sums over the 2 ranks
    assert [row["trm/failures"] for row in rows] == [8.0, 0.0, 0.0]
    assert all(row["trm/calls"] == 16.0 for row in rows)
    # 8 failures hit at least 2 of the 4 groups (4 responses each), whose R^t is then 0 for all 4 responses
    assert rows[0]["trm/failed_groups"] >= 2.0 and rows[0]["reward/thinking"] <= 0.7 * 2 / 4 + 1e-9
    assert rows[1]["trm/failed_groups"] == rows[2]["trm/failed_groups"] == 0.0
    assert rows[1]["reward/thinking"] == pytest.approx(0.7) and rows[2]["reward/thinking"] == pytest.approx(0.7)
