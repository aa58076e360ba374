"""The completion log: one line per group with its rewards and gamma; a resumed run forgets later steps."""
import json

from step2_trust_grpo.completion_log import CompletionLog


def test_groups_are_logged_per_rank_and_resume_drops_the_steps_after_the_checkpoint(tmp_path):
    rows = [{"id": "p0"}, {"id": "p1"}]
    texts = ["a", "b", "c", "d"]
    log = CompletionLog(str(tmp_path), rank=1)
    for step in (1, 2, 3):
        log.log(step, rows, texts, [1.0, 0.0, 0.0, 0.0], [0.2, 0.9, 0.5, 0.5], [1.1, 0.3, 0.2, 0.2], [0.5, 1.0])
    path = tmp_path / "completions" / "rank1.jsonl"
    groups = [json.loads(line) for line in open(path)]
    assert len(groups) == 6
    assert groups[0] == {"step": 1, "problem_id": "p0", "gamma": 0.5, "completions": ["a", "b"],
                         "outcome": [1.0, 0.0], "thinking": [0.2, 0.9], "reward": [1.1, 0.3]}
    assert groups[1]["problem_id"] == "p1" and groups[1]["completions"] == ["c", "d"]

    CompletionLog(str(tmp_path), rank=1, resume_step=2)  # resumed from the step-2 checkpoint
    assert [json.loads(line)["step"] for line in open(path)] == [1, 1, 2, 2]
