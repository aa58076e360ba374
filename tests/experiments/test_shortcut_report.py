"""The second design's report from hand-made runs: held-out figures, gamma, the paired rule of each claim computed by
hand, and a generated block that leaves the doc's hand-written sections alone."""
import json
import math
import os

import pytest

from experiments.ablations_report import replace_block
from experiments.shortcut_report import held_out_figures, paired_test, training_figures, write
from sophiavl.demo.build_tiny_assets import asset_paths, write_data
from sophiavl.demo.trm_traces import read_raw_rows


def chain(steps, answer):
    return f"<think>{'. '.join(steps)}.</think><answer>{answer}</answer>"


def answer(raw):
    return raw["solution"][len("<answer>"):-len("</answer>")]


def predictions(folder, raw, test_ids, shortcut_on):
    """Correct chains, except the shortcut's trace on the first `shortcut_on` shortcut-family rows."""
    os.makedirs(folder)
    lines, left = [], shortcut_on
    for pid in test_ids:
        row = raw[pid]
        if "shortcut" in row and left > 0:
            left -= 1
            text, score = chain(row["shortcut"]["reasoning"], row["shortcut"]["answer"]), 0.0
        else:
            text, score = chain(row["reasoning"], answer(row)), 1.0
        lines.append(json.dumps({"id": pid, "prediction": text, "score": score}))
    open(os.path.join(folder, "predictions.jsonl"), "w").write("\n".join(lines) + "\n")
    open(os.path.join(folder, "summary.json"), "w").write("{}")


@pytest.fixture
def out(tmp_path):
    paths = asset_paths(str(tmp_path / "out" / "assets"))
    os.makedirs(paths["data_dir"])
    write_data(paths, seed=0, num_train=4, num_test=8, world="shortcut")
    raw = read_raw_rows(paths["registry"], "tiny_train,tiny_test")
    test_ids = [pid for pid in sorted(raw) if pid.startswith("test")]
    predictions(tmp_path / "out" / "step3_before", raw, test_ids, 4)
    tint, colour = "train_00001", "train_00000"
    right, shortcut = chain(raw[tint]["reasoning"], answer(raw[tint])), chain(raw[tint]["shortcut"]["reasoning"],
                                                                            raw[tint]["shortcut"]["answer"])
    for arm, uses in (("grpo", (4, 2, 3)), ("full", (0, 0, 0))):
        for seed, used in enumerate(uses):
            run = tmp_path / "out" / "runs" / f"{arm}-seed{seed}"
            (run / "completions").mkdir(parents=True)
            groups = [  # step 1: a mixed group whose judge prefers the shortcut's (wrong) answer; step 2: all right
                {"step": 1, "problem_id": tint, "gamma": math.exp(0.4 - 0.9), "completions": [right, shortcut],
                 "outcome": [1.0, 0.0], "thinking": [0.4, 0.9], "reward": [0, 0]},
                {"step": 2, "problem_id": colour, "gamma": 1.0, "completions": [chain(raw[colour]["reasoning"],
                                                                                      answer(raw[colour]))] * 2,
                 "outcome": [1.0, 1.0], "thinking": [0.5, 0.5], "reward": [0, 0]}]
            (run / "completions" / "rank0.jsonl").write_text("".join(json.dumps(g) + "\n" for g in groups))
            predictions(run / "step3", raw, test_ids, used)
    return tmp_path / "out", raw


def test_held_out_and_training_figures(out):
    out, raw = out
    before = held_out_figures(str(out / "step3_before"), raw)
    # 8 held-out rows: 2 tint and 2 hint_sum; all 4 answered by the shortcut (wrong), the controls right
    assert before["acc_shortcut"] == 0.0 and before["acc_control"] == 1.0 and before["heldout_shortcut_use"] == 1.0
    assert before["heldout_quality"] == pytest.approx((4 * 1.0 + 4 * 0.6) / 8)
    run = training_figures(str(out / "runs" / "grpo-seed1"), raw)
    assert run["steps"] == [1, 2] and run["shortcut"] == [0.5, 0.0]  # step 2 has no shortcut-family prompt
    assert run["quality"] == [0.8, 1.0] and run["trm"] == [0.65, 0.5]
    assert run["mixed_groups"] == 1 and run["gamma_mixed_mean"] == pytest.approx(math.exp(-0.5))
    assert run["frac_mixed_distrusted"] == 1.0 == run["would_be_frac_distrusted"]


def test_the_paired_rule_is_a_one_sided_t_test():
    figures = {"a": {0: {"x": 1.0}, 1: {"x": 0.5}, 2: {"x": 0.75}}, "b": {s: {"x": 0.0} for s in range(3)}}
    held, text = paired_test(figures, "a", "b", "x")
    assert held and "t = 5.20 (needs > 2.920)" in text  # mean 0.75, sd 0.25 over 3 seeds: 0.75 / (0.25 / sqrt 3)
    figures["a"][2]["x"] = -0.9  # mean 0.2, sd 0.96: t = 0.36
    assert paired_test(figures, "a", "b", "x")[0] is False
    assert paired_test({"a": {0: {"x": 1}}, "b": {0: {"x": 0}}}, "a", "b", "x")[0] is None  # one seed: no test


def test_the_report_goes_into_its_block_and_checks_the_claims(out, tmp_path):
    out, raw = out
    doc = tmp_path / "docs" / "ablations.md"
    doc.parent.mkdir()
    doc.write_text("# Title\n\n## Pre-registration (by hand)\n\nkept\n")
    plan = [(arm, s) for arm in ("grpo", "full") for s in range(3)]
    figures = write(str(out), str(doc), plan, "python experiments/shortcut_ablations.py")
    assert figures["full"][0]["acc_shortcut"] == 1.0 and figures["grpo"][1]["acc_shortcut"] == 0.5
    text = doc.read_text()
    assert text.startswith("# Title\n\n## Pre-registration (by hand)\n\nkept\n")
    assert "Runs finished: 6 of 6" in text and "| full | 3 | 1.000 ± 0.000 |" in text
    # full - grpo on the shortcut split: +1.0, +0.5, +0.75 -> t = 5.20 > 2.920
    assert "**C1 held**" in text and "t = 5.20" in text and "**C2 held**" in text
    assert "**C3 not tested" not in text and "**C3 did not hold**" in text  # identical training logs: no difference
    assert (tmp_path / "docs" / "ablations" / "shortcuts" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "(ablations/shortcuts/accuracy.png)" in text
    write(str(out), str(doc), plan, "python experiments/shortcut_ablations.py --report-only")
    assert doc.read_text().count("## Second design: results") == 1  # the block was replaced, not appended


def test_replace_block_appends_then_replaces(tmp_path):
    doc = tmp_path / "d.md"
    replace_block(str(doc), "x", "one")
    doc.write_text(doc.read_text() + "\nhand-written\n")
    replace_block(str(doc), "x", "two")
    assert doc.read_text() == "<!-- begin x (generated) -->\ntwo\n<!-- end x -->\n\nhand-written\n"
