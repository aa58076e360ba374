"""Step 1's memory switches of the real-scale launchers, run in this process: --gradient-checkpointing and --offload
(DeepSpeed's CPU Adam) train to the losses of a run without them."""
import pytest

from tests.helpers import metrics

pytestmark = pytest.mark.timeout(300)


def test_checkpointing_and_offload_give_the_same_losses(run_step1, tmp_path):
    run_step1(tmp_path / "plain", "--max-steps", "4")
    run_step1(tmp_path / "both", "--max-steps", "4", "--gradient-checkpointing", "--offload")
    plain, both = ([row["loss"] for row in metrics(tmp_path / name)] for name in ("plain", "both"))
    assert len(plain) == 4 and plain[-1] < plain[0]  # it trains, so later losses depend on the updates
    assert both == pytest.approx(plain, rel=1e-4)  # CPU Adam rounds unlike torch's AdamW in the last bits
