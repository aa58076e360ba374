"""Where the LoRA adapters go (utils/lora.py), on the tiny Qwen2.5-VL, whose vision MLP has layers named as the
language model's (gate_proj, up_proj, down_proj)."""
import types

import pytest
import torch

from sophiavl.utils.cli import InputError
from sophiavl.utils.lora import LORA_TARGETS, add_adapters, lora_layers
from sophiavl.utils.model import load_model


def lora_args(model_path, targets=",".join(LORA_TARGETS)):
    return types.SimpleNamespace(lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, lora_target_modules=targets,
                                 model_path=model_path)


def test_adapters_go_on_the_language_models_linear_layers_only(tiny_assets):
    model = load_model(tiny_assets["model"], torch.float32)
    vision_names = {n.rsplit(".", 1)[-1] for n, m in model.model.visual.named_modules()
                    if isinstance(m, torch.nn.Linear)}
    assert {"gate_proj", "up_proj", "down_proj"} <= vision_names  # bare names would adapt the vision tower too
    add_adapters(model, lora_args(tiny_assets["model"]), seed=0)
    expected = {f"model.language_model.layers.{i}.{block}.{name}" for i in range(4)
                for block, names in (("self_attn", LORA_TARGETS[:4]), ("mlp", LORA_TARGETS[4:])) for name in names}
    assert set(lora_layers(model)) == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{layer}.lora_{ab}.default.weight" for layer in expected for ab in "AB"}
    assert all(torch.equal(layer.lora_B["default"].weight, torch.zeros_like(layer.lora_B["default"].weight))
               for layer in lora_layers(model).values())  # the policy starts as the base model


@pytest.mark.parametrize("targets, named", [("qkv,q_proj", "qkv"), ("q_proj,attn_out", "attn_out"),
                                            ("input_layernorm", "input_layernorm")])
def test_a_target_that_no_linear_layer_of_the_language_model_has_is_one_line(tiny_assets, targets, named):
    model = load_model(tiny_assets["model"], torch.float32)
    with pytest.raises(InputError) as error:
        add_adapters(model, lora_args(tiny_assets["model"], targets), seed=0)
    message = str(error.value)
    assert message.startswith(f"--lora-target-modules {named}:") and "\n" not in message
    assert "(it has down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)" in message
    assert not lora_layers(model)  # nothing was adapted
