"""Step-1 fixtures: labelled TRM traces of the tiny tasks and a judge trained on them (built once per test session),
and step 1's main() run in the test process."""
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


@pytest.fixture
def run_step1(tiny_assets, traces, process_group, monkeypatch):
    """step1.main(flags) in this process (gloo, world size 1, ZeRO-3 with every parameter sharded, 1 epoch of
    micro-batches of 4); the process group outlives it (it is the session's)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    import step1_reward_model.main as step1

    monkeypatch.setattr(step1, "shutdown", lambda: None)

    def run(output_dir, *flags):
        try:
            step1.main(["--model-path", tiny_assets["model"], "--train-data", traces, "--output-dir", str(output_dir),
                        "--epochs", "1", "--micro-batch-size", "4", "--eval-split-fraction", "0.1",
                        "--eval-max-samples", "4", "--eval-batch-size", "4", "--save-every", "0",
                        "--learning-rate", "5e-3", "--warmup-ratio", "0", "--zero-param-persistence-threshold", "0",
                        "--seed", "1", *flags])
        finally:
            unset_hf_deepspeed_config()  # later tests of this process load unsharded models

    return run
