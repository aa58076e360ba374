"""Step-1 fixtures, built once per test session: labelled TRM traces of the tiny tasks, and a judge trained on them."""
import pytest

from tests.helpers import deepspeed_run


@pytest.fixture(scope="session")
def traces(tiny_assets, tmp_path_factory):
    """300 labelled traces (30 task rows x 10) of the tiny tasks, in annotate.py's format."""
    from sophiavl.demo import trm_traces

    path = tmp_path_factory.mktemp("traces") / "traces.jsonl"
    trm_traces.main(["--registry", tiny_assets["registry"], "--data-path", "tiny_train", "--max-rows", "30",
                     "--output", str(path)])
    return str(path)


@pytest.fixture(scope="session")
def trained(tiny_assets, traces, tmp_path_factory):
    """A 2-rank ZeRO-3 run of step 1 with tests.helpers.step1_command's flags: (its output folder, its log)."""
    output_dir = tmp_path_factory.mktemp("trm")
    log = deepspeed_run(tiny_assets["model"], traces, output_dir)
    return output_dir, log
