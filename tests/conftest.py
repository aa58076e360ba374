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
