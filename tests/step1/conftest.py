"""Step-1 fixtures: labelled TRM traces of the tiny tasks, built once per test session."""
import pytest


@pytest.fixture(scope="session")
def traces(tiny_assets, tmp_path_factory):
    """300 labelled traces (30 task rows x 10) of the tiny tasks, in annotate.py's format."""
    from sophiavl.demo import trm_traces

    path = tmp_path_factory.mktemp("traces") / "traces.jsonl"
    trm_traces.main(["--registry", tiny_assets["registry"], "--data-path", "tiny_train", "--max-rows", "30",
                     "--output", str(path)])
    return str(path)
