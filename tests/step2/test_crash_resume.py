"""Crash and resume of a 2-rank step-2 run: `kill -9` of one rank mid-run, and a kill in the middle of a
checkpoint save. No wait is unbounded; every test kills what it started, whatever happens."""
import os
import re
import signal
import time

import pytest

from tests.helpers import (GRPO_FLAGS, assert_everything_died_quickly, check_ok, kill_group, latest_tag, metrics,
                           run_step2, start_step2, training_ranks, wait_for, without_timings)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
FLAGS = GRPO_FLAGS


@pytest.fixture(scope="module")
def uninterrupted(grpo_run):
    return [without_timings(row) for row in metrics(grpo_run)]


def test_a_kill_in_a_checkpoint_save_then_a_kill_9_mid_step_and_each_resume_repeats_the_next_steps_exactly(
        tiny_assets, tmp_path, uninterrupted):
    """Two crashes of one run, each followed by a resume: rank 0 killed while it saves step 2 (the previous
    checkpoint must stay the one to resume from), then, in the resumed run, rank 1 killed with `kill -9` mid-step.
    After the second resume the run's metrics are the uninterrupted run's."""
    output_dir = tmp_path / "run"
    log = tmp_path / "crash.log"
    launcher = start_step2(tiny_assets, output_dir, log, *FLAGS, "--max-steps", "4",
                           env={"SOPHIAVL_PAUSE_IN_SAVE": "2"})
    try:
        wait_for(lambda: "SOPHIAVL_PAUSE_IN_SAVE: rank 0 paused in the save of step 2" in log.read_text(),
                 launcher, "the pause in the save of step 2")
        ranks = training_ranks(launcher, "step2_trust_grpo/main.py")
        # DeepSpeed has written step 2's files; `latest` must still name step 1
        assert latest_tag(output_dir) == "step1" and os.listdir(output_dir / "checkpoints" / "step2")
        ranks[0].send_signal(signal.SIGKILL)
        assert_everything_died_quickly(launcher, ranks)
    finally:
        kill_group(launcher)

    # make the interrupted save half-written for certain: a resume must not read it at all
    step2_dir = output_dir / "checkpoints" / "step2"
    for name in os.listdir(step2_dir):
        path = step2_dir / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert latest_tag(output_dir) == "step1"
    logged_before_first = metrics(output_dir)[:1]

    launcher = start_step2(tiny_assets, output_dir, tmp_path / "resume.log", *FLAGS, "--max-steps", "4", "--resume")
    try:
        wait_for(lambda: latest_tag(output_dir) == "step2", launcher, "checkpoint step2")
        ranks = training_ranks(launcher, "step2_trust_grpo/main.py")
        assert sorted(ranks) == [0, 1], ranks
        ranks[1].send_signal(signal.SIGKILL)
        elapsed = assert_everything_died_quickly(launcher, ranks)
    finally:
        kill_group(launcher)
    print(f"launcher and rank 0 gone {elapsed:.1f} s after the kill of rank 1")
    resume_step = int(latest_tag(output_dir)[4:])
    assert resume_step in (2, 3), resume_step  # the kill lands in step 3 (at worst just after its save)
    logged_before_second = metrics(output_dir)[:resume_step]
    assert logged_before_second[:1] == logged_before_first  # the first resume started from step 1's checkpoint
    assert not os.path.exists(output_dir / "final")

    check_ok(run_step2(tiny_assets, output_dir, *FLAGS, "--max-steps", "4", "--resume"))
    rows = metrics(output_dir)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    # steps up to the checkpoint are the crashed run's own rows, timings included: they were not redone
    assert rows[:resume_step] == logged_before_second
    assert [without_timings(row) for row in rows] == uninterrupted
    assert latest_tag(output_dir) == "step4" and os.path.isdir(output_dir / "final")
    assert sorted(os.listdir(output_dir / "checkpoints")) == ["latest", "step3", "step4", "zero_to_fp32.py",
                                                              "zero_to_torch.py"]


def test_a_rank_that_stops_answering_fails_the_run_after_the_distributed_timeout(tiny_assets, tmp_path):
    """SIGSTOP, unlike a kill, closes no socket: the other rank learns nothing and waits in its next collective.
    Only the distributed timeout (--dist-timeout-minutes) ends that wait; the default is 30 minutes."""
    output_dir = tmp_path / "run"
    log = tmp_path / "run.log"
    launcher = start_step2(tiny_assets, output_dir, log, *FLAGS, "--max-steps", "50", "--dist-timeout-minutes", "0.5")
    try:
        wait_for(lambda: latest_tag(output_dir) == "step1", launcher, "checkpoint step1")
        ranks = training_ranks(launcher, "step2_trust_grpo/main.py")
        ranks[1].send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        ranks[0].wait(timeout=150)
        elapsed = time.monotonic() - stopped_at
    finally:  # the launcher would SIGKILL the stopped rank only 30 s after its SIGTERM: no need to wait for that
        kill_group(launcher)
    print(f"rank 0 failed {elapsed:.1f} s after rank 1 stopped")
    # it was the 30 s timeout that ended it (gloo: "Timed out waiting 30000ms", NCCL: "Timeout(ms)=30000")
    assert elapsed >= 30 and re.search(r"\[rank0\]:.*30000", log.read_text())
