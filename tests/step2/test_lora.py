"""LoRA in step 2, in one process (gloo, world size 1): the engines build_policy_engines makes, the reference as the
base model with the adapters disabled, and the merged weight stream the rollout engines load. The 2-rank run with
vLLM, the export and the resume: tests/step2/test_lora_run.py."""
import deepspeed
import pytest
import torch
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from sophiavl.utils.data import load_rows, open_images
from sophiavl.utils.generation import Sampling
from sophiavl.utils.lora import LORA_TARGETS, lora_layers
from sophiavl.utils.model import load_model, load_processor
from sophiavl.utils.prompts import policy_messages
from sophiavl.utils.zero3 import gathered_weights
from step2_trust_grpo.arguments import check_args, parse_args
from step2_trust_grpo.main import build_policy_engines
from step2_trust_grpo.policy import AdaptersDisabled, completion_batch, completion_logps
from step2_trust_grpo.rollout import HFRollout

pytestmark = pytest.mark.timeout(300)
RANK, ALPHA = 4, 16.0


@pytest.fixture
def lora_engines(tiny_assets, tmp_path, process_group):
    """build_policy_engines for a LoRA run of the tiny policy (KL on), and the base model loaded apart, unsharded:
    (engine, reference, base model)."""
    args = parse_args(["--model-path", tiny_assets["model"], "--registry", tiny_assets["registry"],
                       "--data-path", "tiny_train", "--output-dir", str(tmp_path), "--variant", "grpo",
                       "--rollout-engine", "hf", "--num-generations", "2", "--rollout-batch-size", "2",
                       "--micro-batch-size", "4", "--kl-coef", "0.05", "--zero-param-persistence-threshold", "0",
                       "--lora-rank", str(RANK), "--lora-alpha", str(ALPHA)])
    check_args(args, world_size=1)
    plain = load_model(tiny_assets["model"], torch.float32)  # before HfDeepSpeedConfig exists, or it would be sharded
    engine, reference = build_policy_engines(args, 1, torch.float32)
    yield engine, reference, plain
    unset_hf_deepspeed_config()  # later tests of this process must load unsharded models


def a_batch(tiny_assets, processor):
    rows = load_rows("tiny_test", tiny_assets["registry"])[:2]
    images = [open_images(r) for r in rows]
    chats = [policy_messages(r["prompt"], r["problem_type"], r["options"], len(i)) for r, i in zip(rows, images)]
    completions = [processor.tokenizer.encode("<think>ok</think><answer>A</answer>")] * len(rows)
    return chats, images, completion_batch(processor, chats, images, completions)


def test_the_reference_is_the_policy_engine_with_its_adapters_disabled(lora_engines, tiny_assets):
    engine, reference, plain = lora_engines
    # only the adapters train, and all of them are in AdamW: ZeRO-3 partitioned them at deepspeed.initialize
    adapters = {n: p for n, p in engine.module.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert len(adapters) == 2 * len(LORA_TARGETS) * 4  # A and B on 7 linear layers of 4 decoder layers
    assert {n for n, p in engine.module.named_parameters() if p.requires_grad} == set(adapters)
    assert all(hasattr(p, "ds_id") and p.data.numel() == 0 for p in adapters.values())
    assert sum(t.numel() for t in engine.optimizer.fp32_partitioned_groups_flat) == \
        sum(p.ds_numel for p in adapters.values())
    # no second model: the reference calls the policy's engine
    assert isinstance(reference, AdaptersDisabled) and reference.engine is engine

    processor = load_processor(tiny_assets["model"])
    _, _, batch = a_batch(tiny_assets, processor)
    with torch.no_grad():
        base = completion_logps(plain, batch, 1.0)[0]
        assert torch.equal(completion_logps(engine, batch, 1.0)[0], base)  # lora_B starts at 0: policy = base
        with deepspeed.zero.GatheredParameters([adapters[n] for n in adapters if ".lora_B." in n], modifier_rank=0):
            for name, param in adapters.items():
                if ".lora_B." in name:
                    param.data.normal_(0, 0.05)
        policy, ref = completion_logps(engine, batch, 1.0)[0], completion_logps(reference, batch, 1.0)[0]
    torch.testing.assert_close(ref, base, rtol=0, atol=1e-6)
    assert (policy - base).abs().max() > 1e-2, "the adapters changed nothing: the check proves nothing"


def test_the_weight_stream_is_the_merged_model_under_its_base_names(lora_engines, tiny_assets):
    engine, _, plain = lora_engines
    layers = lora_layers(engine.module)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        torch.manual_seed(1)
        for layer in layers.values():  # a trained-looking adapter
            layer.lora_B["default"].weight.data.normal_(0, 0.05)
        expected = {}  # W + (alpha / r) B A, by hand
        for name, param in engine.module.named_parameters():
            layer = name.split(".base_layer.")[0] if ".base_layer." in name else None
            if layer in layers and name.endswith(".weight"):
                a, b = layers[layer].lora_A["default"].weight, layers[layer].lora_B["default"].weight
                expected[f"{layer}.weight"] = param.data + ALPHA / RANK * b.data @ a.data
            elif ".lora_" not in name:
                expected[name.replace(".base_layer.", ".")] = param.data.clone()

    streams = [list(gathered_weights(engine.module, params_per_gather=k)) for k in (1, 16)]
    for stream in streams:  # a LoRA layer's 4 tensors are gathered together even when 1 at a time is asked for
        assert [n for n, _ in stream] == [n for n, _ in plain.named_parameters()]  # the plain model's names, in order
        for name, tensor in stream:
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)
    assert sum(n.endswith(tuple(f"{t}.weight" for t in LORA_TARGETS)) and n.startswith("model.language_model")
               for n, _ in streams[0]) == len(layers) == 28

    # the hf rollout engine's plain copy, synced from the stream, gives the trained policy's log-probs
    processor = load_processor(tiny_assets["model"])
    rollout = HFRollout(plain, processor, Sampling(max_new_tokens=4))
    rollout.sync_weights(engine.module)
    _, _, batch = a_batch(tiny_assets, processor)
    with torch.no_grad():
        torch.testing.assert_close(completion_logps(plain, batch, 1.0)[0], completion_logps(engine, batch, 1.0)[0],
                                   rtol=0, atol=1e-5)
