"""`kill -9` of one rank of a 2-rank step-1 (TRM) run: the others do not wait forever, and `--resume`
repeats what the uninterrupted run logged. Every wait is bounded; the test kills what it starts."""
import os
import subprocess
import sys

import psutil
import pytest

from tests.step1.test_train import deepspeed_run, free_port, read_metrics, traces  # noqa: F401 - a fixture
from tests.step2.test_crash_resume import assert_everything_died_quickly, kill_group, latest_tag, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = ("--epochs", "1", "--learning-rate", "3e-3", "--warmup-ratio", "0.05", "--micro-batch-size", "2",
         "--gradient-accumulation-steps", "2", "--eval-batch-size", "4",
         "--eval-split-fraction", "0.1", "--eval-every", "0", "--save-every", "5",
         "--zero-param-persistence-threshold", "0", "--seed", "1")


def training_ranks(launcher) -> list:
    ranks = []
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            command = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if any(a.startswith("--local_rank=") for a in command) and any(a.endswith("main.py") for a in command):
            ranks.append(child)
    return ranks


def test_kill_9_of_one_rank_then_resume_repeats_the_uninterrupted_losses(tiny_assets, traces, tmp_path):  # noqa: F811
    model = tiny_assets["model"]
    command = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--master_port", str(free_port()),
               "--num_gpus", "2", os.path.join(REPO, "step1_reward_model", "main.py"), "--model-path", model,
               "--train-data", traces, "--output-dir", str(tmp_path / "crashed"), *FLAGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(tmp_path / "crashed.log", "w") as log:
        launcher = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: latest_tag(tmp_path / "crashed") == "step10", launcher, "the step-10 checkpoint")
        ranks = training_ranks(launcher)
        assert len(ranks) == 2
        ranks[1].kill()
        assert_everything_died_quickly(launcher, dict(enumerate(ranks)))
    finally:
        kill_group(launcher)
    logged = read_metrics(tmp_path / "crashed")

    deepspeed_run(model, traces, tmp_path / "crashed", *FLAGS, "--resume")
    deepspeed_run(model, traces, tmp_path / "clean", *FLAGS)
    resumed, clean = read_metrics(tmp_path / "crashed"), read_metrics(tmp_path / "clean")
    assert [m["step"] for m in resumed] == [m["step"] for m in clean]  # every step logged once
    assert [m["loss"] for m in resumed] == pytest.approx([m["loss"] for m in clean], rel=1e-5)
    assert [m["loss"] for m in logged[:10]] == [m["loss"] for m in resumed[:10]]  # kept as logged before the kill
