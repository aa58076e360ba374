"""Step-2 fixtures: one uninterrupted 2-rank run that the resume tests compare against, run once per session."""
import pytest

from tests.helpers import GRPO_FLAGS, check_ok, run_step2


@pytest.fixture(scope="session")
def grpo_run(tiny_assets, tmp_path_factory):
    """The output folder of 4 uninterrupted steps of 2-rank GRPO (hf engine, a checkpoint every step)."""
    output_dir = tmp_path_factory.mktemp("grpo_uninterrupted")
    check_ok(run_step2(tiny_assets, output_dir, *GRPO_FLAGS, "--max-steps", "4"))
    return output_dir
