"""Step 1's TRM SFT with LoRA, run in this process (gloo, world size 1, ZeRO-3 with every parameter sharded): the
loss falls, final/ is the merged judge (base + (alpha / r) B A from the saved adapter), and a bad target is one line."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

import step1_reward_model.main as step1
from sophiavl.utils.data import open_images
from sophiavl.utils.model import load_processor
from step1_reward_model.data import make_batch, read_trm_rows
from tests.helpers import metrics

pytestmark = pytest.mark.timeout(300)
RANK, ALPHA = 8, 16


def test_lora_sft_lowers_the_loss_and_exports_the_merged_judge(run_step1, tiny_assets, traces, tmp_path):
    run_step1(tmp_path, "--max-steps", "16", "--lora-rank", str(RANK), "--lora-alpha", str(ALPHA),
              "--lora-save-adapter")
    # the tiny random model's frozen lm_head and final norm cap its logits: LoRA's loss levels off near 5 nats (from
    # log 987 = 6.9), where full fine-tuning goes on down
    rows = metrics(tmp_path)
    losses = [row["loss"] for row in rows]
    assert len(losses) == 16 and sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    # the held-out evaluation at the end generates from the ZeRO-3 engine with its adapters on
    assert rows[-1]["eval/loss"] < 0.8 * losses[0] and 0 <= rows[-1]["eval/parse_failure_rate"] <= 1

    final = AutoModelForImageTextToText.from_pretrained(tmp_path / "final", dtype=torch.float32)
    base = AutoModelForImageTextToText.from_pretrained(tiny_assets["model"], dtype=torch.float32)
    adapter = load_file(tmp_path / "final" / "adapter" / "adapter_model.safetensors")
    config = json.load(open(tmp_path / "final" / "adapter" / "adapter_config.json"))
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (RANK, ALPHA, tiny_assets["model"])
    base_weights, merged = dict(base.named_parameters()), 0
    for name, weight in final.named_parameters():
        a = adapter.get(f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight")
        if a is None:  # not adapted: the base weight, bit for bit
            assert torch.equal(weight, base_weights[name]), name
            continue
        b = adapter[f"base_model.model.{name.removesuffix('.weight')}.lora_B.weight"]
        torch.testing.assert_close(weight, base_weights[name] + ALPHA / RANK * b @ a, rtol=0, atol=1e-6, msg=name)
        merged += 1
    assert merged == 28 and len(adapter) == 2 * merged

    # the merged judge carries the training: a lower loss than the base model on rows of the traces
    processor = load_processor(tiny_assets["model"])
    train_rows = read_trm_rows(traces)[:8]
    batch = make_batch(processor, train_rows, [open_images(r) for r in train_rows])
    with torch.no_grad():
        loss = {name: (lambda s, c: (s.sum() / c.sum()).item())(*step1.target_losses(model, batch))
                for name, model in (("base", base), ("final", final))}
    assert loss["final"] < 0.8 * loss["base"], loss


def test_a_lora_target_the_model_lacks_stops_the_run_with_one_line(run_step1, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        run_step1(tmp_path, "--max-steps", "1", "--lora-rank", "4", "--lora-target-modules", "q_proj,qkv")
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: --lora-target-modules qkv: no linear layer of that name in the language model")
    assert not os.path.exists(tmp_path / "final")
