"""The ablation report's figures from a hand-made run folder, computed by hand."""
import json
import math

import pytest

from experiments.ablations_report import end_figures, paired, summarize_run

REASONING = {"p0": ["the shape is red", "red is option A"]}
RIGHT = "<think>the shape is red. red is option A.</think><answer>A</answer>"
WRONG = "<think>the shape is green. green is option B.</think><answer>B</answer>"


def write_run(path):
    (path / "completions").mkdir(parents=True)
    (path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2, "eval/accuracy": 0.6}))
    groups = [  # step 1: a mixed group whose judge prefers the wrong answer; step 2: both right
        {"step": 1, "problem_id": "p0", "gamma": math.exp(0.2 - 0.8), "completions": [RIGHT, WRONG],
         "outcome": [1.0, 0.0], "thinking": [0.2, 0.8], "reward": [0, 0]},
        {"step": 2, "problem_id": "p0", "gamma": 1.0, "completions": [RIGHT, RIGHT + " "],
         "outcome": [1.0, 1.0], "thinking": [0.5, 0.5], "reward": [0, 0]},
    ]
    (path / "completions" / "rank0.jsonl").write_text("\n".join(json.dumps(g) for g in groups))


def test_curves_gamma_over_mixed_groups_and_judge_correlation(tmp_path):
    write_run(tmp_path)
    run = summarize_run(str(tmp_path), REASONING)
    assert run["steps"] == [1, 2]
    assert run["quality"] == [0.5, 1.0] and run["words"] == [8, 8] and run["trm"] == [0.5, 0.5]
    assert run["acc_after"] == 0.6
    assert run["mixed_groups"] == 1  # the step-2 group has no wrong answer: gamma is 1 by definition there
    assert run["gamma_mixed_mean"] == pytest.approx(math.exp(-0.6))
    assert run["frac_mixed_distrusted"] == 1.0 and run["would_be_frac_distrusted"] == 1.0
    # Spearman of R^t (0.2, 0.8, 0.5, 0.5) with quality (1, 0, 1, 1): ranks (1, 4, 2.5, 2.5) and (3, 1, 3, 3)
    assert run["trm_vs_quality"] == pytest.approx(-3 / math.sqrt(4.5 * 3))
    figures = end_figures({**run, "wall_seconds": 12.0})
    assert figures["quality_first"] == 0.5 and figures["quality_last"] == 1.0  # a fifth of 2 steps is 1 step
    assert figures["repeats_last"] == 0.0


def test_paired_differences_are_per_seed():
    figures = {"a": {0: {"x": 0.5}, 1: {"x": 0.2}}, "b": {0: {"x": 0.3}, 1: {"x": 0.4}, 2: {"x": 0.9}}}
    diffs, text = paired(figures, "a", "b", "x")
    assert diffs == pytest.approx([0.2, -0.2])  # seed 2 has no partner
    assert "over 2 seeds (1 of 2 positive; per seed: +0.200, -0.200)" in text
    assert paired(figures, "a", "c", "x") == ([], "no paired seeds yet")
