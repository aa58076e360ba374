"""The suite's own scheduling (tests/conftest.py): every file SHARED_RUNS groups exists, and each file is in one group
only, so that a renamed or moved test file cannot silently drop out of its shared run's worker; a worker gets whole
files, so that a module fixture is built once."""
import os

from tests.conftest import GROUP_OF_FILE, SHARED_RUNS, scope_of
from tests.helpers import REPO


def test_every_grouped_file_exists_and_belongs_to_one_group():
    paths = [path for _, files in SHARED_RUNS.values() for path in files]
    assert len(paths) == len(set(paths)) == len(GROUP_OF_FILE)
    assert [path for path in paths if not os.path.isfile(os.path.join(REPO, path))] == []


def test_a_workers_unit_is_a_shared_run_or_else_a_whole_file():
    lora = "tests/step2/test_lora_run.py"  # a module fixture of two 2-rank launches, read by both tests
    assert scope_of(f"{lora}::test_a") == scope_of(f"{lora}::test_b[x]") == lora
    assert scope_of("tests/step2/test_crash_resume.py::test_a") == scope_of("tests/step2/test_train.py::t") == "grpo_run"
