"""`kill -9` of one rank of a 2-rank step-1 (TRM) run: the others do not wait forever, and `--resume`
repeats what the uninterrupted run logged. Every wait is bounded; the test kills what it starts."""
import os
import subprocess

import pytest

from tests.helpers import (ENV, assert_everything_died_quickly, deepspeed_run, kill_group, latest_tag, metrics,
                           step1_command, training_ranks, wait_for)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
FLAGS = ("--epochs", "1", "--learning-rate", "3e-3", "--warmup-ratio", "0.05", "--micro-batch-size", "2",
         "--gradient-accumulation-steps", "2", "--eval-batch-size", "4",
         "--eval-split-fraction", "0.1", "--eval-every", "0", "--save-every", "5",
         "--zero-param-persistence-threshold", "0", "--seed", "1")


def test_kill_9_of_one_rank_then_resume_repeats_the_uninterrupted_losses(tiny_assets, traces, tmp_path):
    model = tiny_assets["model"]
    command = step1_command(model, traces, tmp_path / "crashed", *FLAGS)  # FLAGS override each of its defaults
    with open(tmp_path / "crashed.log", "w") as log:
        launcher = subprocess.Popen(command, env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    try:
        wait_for(lambda: latest_tag(tmp_path / "crashed") == "step10", launcher, "the step-10 checkpoint")
        ranks = training_ranks(launcher)
        assert len(ranks) == 2
        ranks[1].kill()
        assert_everything_died_quickly(launcher, ranks)
    finally:
        kill_group(launcher)
    logged = metrics(tmp_path / "crashed")

    deepspeed_run(model, traces, tmp_path / "crashed", *FLAGS, "--resume")
    deepspeed_run(model, traces, tmp_path / "clean", *FLAGS, "--save-every", "0")  # the reference needs no checkpoints
    assert latest_tag(tmp_path / "clean") is None
    resumed, clean = metrics(tmp_path / "crashed"), metrics(tmp_path / "clean")
    assert [m["step"] for m in resumed] == [m["step"] for m in clean]  # every step logged once
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in clean], rel=1e-5)
    assert [m["loss"] for m in logged[:10]] == [m["loss"] for m in resumed[:10]]  # kept as logged before the kill
