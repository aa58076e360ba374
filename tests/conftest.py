"""Session-wide fixtures: the tiny model and synthetic data are built once per test session."""
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """Paths of the tiny Qwen2.5-VL and its synthetic datasets: {"model", "registry", ...}."""
    from sophiavl.demo.build_tiny_assets import build

    return build(str(tmp_path_factory.mktemp("tiny")), seed=0, num_train=200, num_test=40)


@pytest.fixture(scope="session")
def short_pipeline(tmp_path_factory):
    """One run of train.py on the short tiny setting (assets, warm start, step 1, the TRM server, step 2, step 3):
    (its output folder, the finished process). Tests of later runs start from copies of its finished stages."""
    pytest.importorskip("vllm")
    from tests.helpers import run_short_tiny

    output_dir = tmp_path_factory.mktemp("short_pipeline")
    return output_dir, run_short_tiny("train.py", output_dir)


@pytest.fixture(scope="session")
def failing_judge_run(tiny_assets, tmp_path_factory):
    """3 steps of 2-rank full Trust-GRPO (hf engine) through a live HTTP judge whose first 4 answers are 401 and next
    4 are 503 (all of step 1's 16 requests are sent before any of step 2's, so 8 of them fail; no retries), then 0.7
    for every response, with an API key (a canary) in the environment and every output switched on. Read by the
    judge-fault test (tests/step2/test_trm_faults.py) and the secrets test (tests/test_secrets_and_injection.py).
    Returns {"output_dir", "result" (the finished launcher), "requests", "headers" (the judge's), "api_key"}."""
    import uuid

    from tests.fake_judge import FakeJudge, fail_first, fixed_score, status
    from tests.helpers import run_step2

    api_key = f"sk-canary-{uuid.uuid4().hex}"
    output_dir = tmp_path_factory.mktemp("failing_judge") / "run"
    with FakeJudge(fail_first(4, status(401), fail_first(8, status(503), fixed_score(0.7)))) as judge:
        result = run_step2(tiny_assets, output_dir, "--rollout-engine", "hf", "--variant", "full",
                           "--trm-url", judge.url, "--max-steps", "3", "--save-every", "1", "--sample-every", "1",
                           "--trm-max-retries", "0", "--trm-max-failure-rate", "0.6", "--trm-failure-window", "2",
                           env={"OPENAI_API_KEY": api_key}, timeout=360)
    return {"output_dir": output_dir, "result": result, "requests": list(judge.requests),
            "headers": list(judge.headers), "api_key": api_key}


@pytest.fixture(scope="session")
def real_shaped_model(tmp_path_factory):
    """A tiny random-init Qwen2.5-VL laid out like Qwen2.5-VL-7B-Instruct (untied lm_head): the
    release's config files and real vocabulary (demo/real_shaped_model.py). Returns its folder."""
    from sophiavl.demo.real_shaped_model import build_real_shaped

    return build_real_shaped(str(tmp_path_factory.mktemp("real_shaped") / "model"), tied=False)


@pytest.fixture(scope="session")
def real_shaped_judge(tmp_path_factory):
    """The same at Qwen2.5-VL-3B-Instruct's shape (tied lm_head), the TRM's base. Returns its folder."""
    from sophiavl.demo.real_shaped_model import build_real_shaped

    return build_real_shaped(str(tmp_path_factory.mktemp("real_shaped") / "judge"), tied=True)


@pytest.fixture(scope="session")
def _single_process_group():
    """A single-process gloo group inside the test process, made once (DeepSpeed caches its groups: it cannot join
    a new one after this one is destroyed). Returns the launcher's variables it was made with."""
    import torch

    from sophiavl.utils.distributed import init_distributed
    from tests.helpers import free_port

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert init_distributed(timeout_minutes=1) == (0, 1)
    yield env
    torch.distributed.destroy_process_group()


@pytest.fixture
def process_group(_single_process_group, monkeypatch):
    """For a DeepSpeed engine in the test process: the group, and the launcher's variables set for this test only
    (a process that a later test starts must not inherit them: it would join this group's port)."""
    for name, value in _single_process_group.items():
        monkeypatch.setenv(name, value)


# Under `pytest -n 2` (scripts/test.sh) the tests that read one expensive fixture must run in one worker, or each
# worker makes it again: a file's tests stay together (its module fixtures: a 2-rank run and its resume, a served
# model), and so do the files that read one session run. pytest-xdist's own grouping (xdist_group marks) does not
# work with pytest 9 (it renames node ids that pytest 9 no longer lets it rename), so the files are grouped here by a
# scheduler of our own; collection fails if a test reads a shared run from a file this table does not put in the
# run's group.
SHARED_RUNS = {  # group: (its session fixtures, the test files that read them)
    "short_pipeline": (("short_pipeline",), ("tests/test_pipeline.py", "tests/experiments/test_ablations.py",
                                             "tests/experiments/test_shortcut_ablations.py")),
    "grpo_run": (("grpo_run",), ("tests/step2/test_train.py", "tests/step2/test_crash_resume.py")),
    "failing_judge_run": (("failing_judge_run",),
                          ("tests/step2/test_trm_faults.py", "tests/test_secrets_and_injection.py")),
    "trained_judge": (("trained",), ("tests/step1/test_train.py", "tests/step1/test_crash_resume.py")),
    "real_shaped": (("real_shaped_model", "real_shaped_judge"),
                    ("tests/demo/test_real_shaped_model.py", "tests/step1/test_serve_real_shaped.py",
                     "tests/utils/test_engine_parity.py", "tests/test_gpu_memory_plan.py")),
}
GROUP_OF_FILE = {path: group for group, (_, paths) in SHARED_RUNS.items() for path in paths}


def scope_of(nodeid: str) -> str:
    """The unit the scheduler hands a worker: the test's shared-run group, or else its file."""
    path = nodeid.split("::")[0]
    return GROUP_OF_FILE.get(path, path)


def pytest_collection_modifyitems(config, items):
    misplaced = sorted({f"{item.location[0]} reads {fixture}" for item in items
                        for group, (fixtures, _) in SHARED_RUNS.items() for fixture in fixtures
                        if fixture in item.fixturenames and GROUP_OF_FILE.get(item.location[0]) != group})
    if misplaced:
        raise pytest.UsageError("tests/conftest.py SHARED_RUNS: add these files to their run's group: "
                                + "; ".join(misplaced))


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's, there when it is installed
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class SharedRunScheduling(LoadScopeScheduling):
        """A file's tests to one worker, a shared run's files to one worker together."""

        def _split_scope(self, nodeid):
            return scope_of(nodeid)

    return SharedRunScheduling(config, log)
