"""LoRA in a real 2-rank ZeRO-3 step-2 run with the colocated vLLM engine: the adapters are partitioned and are all
that trains, vLLM gets the merged weights after every step, the reference is the base model (adapters disabled),
final/ is the merged policy and final/adapter the adapter in peft's format, and a resume repeats the next step."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import check_ok, metrics, run_step2, without_timings

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(900)]
RANK, ALPHA = 8, 16
FLAGS = ("--rollout-engine", "vllm", "--variant", "grpo", "--lora-rank", str(RANK), "--lora-alpha", str(ALPHA),
         "--learning-rate", "1e-2", "--lora-save-adapter", "--save-every", "1", "--log-completions", "--max-steps", "3")


@pytest.fixture(scope="module")
def lora_runs(tiny_assets, tmp_path_factory):
    """Run a: 3 uninterrupted LoRA steps (KL 0.05); run b: a's folder as it stood after step 2, resumed."""
    pytest.importorskip("vllm")
    a, b = (tmp_path_factory.mktemp("lora") / name for name in "ab")
    check_ok(run_step2(tiny_assets, a, *FLAGS, timeout=600))
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step3")
    shutil.rmtree(b / "final")
    (b / "checkpoints" / "latest").write_text("step2")
    check_ok(run_step2(tiny_assets, b, *FLAGS, "--resume", timeout=600))
    return a, b


def test_vllm_follows_the_merged_policy_and_the_reference_is_the_base_model(lora_runs):
    rows = metrics(lora_runs[0])
    # step 1 samples from the base weights in both engines: their own log-prob gap on this model. After each sync it
    # stays there (a sync of the unmerged base weights gives 0.1-0.2)
    floor = rows[0]["rollout/logp_gap"]
    assert floor < 5e-3 and all(row["rollout/logp_gap"] < 2 * floor for row in rows[1:]), rows
    # lora_B starts at zero: the policy is the base model, which the reference is; then it moves off it
    assert rows[0]["kl"] == 0.0 and all(row["kl"] > 1e-3 for row in rows[1:])


def test_only_the_adapters_train_and_final_is_the_base_plus_the_saved_adapter(lora_runs, tiny_assets):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    a = lora_runs[0]
    final = AutoModelForImageTextToText.from_pretrained(a / "final", dtype=torch.float32)
    base = AutoModelForImageTextToText.from_pretrained(tiny_assets["model"], dtype=torch.float32)
    adapter = load_file(a / "final" / "adapter" / "adapter_model.safetensors")
    base_weights, adapter_numel = dict(base.named_parameters()), 0
    for name, weight in final.named_parameters():
        layer = f"base_model.model.{name.removesuffix('.weight')}"
        if f"{layer}.lora_A.weight" not in adapter:
            assert torch.equal(weight, base_weights[name]), name  # not adapted: the base weight, bit for bit
            continue
        lora_a, lora_b = adapter[f"{layer}.lora_A.weight"], adapter[f"{layer}.lora_B.weight"]
        assert lora_b.abs().max() > 0, f"{name}: its adapter did not train"
        torch.testing.assert_close(weight, base_weights[name] + ALPHA / RANK * lora_b @ lora_a, rtol=0, atol=1e-6,
                                   msg=name)
        adapter_numel += lora_a.numel() + lora_b.numel()
    assert len(adapter) == 2 * 28  # q, k, v, o, gate, up, down of 4 decoder layers

    # the adapter loads with peft onto the base model and merges into the same weights
    merged = PeftModel.from_pretrained(base, a / "final" / "adapter").merge_and_unload()
    for (name, weight), (_, expected) in zip(merged.named_parameters(), final.named_parameters()):
        torch.testing.assert_close(weight, expected, rtol=0, atol=1e-6, msg=name)

    # ZeRO-3 partitioned the adapters over the 2 ranks: each rank's fp32 master holds half of them, nothing else
    for rank in (0, 1):
        optimizer = torch.load(a / "checkpoints" / "step3" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                               map_location="cpu", weights_only=False)["optimizer_state_dict"]
        per_rank = sum(math.ceil(t.numel() / 2) for t in adapter.values())
        assert sum(t.numel() for t in optimizer["fp32_flat_groups"]) == per_rank == adapter_numel // 2


def test_a_lora_run_resumed_after_step_2_repeats_step_3(lora_runs):
    a, b = lora_runs
    assert [row["step"] for row in metrics(b)] == [1, 2, 3]
    assert [without_timings(r) for r in metrics(b)] == [without_timings(r) for r in metrics(a)]
    for rank in (0, 1):
        logged = [[json.loads(line) for line in open(run / "completions" / f"rank{rank}.jsonl")] for run in (a, b)]
        assert logged[0] == logged[1] and [g["step"] for g in logged[0]] == [1, 1, 2, 2, 3, 3]
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        uninterrupted, resumed = load_file(a / "final" / name), load_file(b / "final" / name)
        assert uninterrupted.keys() == resumed.keys()
        assert all(torch.equal(tensor, resumed[key]) for key, tensor in uninterrupted.items()), name
