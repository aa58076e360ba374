"""Synthetic TRM traces: known scores, controlled flaws, annotate.py's row format, determinism."""
import json
import os
import random
import re

import pytest

from sophiavl.demo import trm_traces
from sophiavl.demo.trm_traces import build_trace, perturb, trace_score
from step1_reward_model.balance import filter_rows
from step1_reward_model.data import read_trm_rows
from sophiavl.utils.prompts import format_question
from sophiavl.utils.outcome_reward import extract_answer, has_think_answer_format, parse_score

pytestmark = pytest.mark.timeout(120)

STEPS = ["the shape is yellow", "yellow is option D"]
CORRECT = "<think>the shape is yellow. yellow is option D.</think><answer>D</answer>"  # the warm start's style
CJK = re.compile(r"[\u4e00-\u9fff]")


def think(response):
    return response[len("<think>"):response.index("</think>")]


def sentences(response):
    return [s for s in think(response).removesuffix(".").split(". ") if s]


@pytest.mark.parametrize("flaws, score", [
    ((), 1.0), (("extraneous",), 0.9), (("repetition",), 0.8), (("language_switch",), 0.7), (("wrong_step",), 0.5),
    (("contradiction",), 0.4), (("unsupported_answer",), 0.3), (("empty_thinking",), 0.0),
    (("extraneous", "language_switch"), 0.6), (("repetition", "language_switch"), 0.5),
    (("language_switch", "wrong_step"), 0.2), (("language_switch", "contradiction"), 0.1),
    (("wrong_step", "contradiction"), 0.0),  # 1.1 of penalties: clamped at 0
])
def test_scores_add_up_flaw_penalties_on_the_tenth_grid(flaws, score):
    assert trace_score(flaws) == score  # exact: computed in tenths


def test_correct_chain_and_each_flaw_change_exactly_what_they_claim():
    assert build_trace(STEPS, "D", (), random.Random(0)) == CORRECT
    assert build_trace(STEPS, "D", ("empty_thinking",), random.Random(0)) == "<think></think><answer>D</answer>"
    correct = sentences(CORRECT)

    wrong = build_trace(STEPS, "D", ("wrong_step",), random.Random(0))
    assert sentences(wrong)[0] != correct[0] and sentences(wrong)[1:] == correct[1:]
    assert re.fullmatch(r"the shape is (red|green|blue)", sentences(wrong)[0])

    contradiction = sentences(build_trace(STEPS, "D", ("contradiction",), random.Random(0)))
    assert len(contradiction) == len(correct) + 1
    negated = [s for s in contradiction if s.startswith("but ")]
    assert negated in (["but the shape is not yellow"], ["but yellow is not option D"])

    repeated = sentences(build_trace(STEPS, "D", ("repetition",), random.Random(0)))
    assert len(repeated) == len(correct) + 2 and any(repeated.count(s) == 3 for s in correct)

    switched = build_trace(STEPS, "D", ("language_switch",), random.Random(0))
    chinese = [s for s in sentences(switched) if CJK.search(s)]
    assert len(chinese) == 1 and [s for s in sentences(switched) if s not in chinese] == correct

    unsupported = build_trace(STEPS, "D", ("unsupported_answer",), random.Random(0))
    assert think(unsupported) == think(CORRECT) and extract_answer(unsupported) in {"A", "B", "C"}

    extra = sentences(build_trace(STEPS, "D", ("extraneous",), random.Random(0)))
    assert len(extra) == len(correct) + 1 and set(correct) < set(extra)
    for flaws in [(), ("wrong_step", "repetition"), ("unsupported_answer", "language_switch")]:
        assert has_think_answer_format(build_trace(STEPS, "D", flaws, random.Random(1)))


@pytest.mark.parametrize("text, pattern", [
    ("6 plus 9 is 15", r"6 plus 9 is (14|16)"),   # the last number moves by one
    ("that makes 1 square", r"that makes [23] square"),
    ("the colour is blue", r"the colour is (red|green|yellow)"),
    ("a square at the top right", r"a (circle|triangle) at the top right"),
    ("D", r"[ABC]"),
    ("SUN", r"SU[A-MO-Z]"),
    ("the letters are S U N", r"the letters are S U [A-MO-Z]"),
    ("nothing to change here", r"it is not true that nothing to change here"),
])
def test_perturb_makes_one_fact_wrong(text, pattern):
    for seed in range(5):
        assert re.fullmatch(pattern, perturb(text, random.Random(seed)))


def run_cli(tiny_assets, output, *extra):
    return trm_traces.main(["--registry", tiny_assets["registry"], "--data-path", "tiny_train", "--max-rows", "10",
                            "--output", str(output), *extra])


def test_cli_writes_annotation_rows_that_balance_and_the_trainer_read(tiny_assets, tmp_path, capsys):
    output = tmp_path / "out" / "traces.jsonl"
    traces = run_cli(tiny_assets, output)
    assert capsys.readouterr().out.startswith("wrote 100 traces from 10 task rows")
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert rows == traces and len(rows) == 10 * (1 + 7 + 2)  # correct, 7 single flaws, 2 pairs per task row
    assert len({row["id"] for row in rows}) == len(rows)
    tasks = {t["problem_id"]: t for t in json.load(open(os.path.join(os.path.dirname(tiny_assets["registry"]),
                                                                     "tiny_train.json")))}
    for row in rows:
        task = tasks[row["source_id"]]
        assert row["status"] == "scored" and row["error"] is None
        assert row["score"] == trace_score(row["flaws"]) and parse_score(row["judge_text"]) == row["score"]
        assert row["question"] == format_question(task["problem"], task["problem_type"], task["options"])
        if task["path"]:
            assert not os.path.isabs(row["images"][0])  # relative to the output file, as annotate.py reads them
            assert os.path.samefile(output.parent / row["images"][0],
                                    os.path.join(os.path.dirname(tiny_assets["registry"]), "images", task["path"]))
        else:
            assert row["images"] == []
    correct = [row for row in rows if row["flaws"] == []]
    assert all(row["response"].endswith(f"</think>{row['answer']}") for row in correct)
    kept, dropped = filter_rows(rows)
    assert dropped["not_scored"] == dropped["empty_response"] == dropped["truncated"] == 0
    loaded = read_trm_rows(str(output))
    assert [row["score"] for row in loaded] == [row["score"] for row in rows]


def test_every_score_occurs_and_output_is_deterministic_by_seed(tiny_assets, tmp_path):
    first = run_cli(tiny_assets, tmp_path / "a.jsonl", "--pairs-per-row", "4")
    assert {row["score"] for row in first} == {i / 10 for i in range(11)}
    run_cli(tiny_assets, tmp_path / "b.jsonl", "--pairs-per-row", "4")
    run_cli(tiny_assets, tmp_path / "c.jsonl", "--pairs-per-row", "4", "--seed", "1")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "c.jsonl").read_bytes()


def test_rows_without_reasoning_are_refused_with_the_file_named(tmp_path, capsys):
    (tmp_path / "tasks.json").write_text(json.dumps([{"problem": "What is 1 + 1?", "solution": "2"}]))
    (tmp_path / "registry.json").write_text(json.dumps(
        {"plain": {"file_path": "tasks.json", "columns": {"problem": "prompt", "solution": "answer"}}}))
    with pytest.raises(SystemExit) as exit_info:
        trm_traces.main(["--registry", str(tmp_path / "registry.json"), "--data-path", "plain",
                         "--output", str(tmp_path / "t.jsonl")])
    assert exit_info.value.code == 2
    assert "tasks.json: row 0: no 'reasoning' list" in capsys.readouterr().err


def test_relabel_inverts_or_shuffles_the_scores_and_keeps_the_true_ones():
    from sophiavl.demo.trm_traces import relabel

    traces = [{"id": str(i), "score": s, "judge_text": f"<answer>{s:.1f}</answer>"}
              for i, s in enumerate([0.0, 0.3, 0.7, 1.0, 1.0])]
    assert relabel(traces, "true", 0) is traces
    inverted = relabel(traces, "inverted", 0)
    assert [t["score"] for t in inverted] == [1.0, 0.7, 0.3, 0.0, 0.0]
    assert inverted[1]["judge_text"] == "<answer>0.7</answer>" and inverted[1]["true_score"] == 0.3
    shuffled = relabel(traces, "shuffled", 0)
    assert sorted(t["score"] for t in shuffled) == [0.0, 0.3, 0.7, 1.0, 1.0]  # the same scores, moved
    assert [t["score"] for t in shuffled] != [t["score"] for t in traces]
    assert [t["score"] for t in relabel(traces, "shuffled", 0)] == [t["score"] for t in shuffled]  # seeded
    assert all(t["judge_text"] == f"<answer>{t['score']:.1f}</answer>" for t in shuffled)
