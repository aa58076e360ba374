"""The annotated-rollout judge's data path on a hand-made completion log: rollouts split by prompt, annotate.py (a
subprocess) labelling them through the oracle server, the hacked and untrained relabellings, and the agreement
figures (evaluate.py's MAE, Spearman, pairwise accuracy; a constant's MAE) computed by hand."""
import argparse
import json
import os

import pytest

from experiments.annotated_trm import agreement, condition_labels, is_held_out, oracle_labels, rollout_rows
from sophiavl.demo.build_tiny_assets import asset_paths, write_data
from sophiavl.demo.oracle_server import OracleServer, load_index
from sophiavl.demo.report import read_jsonl
from sophiavl.demo.trace_quality import oracle_score
from sophiavl.demo.trm_traces import read_raw_rows
from sophiavl.utils.pipeline import Pipeline
from step1_reward_model import evaluate
from step1_reward_model.data import read_trm_rows
from tests.fake_judge import FakeJudge, fixed_score
from tests.helpers import REPO

pytestmark = pytest.mark.timeout(180)


def traces(raw):
    answer = raw["solution"][len("<answer>"):-len("</answer>")]
    correct = f"<think>{'. '.join(raw['reasoning'])}.</think><answer>{answer}</answer>"
    if "shortcut" in raw:
        other = f"<think>{'. '.join(raw['shortcut']['reasoning'])}.</think><answer>{raw['shortcut']['answer']}</answer>"
    else:
        other = f"<think>{'. '.join(raw['reasoning'])}.</think><answer>{answer}0</answer>"
    return [correct, other, "<think>hmm.</think><answer>1</answer>", correct]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("annotated")
    paths = asset_paths(str(root / "assets"))
    os.makedirs(paths["data_dir"])
    write_data(paths, seed=0, num_train=12, num_test=4, world="shortcut")
    raw = read_raw_rows(paths["registry"], "tiny_train")
    run = root / "source_run"
    (run / "completions").mkdir(parents=True)
    for rank in (0, 1):  # steps 1 and 2: every prompt twice, its four completions the same both times
        groups = [{"step": step, "problem_id": pid, "gamma": 1.0, "completions": traces(raw[pid]),
                   "outcome": [1.0, 0.0, 0.0, 1.0], "thinking": [0.0] * 4, "reward": [0.0] * 4}
                  for step in (1, 2) for pid in sorted(raw)[rank::2]]
        (run / "completions" / f"rank{rank}.jsonl").write_text("".join(json.dumps(g) + "\n" for g in groups))
    return root, paths["registry"], raw, run


def test_rollouts_are_split_by_prompt_and_held_out_ones_are_distinct(world):
    root, registry, raw, run = world
    train, held_out = rollout_rows(str(run), registry, str(root / "rollouts"), heldout_fraction=0.4)
    held = {pid for pid in raw if is_held_out(pid, 0.4)}
    assert 0 < len(held) < len(raw)
    assert {row["problem_id"] for row in held_out} == held and not held & {row["problem_id"] for row in train}
    assert len(train) == (len(raw) - len(held)) * 2 * 4  # every completion of both steps
    assert len(held_out) == len(held) * 3  # the repeated correct chain and step 2's copies once each
    row = next(r for r in train if raw[r["problem_id"]]["data_source"].endswith("tint"))
    assert os.path.exists(os.path.normpath(os.path.join(root, "rollouts", row["images"][0]))) and row["question"].startswith("What colour")
    assert rollout_rows(str(run), registry, str(root / "rollouts"), heldout_fraction=0.4, heldout_max=2)[1] == \
        [held_out[0], held_out[len(held_out) // 2]]


def test_labels_through_annotate_and_the_oracle_then_the_relabellings(world, tmp_path):
    root, registry, raw, run = world
    args = argparse.Namespace(output_dir=str(tmp_path / "out"), force=False, deployment_type="tiny",
                              every_steps=2, heldout_fraction=0.4, heldout_max=600)
    pipeline = Pipeline(args, REPO)
    labels = oracle_labels(pipeline, str(run), registry, args)
    train = read_jsonl(labels["train"])
    assert {row["step"] for row in train} == {2} and len(train) == (len(raw) - sum(is_held_out(p, 0.4) for p in raw)) * 4
    for row in train + read_jsonl(labels["heldout"]):
        assert row["status"] == "scored" and row["score"] == oracle_score(row["response"], raw[row["problem_id"]])
    assert {row["score"] for row in train} == {1.0, 0.6, 0.3, 0.2}  # correct, shortcut, unsupported answer, filler
    assert set(pipeline.seconds) == {"labels"}  # one annotate.py run for both parts
    before = open(labels["train"]).read()
    assert oracle_labels(pipeline, str(run), registry, args) == labels and open(labels["train"]).read() == before

    hacked = read_trm_rows(condition_labels(labels, "hacked", str(tmp_path / "trm_hacked")))  # images resolve
    assert [r["score"] for r in hacked] == [round(1 - r["score"], 1) for r in train]
    shuffled = read_jsonl(condition_labels(labels, "untrained", str(tmp_path / "trm_untrained")))
    assert sorted(r["score"] for r in shuffled) == sorted(r["score"] for r in train)
    assert [r["score"] for r in shuffled] != [r["score"] for r in train]


def test_agreement_of_a_perfect_and_a_constant_judge(world, tmp_path):
    root, registry, raw, run = world
    held_out = [{**row, "score": oracle_score(row["response"], raw[row["problem_id"]]), "status": "scored"}
                for row in rollout_rows(str(run), registry, str(tmp_path), heldout_fraction=0.4)[1]]
    data = tmp_path / "heldout_labels.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in held_out))
    trm = tmp_path / "trm"
    trm.mkdir()
    (trm / "trm_train.jsonl").write_text("".join(json.dumps({"score": s}) + "\n" for s in (0.0, 0.2, 1.0)))
    scores = [row["score"] for row in held_out]
    with OracleServer(load_index(registry, "tiny_train")) as oracle:
        evaluate.main(["--data", str(data), "--judge-url", oracle.url, "--output-dir", str(trm / "eval")])
    perfect = agreement(str(trm), str(data))
    assert perfect["mae"] == 0 and perfect["spearman"] == pytest.approx(1) and perfect["pairwise_accuracy"] == 1
    assert perfect["constant_mae"] == pytest.approx(sum(abs(s - 0.4) for s in scores) / len(scores))
    assert perfect["rows"] == len(held_out) and perfect["train_rows"] == 3
    with FakeJudge(fixed_score(0.5)) as judge:
        evaluate.main(["--data", str(data), "--judge-url", judge.url, "--output-dir", str(trm / "eval")])
    constant = agreement(str(trm), str(data))
    assert constant["mae"] == pytest.approx(sum(abs(s - 0.5) for s in scores) / len(scores))
    assert constant["pairwise_accuracy"] == 0.5 and constant["pairs"] > 0
