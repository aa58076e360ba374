"""The DeepSpeed configs built in code: their arithmetic, and that DeepSpeed's own parser accepts them."""
import pytest
from deepspeed.runtime.config import DeepSpeedConfig

from sophiavl.utils.ds_config import zero3_inference_config, zero3_train_config


def test_train_batch_size_is_micro_times_accumulation_times_world_size():
    config = zero3_train_config(micro_batch_size=3, gradient_accumulation_steps=5, world_size=4, bf16=True)
    assert config["train_batch_size"] == 60
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 5


def test_train_defaults():
    config = zero3_train_config(micro_batch_size=2, gradient_accumulation_steps=1, world_size=1, bf16=True)
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["stage3_param_persistence_threshold"] == 10_000
    assert zero["offload_param"] == {"device": "none"}
    assert zero["offload_optimizer"] == {"device": "none"}
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert config["gradient_clipping"] == 1.0
    assert config["zero_allow_untested_optimizer"] is True
    assert "fp16" not in config and "optimizer" not in config


def test_train_bf16_fp32_offload_threshold_and_clipping():
    bf16 = zero3_train_config(micro_batch_size=1, gradient_accumulation_steps=1, world_size=1, bf16=True)
    fp32 = zero3_train_config(micro_batch_size=1, gradient_accumulation_steps=1, world_size=1, bf16=False,
                              offload=True, param_persistence_threshold=0, gradient_clipping=0.5)
    assert bf16["bf16"] == {"enabled": True}
    assert fp32["bf16"] == {"enabled": False}
    assert fp32["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert fp32["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert fp32["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert fp32["gradient_clipping"] == 0.5


def test_inference_config():
    config = zero3_inference_config(world_size=8, bf16=False, param_persistence_threshold=7)
    assert config["train_batch_size"] == 8
    assert config["train_micro_batch_size_per_gpu"] == 1
    assert config["bf16"] == {"enabled": False}
    assert config["zero_optimization"] == {"stage": 3, "offload_param": {"device": "none"},
                                           "stage3_param_persistence_threshold": 7}
    assert "optimizer" not in config and "gradient_clipping" not in config
    assert zero3_inference_config(world_size=1, bf16=True)["zero_optimization"][
        "stage3_param_persistence_threshold"] == 10_000


def test_deepspeed_parses_the_train_config():
    # without a process group DeepSpeed's parser takes world size 1
    parsed = DeepSpeedConfig(zero3_train_config(micro_batch_size=3, gradient_accumulation_steps=5, world_size=1,
                                                bf16=True, param_persistence_threshold=0, gradient_clipping=0.5))
    assert parsed.world_size == 1
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) \
        == (15, 3, 5)
    assert parsed.zero_optimization_stage == 3
    assert parsed.bfloat16_config.enabled and not parsed.float16_config.enabled
    assert parsed.zero_config.param_persistence_threshold == 0
    assert parsed.gradient_clipping == 0.5
    assert parsed.zero_allow_untested_optimizer
    assert parsed.zero_config.gather_16bit_weights_on_model_save

    parsed = DeepSpeedConfig(zero3_train_config(micro_batch_size=2, gradient_accumulation_steps=1, world_size=1,
                                                bf16=False, offload=True))
    assert not parsed.bfloat16_config.enabled
    assert parsed.zero_config.offload_param.device == "cpu"
    assert parsed.zero_config.offload_optimizer.device == "cpu"
    assert parsed.zero_config.param_persistence_threshold == 10_000


def test_deepspeed_rejects_a_world_size_that_is_not_its_own():
    with pytest.raises(AssertionError, match="30 != 3 \\* 5 \\* 1"):
        DeepSpeedConfig(zero3_train_config(micro_batch_size=3, gradient_accumulation_steps=5, world_size=2,
                                           bf16=True))


def test_deepspeed_parses_the_inference_config():
    parsed = DeepSpeedConfig(zero3_inference_config(world_size=1, bf16=True, param_persistence_threshold=0))
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) \
        == (1, 1, 1)
    assert parsed.zero_optimization_stage == 3
    assert parsed.bfloat16_config.enabled
    assert parsed.zero_config.param_persistence_threshold == 0
    assert parsed.zero_config.offload_param.device == "none"
    offloaded = DeepSpeedConfig(zero3_inference_config(world_size=1, bf16=True, offload=True))
    assert offloaded.zero_config.offload_param.device == "cpu"
