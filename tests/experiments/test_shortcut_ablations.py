"""experiments/shortcut_ablations.py on a 1-seed, 2-step setting with full Trust-GRPO: the shortcut world, step 3
before, the GRPO source run, the oracle's labels through annotate.py, the trained judge, the TRM server, the arm's
run and step 3 after it, then the report's tables and claim lines; a rerun redoes nothing. (The GRPO arm takes the
source run's path; tests/experiments/test_shortcut_report.py checks the report's paired claims.)"""
import json

import pytest

from sophiavl.demo.report import read_jsonl
from tests.helpers import copy_finished_stages, run_short_tiny


def run(output_dir, doc):
    # a 5-step warm start repeats itself: micro-batches of 2, so that its few distinct labelled rows make a batch
    return run_short_tiny("experiments/shortcut_ablations.py", output_dir, "--doc", str(doc), "--arms", "full",
                          "--key-seeds", "1", "--other-seeds", "1", "--source-steps", "2",
                          "--step1-extra", "--max-steps 3 --eval-every 0 --micro-batch-size 2")


@pytest.mark.slow
@pytest.mark.vllm
def test_one_arm_one_seed_through_the_annotated_judge_produces_the_report(short_pipeline, tmp_path):
    # the warm-started policy is the short train.py run's (trained on the first world's tasks: the tiny run only needs
    # a policy that writes the format); everything else is this design's own
    out, doc = tmp_path / "out", tmp_path / "docs" / "ablations.md"
    copy_finished_stages(short_pipeline[0], out, {"policy_init": "policy_init"})
    result = run(out, doc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("] done already") == 1  # the warm start
    labels = read_jsonl(out / "rollouts" / "labels.jsonl")  # the source run's 2 x 16 x 8 completions, all labelled
    assert {row["split"] for row in labels} == {"train", "heldout"} and all(row["status"] == "scored" for row in labels)
    assert sum(row["split"] == "train" for row in labels) + len({(r["problem_id"], r["response"]) for r in labels
                                                                 if r["split"] == "heldout"}) <= 256
    text = doc.read_text()
    assert "Runs finished: 1 of 1" in text and "| trained | oracle labels (" in text and "| full | 1 |" in text
    assert "**J-trained " in text and "**C1" not in text  # C1 needs the GRPO arm
    figures = json.loads((tmp_path / "docs" / "ablations" / "shortcuts" / "figures.json").read_text())
    f = figures["runs"]["full"]["0"]
    assert 0 <= f["acc_shortcut"] <= 1 and 0 <= f["heldout_shortcut_use"] <= 1 and f["wall_seconds"] > 0
    assert f["mixed_groups"] >= 0 and figures["judges"]["trained"]["rows"] > 0
    assert 0 <= figures["before"]["acc_control"] <= 1
    assert (tmp_path / "docs" / "ablations" / "shortcuts" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"

    again = run(out, doc)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "running" not in again.stdout and "[trm-server]" not in again.stdout
    assert "1 of 1 runs done already" in again.stdout
