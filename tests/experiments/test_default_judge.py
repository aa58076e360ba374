"""experiments/default_judge.py's report from finished seeds (files as its stages write them): the per-seed figures of
both judges on the held-out policy samples and the pre-registered decision rule."""
import json

import pytest

from experiments import default_judge


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n" if isinstance(rows, list) else json.dumps(rows))


def finished_seed(folder, synthetic_spearman, annotated_spearman, maes=(0.2, 0.1)):
    heldout = [{"score": s, "status": "scored"} for s in (0.0, 1.0)] + [{"score": 0.5, "status": "failed"}]
    write(folder / "rollouts" / "heldout_labels.jsonl", heldout)
    write(folder / "pipeline" / "step1" / "trm_train.jsonl", [{"score": 0.8}, {"score": 0.6}])  # mean 0.7: constant MAE 0.5
    write(folder / "trm_trained" / "trm_train.jsonl", [{"score": 0.25}])  # constant MAE 0.5
    common = {"rows": 2, "pairs": 1, "parse_failure_rate": 0.0, "pairwise_accuracy": 1.0}
    write(folder / "synthetic_eval" / "metrics.json", {**common, "mae": maes[0], "spearman": synthetic_spearman})
    write(folder / "trm_trained" / "eval" / "metrics.json", {**common, "mae": maes[1], "spearman": annotated_spearman})


@pytest.mark.parametrize("spearmans, maes, default", [
    ([(0.2, 0.5), (0.1, 0.3)], (0.2, 0.1), "annotated"),   # higher in every seed, lower MAE
    ([(0.2, 0.5), (0.4, 0.3)], (0.2, 0.1), "synthetic"),   # not higher in seed 1
    ([(0.2, 0.5), (0.1, 0.3)], (0.1, 0.2), "synthetic"),   # higher, but a larger MAE
])
def test_the_report_gives_each_seeds_judges_and_applies_the_rule(tmp_path, capsys, spearmans, maes, default):
    for k, (synthetic, annotated) in enumerate(spearmans):
        finished_seed(tmp_path / f"seed{k}", synthetic, annotated, maes)
    summary = default_judge.report(default_judge.parse_args(["--output-dir", str(tmp_path), "--seeds", "2"]))
    assert summary["default"] == default
    assert summary["seeds"][0]["synthetic"]["constant_mae"] == pytest.approx(0.5)
    assert summary["seeds"][1]["annotated"]["spearman"] == spearmans[1][1]
    out = capsys.readouterr().out
    assert "2 of 2 seeds finished" in out and f"the pipeline's default judge is the {default} one" in out


def test_an_unfinished_seed_is_left_out_and_no_decision_is_made(tmp_path, capsys):
    finished_seed(tmp_path / "seed0", 0.2, 0.5)
    (tmp_path / "seed1" / "pipeline" / "step1").mkdir(parents=True)
    summary = default_judge.report(default_judge.parse_args(["--output-dir", str(tmp_path), "--seeds", "2"]))
    assert list(summary["seeds"]) == [0] and summary["default"] is None
    assert "1 of 2 seeds finished" in capsys.readouterr().out
