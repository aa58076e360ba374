"""`kill -9` of one rank of a 2-rank step-1 (TRM) run: the others do not wait forever, and `--resume`
repeats what the uninterrupted run (the session's `trained` fixture) logged: the steps after the checkpoint that
the crashed run had logged are dropped and redone, with the same losses and learning rates. Every wait is bounded;
the test kills what it starts."""
import os
import subprocess

import pytest

from tests.helpers import (ENV, assert_everything_died_quickly, deepspeed_run, kill_group, latest_tag, metrics,
                           step1_command, training_ranks, wait_for)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_kill_9_of_one_rank_then_resume_repeats_the_uninterrupted_losses(trained, tiny_assets, traces, tmp_path):
    model = tiny_assets["model"]
    command = step1_command(model, traces, tmp_path / "crashed")  # the flags of the uninterrupted `trained` run
    with open(tmp_path / "crashed.log", "w") as log:
        launcher = subprocess.Popen(command, env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    try:
        wait_for(lambda: latest_tag(tmp_path / "crashed") == "step30", launcher, "the step-30 checkpoint")
        ranks = training_ranks(launcher)
        assert len(ranks) == 2
        ranks[1].kill()
        assert_everything_died_quickly(launcher, ranks)
    finally:
        kill_group(launcher)
    logged = metrics(tmp_path / "crashed")

    log = deepspeed_run(model, traces, tmp_path / "crashed", "--resume")
    assert "from step 31" in log
    resumed, clean = metrics(tmp_path / "crashed"), metrics(trained[0])
    assert [m["step"] for m in resumed] == [m["step"] for m in clean]  # every step logged once
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in clean], rel=1e-5)
    assert [m["lr"] for m in resumed] == pytest.approx([m["lr"] for m in clean], rel=1e-9)
    assert [m["loss"] for m in logged[:30]] == [m["loss"] for m in resumed[:30]]  # kept as logged before the kill
