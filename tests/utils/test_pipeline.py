"""The stage runner of train.py and experiments/ (utils/pipeline.py): a stage runs from the repository root with its
log beside its outputs, is skipped once its "done" marker exists, a failure carries its log's tail, and a pipeline's
exit code says how it ended."""
import argparse
import json
import sys

import pytest

from sophiavl.utils.cli import InputError
from sophiavl.utils.pipeline import Pipeline, StageFailed, command_shown, run_stages, tiny_setup
from tests.helpers import REPO


def pipeline_in(folder, force=False, **sizes) -> Pipeline:
    args = argparse.Namespace(output_dir=str(folder), force=force, deployment_type="tiny", seed=0, **sizes)
    return Pipeline(args, REPO)


def test_a_stage_runs_from_the_root_and_is_skipped_once_its_marker_exists(tmp_path, capsys):
    pipeline = pipeline_in(tmp_path)
    marker = tmp_path / "stage" / "done.json"
    write = [sys.executable, "-c", "import json, os, sys; os.makedirs(sys.argv[1], exist_ok=True); "
             "print(os.getcwd()); json.dump({}, open(sys.argv[2], 'w'))", str(marker.parent), str(marker)]
    pipeline.run("stage", write, done_when=str(marker))
    assert (tmp_path / "stage.log").read_text().strip() == REPO and marker.exists()
    assert "stage" in json.loads((tmp_path / "stage_seconds.json").read_text())

    marker.write_text('"kept"')
    pipeline.run("stage", write, done_when=str(marker))
    assert "[stage] done already (stage/done.json exists), skipped" in capsys.readouterr().out
    assert marker.read_text() == '"kept"'
    pipeline_in(tmp_path, force=True).run("stage", write, done_when=str(marker))  # --force reruns it
    assert json.loads(marker.read_text()) == {}


def test_a_failing_stage_raises_with_the_tail_of_its_log(tmp_path):
    fail = [sys.executable, "-c", "print('the last words'); raise SystemExit(3)"]
    with pytest.raises(StageFailed, match=r"(?s)\[broken\] failed \(exit 3\).*the last words"):
        pipeline_in(tmp_path).run("broken", fail, done_when=str(tmp_path / "never"))


def test_assets_cut_short_after_their_registry_are_built_again(tmp_path):
    """The registry is written before the model: only build_args.json, written last, marks the assets done."""
    registry = tmp_path / "assets" / "data" / "dataset_info.json"
    registry.parent.mkdir(parents=True)
    registry.write_text("{}")  # what a build killed before its model leaves behind
    (tmp_path / "policy_init").mkdir()
    (tmp_path / "policy_init" / "config.json").write_text("{}")  # the warm start is done: only the assets rerun
    pipeline = pipeline_in(tmp_path, tiny_train_rows=8, tiny_test_rows=2, warm_start_steps=1)
    assert tiny_setup(pipeline) == (str(tmp_path / "assets"), str(registry))
    assert (tmp_path / "assets" / "model" / "config.json").exists()
    assert json.loads((tmp_path / "assets" / "build_args.json").read_text())["num_train"] == 8


def raising(error):
    def body():
        raise error
    return body


@pytest.mark.parametrize("body, code, message", [
    (lambda: None, 0, ""),
    (raising(StageFailed("[step2] failed (exit 1) after 3 s")), 1, "[step2] failed (exit 1) after 3 s\n"),
    (raising(InputError("--data-path x: no such dataset")), 2, "error: --data-path x: no such dataset\n"),
    (raising(KeyboardInterrupt()), 130, "interrupted; run the same command again to continue\n"),
])
def test_a_pipelines_exit_code_and_last_line_say_how_it_ended(body, code, message, capsys):
    assert run_stages(body) == code
    assert capsys.readouterr().err == message


def test_the_command_shown_in_a_report_leaves_out_report_only():
    shown = command_shown("experiments/ablations.py", ["--report-only", "--notes", "two words", "--key-seeds", "8"])
    assert shown == "python experiments/ablations.py --notes 'two words' --key-seeds 8"
