"""experiments/ablations.py on a 1-seed, 2-step setting with two arms (GRPO and full Trust-GRPO): every
stage runs, the doc's table has a row per arm with numbers, the plots exist, and a rerun redoes nothing."""
import json

import pytest

from experiments.ablations import ARMS, KEY_ARMS, parse_args, planned_runs
from tests.helpers import copy_finished_stages, run_short_tiny


def test_the_plan_pairs_seeds_and_groups_runs_by_trm_condition():
    plan = planned_runs(parse_args([]))
    assert len(plan) == 4 * 5 + 4 * 2 == 28
    for arm in ARMS:
        assert [s for a, s in plan if a == arm] == list(range(5 if arm in KEY_ARMS else 2))
    first, rest = plan[:16], plan[16:]
    assert {s for _, s in first} == {0, 1} and {s for _, s in rest} == {2, 3, 4}
    # one server start per condition and part: conditions come in contiguous blocks
    for part in (first, rest):
        conditions = [ARMS[arm][1] for arm, _ in part]
        blocks = [c for i, c in enumerate(conditions) if i == 0 or conditions[i - 1] != c]
        assert len(blocks) == len(set(blocks))


def test_runs_go_in_order_and_only_a_condition_with_training_left_starts_a_trm_server(monkeypatch):
    import experiments.ablations as ablations

    servers, calls = [], []

    def fake_server(pipeline, trm_dir, max_images, body):
        servers.append(trm_dir)
        body(f"url-of-{trm_dir}")

    monkeypatch.setattr(ablations, "with_trm_server", fake_server)
    pending = [("grpo", 0), ("grpo", 1), ("full", 0), ("full/hacked", 0), ("full/hacked", 1)]
    ablations.run_by_condition(None, pending, {"trained": "t", "hacked": "h"}, 1,
                               lambda arm, seed, url: calls.append((arm, seed, url)),
                               needs_server=lambda runs: runs[0][0] != "full")
    assert servers == ["h"]  # GRPO needs none; "full" has only step 3 left here
    assert calls == [("grpo", 0, None), ("grpo", 1, None), ("full", 0, None), ("full/hacked", 0, "url-of-h"),
                     ("full/hacked", 1, "url-of-h")]


def run(output_dir, doc):
    return run_short_tiny("experiments/ablations.py", output_dir, "--doc", str(doc), "--arms", "grpo", "full",
                          "--key-seeds", "1", "--other-seeds", "1")


@pytest.mark.slow
@pytest.mark.vllm
def test_two_arms_one_seed_produce_the_table_and_a_rerun_redoes_nothing(short_pipeline, tmp_path):
    # the tiny world, the evaluation before RL and the trained judge are the short train.py run's (same settings)
    out, doc = tmp_path / "out", tmp_path / "docs" / "ablations.md"
    copy_finished_stages(short_pipeline[0], out, {"assets": "assets", "policy_init": "policy_init",
                                                  "step3_before": "step3_before", "step1": "trm_trained"})
    result = run(out, doc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("] done already") == 4  # assets, warm start, step 3 before, the trained judge
    text = doc.read_text()
    assert "Runs finished: 2 of 2" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| grpo ")
            or line.startswith("| full ")}
    assert set(rows) == {"grpo", "full"}
    assert "| full | full | trained | 1 |" in rows["full"] and "| grpo | grpo | - | 1 |" in rows["grpo"]
    assert "| trained | true |" in text  # the trained judge's held-out figures
    for image in ("curves.png", "accuracy.png"):
        assert f"(ablations/{image})" in text
        assert (tmp_path / "docs" / "ablations" / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    figures = json.loads((tmp_path / "docs" / "ablations" / "figures.json").read_text())
    for arm in ("grpo", "full"):
        f = figures["runs"][arm]["0"]
        assert 0 <= f["acc_after"] <= 1 and 0 <= f["quality_last"] <= 1 and f["wall_seconds"] > 0
    assert figures["runs"]["grpo"]["0"]["trm_last"] == 0  # no thinking reward without a TRM
    # every completion of both steps was logged: 16 prompts x 8 samples, split over 2 ranks
    groups = [json.loads(line) for rank in (0, 1) for line in
              open(out / "runs" / "full-seed0" / "completions" / f"rank{rank}.jsonl")]
    assert len(groups) == 2 * 16 and all(len(g["completions"]) == 8 for g in groups)

    again = run(out, doc)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "running" not in again.stdout and "[trm-server]" not in again.stdout
    assert "2 of 2 runs done already" in again.stdout
