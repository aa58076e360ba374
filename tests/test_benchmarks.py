"""Each benchmark script runs on its tiny --quick setting and reports sane, self-consistent figures.
Not timed: the speed claims live in benchmarks/RESULTS.md."""
import asyncio
import importlib.util
import json
import statistics
import time

import pytest

from sophiavl.utils.cli import InputError



def test_fixed_latency_judge_holds_capacity_and_queues_the_rest():
    from benchmarks import trm_throughput

    proc, host = trm_throughput.start_fixed_latency_judge(latency_s=0.1, capacity=4)
    try:
        async def eight_requests():
            import httpx

            async with httpx.AsyncClient() as client:
                body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
                return await asyncio.gather(*(client.post(host + "/v1/chat/completions", json=body) for _ in range(8)))

        start = time.perf_counter()
        replies = asyncio.run(eight_requests())
        seconds = time.perf_counter() - start
        stats = trm_throughput.judge_stats(host)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert [r.json()["choices"][0]["message"]["content"] for r in replies] == ["<answer>0.7</answer>"] * 8
    assert seconds >= 0.2  # 8 requests through 4 slots of 0.1 s: two rounds
    assert stats == {"requests": 8, "with_images": 8, "in_service": 0, "max_in_service": 4}


def test_trm_throughput_quick_scores_every_response_with_its_image():
    from benchmarks import trm_throughput

    row, = trm_throughput.main(["--quick"])
    assert row["sequential_parsed"] == row["ours_parsed"] == row["responses"] == 24
    stats = row["judge_stats"]
    assert stats["requests"] == stats["with_images"] == 48  # both patterns, every request with its image
    assert stats["max_in_service"] <= 4
    assert row["speedup"] > 2 and 0 < row["share_of_ceiling"] <= 1.05


def test_e2e_times_prints_each_stage_with_its_share(tmp_path, capsys):
    from benchmarks import e2e_times

    (tmp_path / "summary.json").write_text(json.dumps({"wall_seconds": 8.0,
                                                       "stage_seconds": {"step1": 2.0, "step2": 6.0}}))
    e2e_times.main([str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["step1", "2.0", "25.0%"]
    assert lines[2].split() == ["step2", "6.0", "75.0%"]
    assert lines[3].split() == ["total", "8.0", "100%"]
    assert "total" in e2e_times.main(["--quick"])


def test_e2e_times_rejects_a_summary_without_stage_seconds(tmp_path):
    from benchmarks import e2e_times

    (tmp_path / "summary.json").write_text(json.dumps({"wall_seconds": 3}))
    with pytest.raises(InputError, match="stage_seconds"):
        e2e_times.read_summary(str(tmp_path))


@pytest.mark.slow
def test_reward_overhead_quick_measures_a_step_and_fuzz():
    from benchmarks import reward_overhead

    result = reward_overhead.main(["--quick"])
    reward, step, fuzzed = result["reward"], result["step"], result["fuzz"]
    assert reward["responses"] == 8 * 4 and 0 < reward["mean_outcome"] < 1
    assert step["samples_per_rank"] == 8 and step["step_time"] > 0
    assert result["share"] == pytest.approx(reward["us_per_response"] / 1e3 / step["ms_per_response"])
    from sophiavl.utils.prompts import PROBLEM_TYPES

    kinds = {"extract_answer", "parse_score"} | {f"outcome_reward / {t}" for t in PROBLEM_TYPES}
    assert fuzzed["strings"] == 2000 and {w["kind"] for w in fuzzed["worst"]} == kinds
    assert all(0 < w["confirmed_s"] and 0 < w["first_pass_max_s"] for w in fuzzed["worst"])


def test_realistic_step_gates_unformatted_responses_to_zero():
    from benchmarks import reward_overhead
    from step2_trust_grpo.rewards import outcome_rewards

    rows, texts = reward_overhead.realistic_step(10, 8, response_words=20)
    outcome = outcome_rewards(texts, rows, 8, 4096)
    assert len(texts) == 80
    unformatted = [o for o, t in zip(outcome, texts) if not t.startswith("<think>")]
    assert unformatted and set(unformatted) == {0.0}
    # a multiple-choice row (index 1 of the type cycle) scores 1 exactly for its own letter
    mc = [(o, t) for o, t in zip(outcome[8:16], texts[8:16]) if t.startswith("<think>")]
    assert all(o == (1.0 if t.endswith(f"<answer>{rows[1]['given']}</answer>") else 0.0) for o, t in mc)


@pytest.mark.slow
def test_grpo_vs_trl_quick_times_both_trainers():
    pytest.importorskip("trl")
    from benchmarks import grpo_vs_trl

    results = grpo_vs_trl.main(["--quick"])
    for name in ("ours", "trl"):
        steps = results[name]["steps"]
        assert len(steps) == 3
        for step in steps:
            assert step["step_time"] > 0 and step["tokens"] > 0
            parts = step["generation"] + step["reward"] + step["update"]
            assert parts == pytest.approx(step["step_time"], rel=0.05)


@pytest.mark.slow
def test_rollout_engines_quick_reports_step_and_sync_times():
    from benchmarks import rollout_engines

    results = rollout_engines.main(["--quick"])
    engines = ["hf"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    assert list(results) == engines
    for r in results.values():
        assert r["step_time"] > r["rollout_s"] > 0 and r["sync_s"] > 0 and r["rollout_tokens_per_s"] > 0


def test_mid_size_update_flops_and_summary_by_hand():
    from benchmarks import mid_size

    model = {"layer_params": 1000, "head_params": 50}
    # 8 FLOPs per matrix parameter per token: 600 real tokens through the layers, 4 x 20 completion tokens through
    # lm_head
    step = {"update_tokens": 600, "mean_length": 20, "update": 2.0, "reward": 0.5, "step_time": 5.0,
            "generation": 2.5, "padding": 0.25}
    assert mid_size.update_flops(step, model, samples=4) == 8 * (1000 * 600 + 50 * 20 * 4)
    warm = {**step, "step_time": 50.0}  # the warm-up step is left out of the medians
    summary = mid_size.summarize([warm, step, {**step, "update": 4.0}], warmup=1, model=model, samples=4, peak=1e6)
    assert summary["steps_measured"] == 2 and summary["step_time"] == 5.0 and summary["judge_wait_share"] == 0.1
    assert summary["update_gflops"] == pytest.approx(statistics.median([4.832e6 / 2, 4.832e6 / 4]) / 1e9)


@pytest.mark.slow
def test_mid_size_quick_runs_our_arm_on_the_real_vocabulary():
    from benchmarks import mid_size

    results = mid_size.main(["--quick", "--arms", "ours"])
    ours = results["ours"]
    assert ours["steps_measured"] == 1 and 0 < ours["mean_length"] <= 24  # --quick caps completions at 24 tokens
    assert 0 <= ours["padding"] < 1 and 0 <= ours["judge_wait_share"] < 1
    assert ours["step_time"] > ours["update"] > 0 and ours["update_gflops"] > 0
